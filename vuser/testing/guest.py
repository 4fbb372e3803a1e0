"""Boot a real Linux guest under QEMU (TCG) and run shell commands in it.

::

    async with boot_guest(qemu="11", kernel="bookworm", extra_args=[...]) as guest:
        result = await guest.run("uname -r", timeout=30)
        await guest.check("test -e /dev/hwrng")

QEMU binaries, kernels and initramfs images come from the provisioning cache,
found through its manifest (:mod:`vuser.testing.manifest`).  Nothing here
skips: a missing piece raises :class:`NotProvisionedError`.

This module runs QEMU and ties the pieces of a guest together: the command
channel on ttyS1 (:mod:`vuser.testing.channel`), QMP on ``qmp.sock``
(:mod:`vuser.testing.qmp`), the command line (:mod:`vuser.testing.qemu`).
The kernel console (ttyS0) goes to ``console.log`` in the guest's temporary
directory, QEMU's own stdout/stderr to ``qemu.log``.

This is the engine under :mod:`vuser.testing.lab` (and so under the
``vuser_guest`` pytest fixture), which adds devices, files, packages and
switches; tests use that.

Resource handling: QEMU runs in its own session (process group); leaving
the context powers the guest off through the command channel and waits, then
kills the process group if it is still there — also when the body raised or
was cancelled (then without the graceful step).  Error handling: every
exception leaving the context carries a note with the tail of QEMU's log and
of the guest console; errors raised by :class:`Guest` methods carry it in
their message.  ``watch`` names companion processes (the guest's device
back-ends): one of them exiting while the guest boots or runs a command
raises :class:`DeviceExited` at once.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence, TypeVar

import trio

from vuser.testing.channel import CommandChannel, CommandResult
from vuser.testing.child import Exit, race_exits, read_text, stop_group
from vuser.testing.errors import (DeviceExited, GuestCommandError, GuestError, GuestExited,
                                  GuestTimeout, NotProvisionedError, diagnosed, is_diagnosed,
                                  mark_diagnosed, tail)
from vuser.testing.manifest import (HOW_TO_PROVISION, cache_dir, kernel_info, manifest,
                                    manifest_path, provisioned, qemu_info)
from vuser.testing.qemu import qemu_command, qemu_rss
from vuser.testing.qmp import QmpClient

__all__ = [
    "DEFAULT_KERNEL",
    "DEFAULT_QEMU",
    "Companion",
    "CommandResult",
    "DeviceExited",
    "Guest",
    "GuestCommandError",
    "GuestError",
    "GuestExited",
    "GuestTimeout",
    "NotProvisionedError",
    "boot_guest",
    "cache_dir",
    "kernel_info",
    "manifest",
    "manifest_path",
    "provisioned",
    "qemu_command",
    "qemu_info",
    "qemu_rss",
]

_T = TypeVar("_T")
# What a guest boots when not told otherwise (the fixture's defaults too):
# sid's QEMU has a front-end for every vuser device, bookworm's kernel boots
# the quickest.
DEFAULT_QEMU = "11"
DEFAULT_KERNEL = "bookworm"
# A process the guest depends on (a device back-end): an async "wait until
# it exits" and a description of it, status included, for the error.
Companion = tuple[Callable[[], Awaitable[object]], Callable[[], str]]
# After a graceful poweroff was tried: TERM, then KILL, to QEMU's group.
STOP_STEPS = ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0))


class Guest:
    """A running guest; obtained from :func:`boot_guest`, valid inside it."""

    def __init__(self, *, qemu: Mapping[str, Any], kernel: Mapping[str, Any],
                 workdir: Path, argv: list[str]) -> None:
        self.qemu_key: str = qemu["key"]
        self.kernel_key: str = kernel["key"]
        self.qemu_version: str = qemu["version"]
        self.kernel_version: str = kernel["version"]
        self.workdir = workdir
        self.argv = argv
        self.console_log = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self.cmd_socket = workdir / "cmd.sock"
        self.qmp_socket = workdir / "qmp.sock"
        self.boot_seconds: float | None = None
        # Set by whoever boots the guest (see boot_guest's ``watch`` and
        # ``extra_diagnostics``).
        self.companions: list[Companion] = []
        self.extra_diagnostics: Callable[[], str] | None = None
        # False: leaving skips the poweroff and stops QEMU at once (a body
        # that failed does not wait for a guest that may be wedged).
        self.graceful_stop = True
        self._proc: trio.Process | None = None
        self._channel: CommandChannel | None = None
        self._qmp = QmpClient(self.qmp_socket, diagnostics=self.diagnostics)

    # -- state and diagnostics

    @property
    def pid(self) -> int:
        """PID of the QEMU process (its /proc/<pid>/status has RssShmem)."""
        assert self._proc is not None
        return int(self._proc.pid)

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return None if self._proc is None else self._proc.returncode

    @property
    def qmp_events(self) -> list[dict[str, Any]]:
        """QMP events seen so far (while waiting for command replies)."""
        return self._qmp.events

    def console_text(self) -> str:
        """Everything the guest kernel and /init printed on ttyS0 so far."""
        return read_text(self.console_log)

    def qemu_log_text(self) -> str:
        """QEMU's stdout and stderr so far."""
        return read_text(self.qemu_log)

    def diagnostics(self, lines: int = 40) -> str:
        rc = self.returncode
        state = "running" if rc is None else f"exited with {rc}"
        text = (f"[guest qemu={self.qemu_key} kernel={self.kernel_key}, QEMU "
                f"{'pid ' + str(self._proc.pid) if self._proc else 'not started'} {state}, "
                f"workdir {self.workdir}]\n"
                f"QEMU command: {shlex.join(self.argv)}\n"
                f"--- QEMU log (tail) ---\n{tail(self.qemu_log_text(), lines)}\n"
                f"--- guest console (tail) ---\n{tail(self.console_text(), lines)}")
        if self.extra_diagnostics is not None:
            text += "\n" + self.extra_diagnostics()
        return text

    def _error(self, cls: type[GuestError], message: str) -> GuestError:
        return diagnosed(cls, message, self.diagnostics())

    async def _until_exit(self, fn: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run fn, but raise GuestExited as soon as QEMU exits (DeviceExited
        as soon as a companion does)."""
        proc = self._proc
        assert proc is not None
        exits: list[Exit] = [(proc.wait, lambda: self._error(
            GuestExited, f"QEMU exited with {proc.returncode} while {what}"))]
        exits += [(wait, self._companion_exited(describe, what)) for wait, describe in self.companions]
        return await race_exits(fn, exits)

    def _companion_exited(self, describe: Callable[[], str], what: str) -> Callable[[], GuestError]:
        return lambda: self._error(DeviceExited, f"{describe()} while {what}")

    # -- commands

    async def run(self, command: str, *, timeout: float = 60.0, input: bytes | str | None = None,
                  merge_stderr: bool = False, check: bool = False) -> CommandResult:
        """Run ``command`` with ``sh`` in the guest (cwd /, stdin ``input`` or
        empty) and return its status and output.  It is killed in the guest
        after ``timeout`` seconds (rounded up) and :class:`GuestTimeout` is
        raised.  ``merge_stderr`` sends stderr into stdout (like 2>&1).
        Commands run one at a time; concurrent calls queue."""
        if self._channel is None:
            raise self._error(GuestError, "guest not booted")
        if isinstance(input, str):
            input = input.encode()
        result = await self._channel.run(command, timeout=timeout, input=input or b"",
                                         merge_stderr=merge_stderr)
        if check and result.exit_code != 0:
            err = GuestCommandError(result, self.diagnostics(20))
            mark_diagnosed(err)
            raise err
        return result

    async def check(self, command: str, **kwargs: Any) -> CommandResult:
        """:meth:`run`, raising :class:`GuestCommandError` on a non-zero status."""
        return await self.run(command, check=True, **kwargs)

    async def write_file(self, path: str, data: bytes | str, *, mode: int | None = None,
                         timeout: float = 60.0) -> None:
        """Create or replace a file in the guest."""
        cmd = f"cat > {shlex.quote(path)}"
        if mode is not None:
            cmd += f" && chmod {mode:o} {shlex.quote(path)}"
        await self.check(cmd, input=data, timeout=timeout)

    async def read_file(self, path: str, *, timeout: float = 60.0) -> bytes:
        """Contents of a file in the guest."""
        return (await self.check(f"cat {shlex.quote(path)}", timeout=timeout)).stdout_bytes

    async def qmp(self, execute: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run a QMP command and return its "return" value (events seen on the
        way are appended to :attr:`qmp_events`)."""
        return await self._qmp.execute(execute, timeout, **arguments)

    # -- life cycle

    async def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit on its own; GuestTimeout otherwise."""
        assert self._proc is not None
        with trio.move_on_after(timeout):
            return int(await self._proc.wait())
        raise self._error(GuestTimeout, f"QEMU still running after {timeout}s")

    async def poweroff(self, timeout: float = 20.0) -> int:
        """Power the guest off (``poweroff -f`` through the command channel)
        and wait for QEMU to exit; returns its exit status."""
        assert self._proc is not None
        if self._proc.returncode is None and self._channel is not None:
            await self._channel.request_poweroff()
        return await self.wait_exit(timeout)

    async def _stop(self, graceful: bool, shutdown_timeout: float) -> None:
        """Make sure QEMU is gone: poweroff if asked, then SIGTERM/SIGKILL to
        its process group, and reap it.  Never raises, bounded in time."""
        proc = self._proc
        if proc is None:
            return
        # A broken channel (a command never answered) cannot take the
        # poweroff request: the guest's server is still busy with it.
        if graceful and proc.returncode is None and not (self._channel and self._channel.broken):
            try:
                await self.poweroff(shutdown_timeout)
            except GuestError:
                pass
        await stop_group(proc, STOP_STEPS)
        if self._channel is not None:
            await self._channel.aclose()
        await self._qmp.aclose()


@asynccontextmanager
async def boot_guest(qemu: str = DEFAULT_QEMU, kernel: str = DEFAULT_KERNEL, *,
                     memory_mb: int = 512, extra_args: Sequence[str] = (),
                     kernel_cmdline_extra: str = "", timeout: float = 120.0, smp: int = 1,
                     workdir: str | os.PathLike[str] | None = None,
                     keep_workdir: bool | None = None, shutdown_timeout: float = 20.0,
                     initramfs: str | os.PathLike[str] | None = None,
                     watch: Sequence[Companion] = (),
                     extra_diagnostics: Callable[[], str] | None = None,
                     guest_type: type[Guest] = Guest,
                     incoming: str | None = None) -> AsyncIterator[Guest]:
    """Boot a guest and yield a :class:`Guest` once its command server answers.

    ``qemu``: manifest key ("7.2", "11") or alias ("bookworm", "sid").
    ``kernel``: "bookworm" or "sid".  ``extra_args`` are appended to QEMU's
    command line (chardevs and devices of vhost-user back-ends, which must be
    listening before this is entered).  ``timeout`` bounds the boot.
    ``workdir``: directory for sockets and logs (default: a fresh temporary
    directory, removed afterwards unless ``keep_workdir`` or the environment
    variable VUSER_KEEP_GUEST is set).  ``initramfs`` replaces the kernel's
    provisioned image (one with files added, :mod:`vuser.testing.overlay`).
    ``watch``: companion processes whose exit ends a boot or command with
    :class:`DeviceExited`; ``extra_diagnostics`` is appended to every
    error's diagnostics (their logs).  ``guest_type``: a :class:`Guest`
    subclass to build.
    ``incoming``: the destination of a live migration (QEMU's ``-incoming
    ADDR``, e.g. ``unix:PATH``): QEMU starts and waits for the migration
    instead of booting; the guest arrives with its command server running,
    so no greeting is waited for -- send commands once the migration
    completed (``query-migrate`` on the source, ``query-status`` here).
    """
    qinfo = qemu_info(qemu)
    kinfo = kernel_info(kernel)
    if initramfs is not None:
        kinfo["initramfs"] = str(initramfs)
    made_dir = workdir is None
    wdir = Path(tempfile.mkdtemp(prefix="vuser-guest-") if workdir is None else workdir)
    wdir.mkdir(parents=True, exist_ok=True)
    if keep_workdir is None:
        keep_workdir = bool(os.environ.get("VUSER_KEEP_GUEST"))
    argv = qemu_command(qinfo["binary"], vmlinuz=kinfo["vmlinuz"],
                        initramfs=kinfo["initramfs"], memory_mb=memory_mb,
                        cmd_socket=str(wdir / "cmd.sock"),
                        console_log=str(wdir / "console.log"),
                        qmp_socket=str(wdir / "qmp.sock"),
                        kernel_cmdline_extra=kernel_cmdline_extra,
                        extra_args=[*extra_args, *(["-incoming", incoming] if incoming else [])], smp=smp)
    guest = guest_type(qemu=qinfo, kernel=kinfo, workdir=wdir, argv=argv)
    guest.companions = list(watch)
    guest.extra_diagnostics = extra_diagnostics
    # Listen before QEMU starts: its chardev connects to us, so nothing the
    # guest says on ttyS1 can be lost before we accept.
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    logf = open(guest.qemu_log, "wb")
    try:
        try:
            await listener.bind(str(guest.cmd_socket))
            listener.listen(1)
            t0 = time.monotonic()
            guest._proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True)
            with trio.move_on_after(timeout) as scope:
                sock, _ = await guest._until_exit(listener.accept, "waiting for it to connect")
                guest._channel = CommandChannel(trio.SocketStream(sock), guard=guest._until_exit,
                                                diagnostics=guest.diagnostics)
                release = guest.kernel_version if incoming else await guest._channel.wait_ready()
            if scope.cancelled_caught:
                raise guest._error(GuestTimeout, f"guest did not boot within {timeout}s")
            guest.boot_seconds = None if incoming else time.monotonic() - t0
            if release != guest.kernel_version:
                raise guest._error(GuestError, f"guest runs kernel {release}, manifest says "
                                   f"{guest.kernel_version}: {HOW_TO_PROVISION}")
            yield guest
        except BaseException:
            guest.graceful_stop = False
            raise
        finally:
            with trio.CancelScope(shield=True):
                await guest._stop(guest.graceful_stop, shutdown_timeout)
    except BaseException as exc:
        if not is_diagnosed(exc) and not isinstance(
                exc, (trio.Cancelled, KeyboardInterrupt, GeneratorExit)):
            exc.add_note(guest.diagnostics())
            mark_diagnosed(exc)
        raise
    finally:
        logf.close()
        listener.close()
        if made_dir and not keep_workdir:
            shutil.rmtree(wdir, ignore_errors=True)
