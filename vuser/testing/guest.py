"""Boot a real Linux guest under QEMU (TCG) and run shell commands in it.

::

    async with boot_guest(qemu="11", kernel="sid", extra_args=[...]) as guest:
        result = await guest.run("uname -r", timeout=30)
        await guest.check("test -e /dev/hwrng")

QEMU binaries, kernels and initramfs images come from the cache that
``scripts/provision`` fills (``$VUSER_CACHE`` or ``~/.cache/vuser``), described
by its ``manifest.json``.  Nothing here skips: a missing piece raises
:class:`NotProvisionedError`.

Command channel.  The guest's second serial port (ttyS1) is a QEMU socket
chardev that connects to a unix socket this module listens on, so nothing the
guest says can be lost before we accept.  The guest's command server
(``scripts/guest/cmdserver``) speaks one line per message, payloads base64:

    guest -> host  @@vuser-ready 1 <uname -r>
    host -> guest  @@vuser-run <id> <timeout> <s|m> :<cmd> :<stdin>
    guest -> host  @@vuser-result <id> <status> :<stdout> :<stderr>

so output and exit status are unambiguous whatever bytes a command prints.
The kernel console (ttyS0) goes to ``console.log`` in the guest's temporary
directory, QEMU's own stdout/stderr to ``qemu.log``, and QMP listens on
``qmp.sock`` there.

Resource handling: QEMU runs in its own session (process group); leaving
the context powers the guest off through the command channel and waits, then
kills the process group if it is still there — also when the body raised or
was cancelled (then without the graceful step).  Error handling: every
exception leaving the context carries a note with the tail of QEMU's log and
of the guest console; errors raised by :class:`Guest` methods carry it in
their message.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence, TypeVar

import trio

__all__ = [
    "CommandResult",
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

PROTOCOL = "1"
MANIFEST_FORMAT = 1
_T = TypeVar("_T")


# ---------------------------------------------------------------- errors

class GuestError(Exception):
    """Something went wrong with the guest or its QEMU."""


class NotProvisionedError(GuestError):
    """The cache lacks QEMU, a kernel or the manifest: run scripts/provision."""


class GuestExited(GuestError):
    """QEMU exited (or closed the command channel) while we waited on it."""


class GuestTimeout(GuestError):
    """Boot or a command took longer than allowed."""

    def __init__(self, message: str, result: CommandResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class GuestCommandError(GuestError):
    """A command run by :meth:`Guest.check` exited with a non-zero status."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(
            f"guest command exited with {result.returncode}: {result.command!r}\n"
            f"--- stdout ---\n{_tail(result.stdout, 60)}\n"
            f"--- stderr ---\n{_tail(result.stderr, 60)}")
        self.result = result


# ---------------------------------------------------------------- manifest

def cache_dir() -> Path:
    """Where scripts/provision keeps QEMU, kernels and the manifest."""
    env = os.environ.get("VUSER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vuser"


def manifest_path() -> Path:
    return cache_dir() / "manifest.json"


def manifest() -> dict[str, Any]:
    """The provision manifest; raises :class:`NotProvisionedError` if absent."""
    path = manifest_path()
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotProvisionedError(
            f"no provision manifest at {path}: run scripts/provision "
            "(it installs QEMU 7.2 and sid's QEMU, the guest kernels and initramfs)") from None
    except (OSError, ValueError) as exc:
        raise NotProvisionedError(f"unreadable manifest {path} ({exc}): "
                                  "run scripts/provision") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise NotProvisionedError(f"manifest {path} has format {data.get('format')!r}, "
                                  f"expected {MANIFEST_FORMAT}: run scripts/provision")
    return data


def qemu_info(key: str) -> dict[str, Any]:
    """Manifest entry of a QEMU ("7.2", "11", or the alias "bookworm" / "sid")."""
    data = manifest()
    key = data.get("qemu_aliases", {}).get(key, key)
    try:
        info = dict(data["qemu"][key])
    except KeyError:
        raise NotProvisionedError(f"no QEMU {key!r} in {manifest_path()} (have "
                                  f"{sorted(data['qemu'])}): run scripts/provision") from None
    if not os.access(info["binary"], os.X_OK):
        raise NotProvisionedError(f"QEMU {key} binary {info['binary']} is missing: "
                                  "run scripts/provision")
    info["key"] = key
    return info


def kernel_info(key: str) -> dict[str, Any]:
    """Manifest entry of a guest kernel ("bookworm" or "sid")."""
    data = manifest()
    try:
        info = dict(data["kernels"][key])
    except KeyError:
        raise NotProvisionedError(f"no kernel {key!r} in {manifest_path()} (have "
                                  f"{sorted(data['kernels'])}): run scripts/provision") from None
    for field in ("vmlinuz", "initramfs"):
        if not Path(info[field]).is_file():
            raise NotProvisionedError(f"kernel {key} {field} {info[field]} is missing: "
                                      "run scripts/provision")
    info["key"] = key
    return info


def provisioned() -> bool:
    """True if the manifest exists and every binary and image it names is there."""
    try:
        data = manifest()
        for key in data["qemu"]:
            qemu_info(key)
        for key in data["kernels"]:
            kernel_info(key)
    except (NotProvisionedError, KeyError):
        return False
    return True


# ---------------------------------------------------------------- results

@dataclass(frozen=True)
class CommandResult:
    """Outcome of one guest command.  ``stdout``/``stderr`` are the bytes
    decoded as UTF-8 with surrogateescape (lossless); ``*_bytes`` are raw."""

    command: str
    returncode: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "surrogateescape")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "surrogateescape")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self) -> CommandResult:
        if self.returncode != 0:
            raise GuestCommandError(self)
        return self


# ---------------------------------------------------------------- QEMU command line

def qemu_command(binary: str, *, vmlinuz: str, initramfs: str, memory_mb: int,
                 cmd_socket: str, console_log: str, qmp_socket: str | None = None,
                 kernel_cmdline_extra: str = "", extra_args: Sequence[str] = (),
                 smp: int = 1) -> list[str]:
    """The QEMU argv of a test guest: q35 under TCG, RAM in a shared memfd
    (so vhost-user back-ends can map it), ttyS0 = console log, ttyS1 = the
    command channel (QEMU connects to ``cmd_socket``)."""
    cmdline = "console=ttyS0 panic=-1 quiet"
    if kernel_cmdline_extra:
        cmdline += " " + kernel_cmdline_extra
    argv = [
        binary,
        "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        "-accel", "tcg",
        "-machine", "q35,memory-backend=mem",
        "-m", f"{memory_mb}M",
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-smp", str(smp),
        "-kernel", vmlinuz, "-initrd", initramfs, "-append", cmdline,
        "-chardev", f"file,id=vuser-console,path={console_log}",
        "-serial", "chardev:vuser-console",
        "-chardev", f"socket,id=vuser-cmd,path={cmd_socket}",
        "-serial", "chardev:vuser-cmd",
    ]
    if qmp_socket:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    return argv + list(extra_args)


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def qemu_rss(pid: int) -> dict[str, int]:
    """Resident memory of a process (e.g. :attr:`Guest.pid`), in bytes, from
    ``/proc/<pid>/status``: ``VmRSS`` and its parts ``RssAnon``, ``RssFile``
    and ``RssShmem``.  A guest's RAM is a shared memfd, so it shows in
    ``RssShmem`` (pages the guest touched and the back-ends did not punch
    out).  Raises OSError if the process is gone."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in RSS_FIELDS:
                value, _, unit = rest.strip().partition(" ")
                out[key] = int(value) * (1024 if unit.strip().lower() == "kb" else 1)
    return out


# ---------------------------------------------------------------- the guest

def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
        self.qmp_events: list[dict[str, Any]] = []
        self._proc: trio.Process | None = None
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._next_id = 0
        self._broken: str | None = None
        self._powering_off = False
        self._qmp_stream: trio.SocketStream | None = None
        self._qmp_buf = bytearray()
        self._qmp_lock = trio.Lock()
        self._qmp_id = 0

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

    def console_text(self) -> str:
        """Everything the guest kernel and /init printed on ttyS0 so far."""
        return _read_text(self.console_log)

    def qemu_log_text(self) -> str:
        """QEMU's stdout and stderr so far."""
        return _read_text(self.qemu_log)

    def diagnostics(self, lines: int = 40) -> str:
        rc = self.returncode
        state = "running" if rc is None else f"exited with {rc}"
        return (f"[guest qemu={self.qemu_key} kernel={self.kernel_key}, QEMU "
                f"{'pid ' + str(self._proc.pid) if self._proc else 'not started'} {state}, "
                f"workdir {self.workdir}]\n"
                f"QEMU command: {shlex.join(self.argv)}\n"
                f"--- QEMU log (tail) ---\n{_tail(self.qemu_log_text(), lines)}\n"
                f"--- guest console (tail) ---\n{_tail(self.console_text(), lines)}")

    def _error(self, cls: type[GuestError], message: str, **kw: Any) -> GuestError:
        exc = cls(f"{message}\n{self.diagnostics()}", **kw)
        exc._vuser_diagnosed = True  # type: ignore[attr-defined]
        return exc

    # -- command channel

    async def _until_exit(self, fn: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run fn, but raise GuestExited as soon as QEMU exits."""
        assert self._proc is not None
        proc = self._proc
        outcome: list[Any] = []

        async with trio.open_nursery() as nursery:
            async def main() -> None:
                try:
                    outcome.append(("value", await fn()))
                except Exception as exc:   # re-raised below, outside the nursery
                    outcome.append(("error", exc))
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                await proc.wait()
                await trio.sleep(0.05)   # let the last bytes of output arrive
                nursery.cancel_scope.cancel()

            nursery.start_soon(main)
            nursery.start_soon(watch)
        if not outcome:
            raise self._error(GuestExited, f"QEMU exited with {proc.returncode} while {what}")
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value  # type: ignore[no-any-return]

    async def _readline(self) -> bytes:
        assert self._stream is not None
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[:i + 1]
                return line
            data = await self._stream.receive_some(1 << 16)
            if not data:
                await trio.sleep(0.2)   # usually QEMU is exiting: let its log settle
                raise self._error(GuestExited, "the guest command channel closed")
            self._buf += data

    async def _wait_ready(self) -> str:
        while True:
            line = await self._readline()
            if line.startswith(b"@@vuser-ready "):
                _, proto, release = line.decode(errors="replace").split(" ", 2)
                if proto != PROTOCOL:
                    raise self._error(GuestError, f"guest command server speaks protocol "
                                      f"{proto}, expected {PROTOCOL}: run scripts/provision")
                return release

    async def run(self, command: str, *, timeout: float = 60.0, input: bytes | str | None = None,
                  merge_stderr: bool = False, check: bool = False) -> CommandResult:
        """Run ``command`` with ``sh`` in the guest (cwd /, stdin ``input`` or
        empty) and return its status and output.  It is killed in the guest
        after ``timeout`` seconds (rounded up) and :class:`GuestTimeout` is
        raised.  ``merge_stderr`` sends stderr into stdout (like 2>&1).
        Commands run one at a time; concurrent calls queue."""
        if isinstance(input, str):
            input = input.encode()
        async with self._lock:
            if self._broken:
                raise self._error(GuestError, f"command channel unusable: {self._broken}")
            if self._stream is None:
                raise self._error(GuestError, "guest not booted")
            self._next_id += 1
            cid = self._next_id
            guest_timeout = max(1, math.ceil(timeout))
            request = (f"@@vuser-run {cid} {guest_timeout} {'m' if merge_stderr else 's'} "
                       f":{_b64(command.encode())} :{_b64(input or b'')}\n")
            t0 = time.monotonic()
            # Grace for QEMU and the serial line: output travels as base64 lines.
            with trio.move_on_after(guest_timeout + 15 + len(request) / 20000) as scope:
                await self._stream.send_all(request.encode())
                while True:
                    line = await self._until_exit(self._readline, f"running {command!r}")
                    if not line.startswith(b"@@vuser-result "):
                        continue
                    fields = line.decode("ascii", "replace").split(" ")
                    if len(fields) != 5 or fields[1] != str(cid):
                        continue
                    break
            duration = time.monotonic() - t0
            if scope.cancelled_caught:
                self._broken = f"no answer to {command!r} within {timeout}s"
                raise self._error(GuestTimeout, f"guest command timed out after "
                                  f"{duration:.1f}s (no answer): {command!r}")
            try:
                result = CommandResult(command, int(fields[2]),
                                       base64.b64decode(fields[3][1:], validate=True),
                                       base64.b64decode(fields[4][1:], validate=True), duration)
            except ValueError as exc:
                self._broken = "garbled answer"
                raise self._error(GuestError, f"garbled answer to {command!r}: {exc}") from None
        if result.returncode == 137 and duration >= guest_timeout - 0.5:
            raise self._error(GuestTimeout, f"guest command killed after {timeout}s: "
                              f"{command!r}\n--- stdout ---\n{_tail(result.stdout, 30)}\n"
                              f"--- stderr ---\n{_tail(result.stderr, 30)}", result=result)
        if check and result.returncode != 0:
            err = GuestCommandError(result)
            err.add_note(self.diagnostics(20))
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

    # -- QMP

    async def _qmp_readmsg(self) -> dict[str, Any]:
        assert self._qmp_stream is not None
        while True:
            i = self._qmp_buf.find(b"\n")
            if i >= 0:
                line = bytes(self._qmp_buf[:i])
                del self._qmp_buf[:i + 1]
                if line.strip():
                    msg: dict[str, Any] = json.loads(line)
                    if "event" in msg:
                        self.qmp_events.append(msg)
                        continue
                    return msg
                continue
            data = await self._qmp_stream.receive_some(1 << 16)
            if not data:
                raise self._error(GuestExited, "QMP connection closed")
            self._qmp_buf += data

    async def qmp(self, execute: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run a QMP command and return its "return" value (events seen on the
        way are appended to :attr:`qmp_events`)."""
        async with self._qmp_lock:
            with trio.fail_after(timeout):
                if self._qmp_stream is None:
                    self._qmp_stream = await trio.open_unix_socket(str(self.qmp_socket))
                    greeting = await self._qmp_readmsg()
                    if "QMP" not in greeting:
                        raise self._error(GuestError, f"unexpected QMP greeting {greeting}")
                    await self._qmp_exchange("qmp_capabilities", {})
                return await self._qmp_exchange(execute, arguments)

    async def _qmp_exchange(self, execute: str, arguments: Mapping[str, Any]) -> Any:
        assert self._qmp_stream is not None
        self._qmp_id += 1
        msg: dict[str, Any] = {"execute": execute, "id": self._qmp_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        await self._qmp_stream.send_all(json.dumps(msg).encode() + b"\n")
        while True:
            reply = await self._qmp_readmsg()
            if reply.get("id") != self._qmp_id:
                continue
            if "error" in reply:
                raise GuestError(f"QMP {execute}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

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
        if self._proc.returncode is None and self._stream is not None and not self._broken:
            self._powering_off = True
            self._next_id += 1
            request = f"@@vuser-run {self._next_id} 0 m :{_b64(b'poweroff -f')} :\n"
            try:
                with trio.move_on_after(5):
                    await self._stream.send_all(request.encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        return await self.wait_exit(timeout)

    async def _stop(self, graceful: bool, shutdown_timeout: float) -> None:
        """Make sure QEMU is gone: poweroff if asked, then SIGTERM/SIGKILL to
        its process group, and reap it.  Never raises, bounded in time."""
        proc = self._proc
        if proc is None:
            return
        if graceful and proc.returncode is None:
            try:
                await self.poweroff(shutdown_timeout)
            except GuestError:
                pass
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            if proc.returncode is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError:
                proc.send_signal(sig)
            with trio.move_on_after(wait):
                await proc.wait()
        for stream in (self._stream, self._qmp_stream):
            if stream is not None:
                try:
                    await stream.aclose()
                except Exception:
                    pass


@asynccontextmanager
async def boot_guest(qemu: str = "11", kernel: str = "sid", *, memory_mb: int = 512,
                     extra_args: Sequence[str] = (), kernel_cmdline_extra: str = "",
                     timeout: float = 120.0, smp: int = 1,
                     workdir: str | os.PathLike[str] | None = None,
                     keep_workdir: bool | None = None,
                     shutdown_timeout: float = 20.0) -> AsyncIterator[Guest]:
    """Boot a guest and yield a :class:`Guest` once its command server answers.

    ``qemu``: manifest key ("7.2", "11") or alias ("bookworm", "sid").
    ``kernel``: "bookworm" or "sid".  ``extra_args`` are appended to QEMU's
    command line (chardevs and devices of vhost-user back-ends, which must be
    listening before this is entered).  ``timeout`` bounds the boot.
    ``workdir``: directory for sockets and logs (default: a fresh temporary
    directory, removed afterwards unless ``keep_workdir`` or the environment
    variable VUSER_KEEP_GUEST is set).
    """
    qinfo = qemu_info(qemu)
    kinfo = kernel_info(kernel)
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
                        extra_args=extra_args, smp=smp)
    guest = Guest(qemu=qinfo, kernel=kinfo, workdir=wdir, argv=argv)
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    logf = open(guest.qemu_log, "wb")
    graceful = True
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
                guest._stream = trio.SocketStream(sock)
                release = await guest._until_exit(guest._wait_ready, "booting")
            if scope.cancelled_caught:
                raise guest._error(GuestTimeout, f"guest did not boot within {timeout}s")
            guest.boot_seconds = time.monotonic() - t0
            if release != guest.kernel_version:
                raise guest._error(GuestError, f"guest runs kernel {release}, manifest says "
                                   f"{guest.kernel_version}: run scripts/provision")
            yield guest
        except BaseException:
            graceful = False
            raise
        finally:
            with trio.CancelScope(shield=True):
                await guest._stop(graceful, shutdown_timeout)
    except BaseException as exc:
        if not getattr(exc, "_vuser_diagnosed", False) and not isinstance(
                exc, (trio.Cancelled, KeyboardInterrupt, GeneratorExit)):
            exc.add_note(guest.diagnostics())
            try:
                exc._vuser_diagnosed = True  # type: ignore[attr-defined]
            except AttributeError:
                pass
        raise
    finally:
        logf.close()
        listener.close()
        if made_dir and not keep_workdir:
            shutil.rmtree(wdir, ignore_errors=True)
