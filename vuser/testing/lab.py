"""Real-guest test sessions: Linux guests booted with vuser devices, a
test's own files and Debian packages, guests talking over vuser's switch.
This is the ``vuser_guest`` pytest fixture's machinery
(:mod:`vuser.testing.pytest_plugin`); scripts use it directly::

    async with open_lab() as lab:
        async with lab("rng", qemu="7.2") as guest:
            result = await guest.run("head -c 16 /dev/hwrng | wc -c", timeout=30)
            assert result.stdout.strip() == "16"
            print(await guest.device("rng").status())

A :class:`Lab` is one test's worth of guests: one work folder (sockets,
consoles, logs; under /tmp, where socket paths stay short), the switches its
guests share, and the nursery in-process devices and guests live in (none
around the test's own code, so its exceptions reach it unwrapped).

Resource handling: leaving a guest's ``async with`` powers the guest off
(kills it at once if the body raised) and stops its device processes; the
lab stops its switches at its end.  Every step is bounded in time and runs
shielded from cancellation, so nothing is left running after a test that
failed or was interrupted.  The work folder is removed at the end unless
the lab failed (``Lab.failed``: an exception left ``open_lab``, a switch
did not stop cleanly, or the pytest plugin saw the test fail) or ``keep``;
every error names it.

Error handling: a failing command (``run(..., check=True)`` or
:meth:`Guest.check`), a guest that does not boot, a device process that
dies: each raises an error whose message carries the tail of the guest
console, of QEMU's log and of every device log, and the work folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, AsyncIterator, Mapping, Sequence

import trio

from vuser.testing.errors import is_diagnosed, mark_diagnosed
from vuser.testing.guest import DEFAULT_KERNEL, DEFAULT_QEMU, Guest, boot_guest
from vuser.testing.manifest import cache_dir, kernel_info, qemu_info
from vuser.testing.overlay import StrPath, files_archive
from vuser.testing.provision.cpio import concatenate
from vuser.testing.provision.packages import package_image
from vuser.testing.options import DEFAULT_SERVE, check_serve
from vuser.testing.served import DeviceSpec, ServedDevice, as_spec, served_device
from vuser.testing.switches import DEFAULT_PORTS, Switch

__all__ = ["GuestSession", "Lab", "Terminated", "VuserGuest", "open_lab"]

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 120.0
NET_UP_TIMEOUT = 30    # seconds for the guest's interfaces to get their carrier


def memory_mib(memory: str | int) -> int:
    """"512M", "1G" or a number of MiB."""
    m = re.fullmatch(r"(\d+)\s*([MG]i?B?)?", str(memory).strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"memory={memory!r}: say 512M, 1G or a number of MiB")
    return int(m[1]) * (1024 if (m[2] or "M").upper().startswith("G") else 1)


class VuserGuest(Guest):
    """A guest of a :class:`Lab`: a :class:`Guest` (``run``, ``check``,
    ``write_file``, ``pid``, ``console_text`` ...) that also knows its
    devices and its addresses."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = ""
        self.devices: dict[str, ServedDevice] = {}
        self.addresses: dict[str, str] = {}   # switch name -> the guest's IPv4 address
        self.ports: dict[str, int] = {}       # switch name -> the guest's port on it

    def device(self, label: str) -> ServedDevice:
        """The device ``label`` (its type, e.g. "balloon"; "rng#2" for a
        second one): ``await guest.device("balloon").status()``."""
        try:
            return self.devices[label]
        except KeyError:
            raise KeyError(f"guest {self.name} has no device {label!r} (it has "
                           f"{', '.join(self.devices) or 'none'})") from None

    @property
    def ip(self) -> str:
        """The guest's address on its one switch."""
        if len(self.addresses) != 1:
            raise ValueError(f"guest {self.name} is on {len(self.addresses)} switches: "
                             "use guest.addresses[switch]")
        return next(iter(self.addresses.values()))


class _Keeper:
    """Holds one guest's boot_guest context in a task of the lab's nursery,
    so that several guests boot at once and the test's body runs in no
    nursery of ours.  Errors come back through ``error``."""

    def __init__(self) -> None:
        self.guest: VuserGuest | None = None
        self.error: Exception | None = None
        self.ready = trio.Event()
        self.leave = trio.Event()
        self.done = trio.Event()

    async def run(self, kwargs: dict[str, Any]) -> None:
        try:
            async with boot_guest(**kwargs, guest_type=VuserGuest) as guest:
                assert isinstance(guest, VuserGuest)
                self.guest = guest
                self.ready.set()
                await self.leave.wait()
        except Exception as exc:   # handed to the test's task
            self.error = exc
        finally:
            self.ready.set()
            self.done.set()


class GuestSession:
    """``async with lab(...) as guest``: one guest's devices, boot and end."""

    def __init__(self, lab: Lab, devices: Sequence[str | DeviceSpec], *, qemu: str, kernel: str,
                 memory: str | int, files: Mapping[str, StrPath] | None,
                 packages: Sequence[str] | None, switch: str | None, serve: str | None,
                 name: str | None, cmdline: str, smp: int, qemu_args: Sequence[str],
                 boot_timeout: float) -> None:
        self.lab = lab
        self.specs = [as_spec(d) for d in devices]
        self.qemu, self.kernel = qemu, kernel
        self.memory_mb = memory_mib(memory)
        self.files = dict(files or {})
        self.packages = list(packages or [])
        self.switch = switch
        self.serve = None if serve is None else check_serve(serve)
        self.name = name
        self.cmdline, self.smp, self.qemu_args = cmdline, smp, list(qemu_args)
        self.boot_timeout = boot_timeout
        self.own: list[ServedDevice] = []      # devices started for this guest alone
        self.switches: list[Switch] = []
        self.keeper: _Keeper | None = None
        self.guest: VuserGuest | None = None
        self.claimed = ""

    # -- the steps of a boot

    async def _devices(self, gdir: Path, name: str) -> list[tuple[str, ServedDevice, int, DeviceSpec]]:
        """Start this guest's devices and take its switch ports: (label,
        device, socket index, spec) in QEMU order."""
        attached = []
        labels: set[str] = set()
        for spec in self.specs:
            label = spec.label or spec.kind
            n = 2
            while label in labels:
                label, n = f"{spec.label or spec.kind}#{n}", n + 1
            labels.add(label)
            serve = spec.serve or self.serve or self.lab.serve
            if spec.kind == "net":
                switch = self.lab.switch(spec.switch or self.switch or f"{name}-net", spec=spec.spec,
                                         serve=serve)
                switch.agrees(spec.argv)
                port = switch.take(name)
                self.switches.append(switch)
                device = await switch.start(self.lab.nursery, self.lab.in_process_log())
                attached.append((label, device, port, spec))
                continue
            log_path = (self.lab.in_process_log() if serve == "in-process"
                        else gdir / f"{label.replace('#', '-')}.log")
            stem = gdir / label.replace("#", "-")
            device = served_device(serve, label, spec.argv, [stem.with_suffix(".sock")],
                                   stem.with_suffix(".ctl"), log_path, env=spec.env)
            self.own.append(device)
            await device.start(self.lab.nursery)
            attached.append((label, device, 0, spec))
        return attached

    async def _initramfs(self, gdir: Path) -> Path | None:
        """The kernel's image plus the test's files and packages, if any."""
        if not self.files and not self.packages:
            return None
        parts = [Path(kernel_info(self.kernel)["initramfs"])]
        if self.packages:
            image = await trio.to_thread.run_sync(package_image, cache_dir(), self.packages)
            parts.append(image.path)
        if self.files:
            (gdir / "files.cpio").write_bytes(files_archive(self.files))
            parts.append(gdir / "files.cpio")
        out = gdir / "initramfs.cpio"
        concatenate(parts, out)
        return out

    async def _configure_net(self, guest: VuserGuest) -> None:
        """Address each switch port's interface (found by its MAC) and wait
        for its carrier."""
        lines = []
        for switch in self.switches:
            port = switch.owners.index(guest.name)
            guest.ports[switch.name] = port
            guest.addresses[switch.name] = switch.address(port)
            lines.append(f"up {switch.mac(port)} {switch.address(port)}/24")
        if lines:
            await guest.check(_NET_SCRIPT + "\n".join(lines), timeout=NET_UP_TIMEOUT)

    # -- async with

    async def __aenter__(self) -> VuserGuest:
        lab = self.lab
        name = self.claimed = lab._claim_name(self.name)
        gdir = lab.workdir / name
        gdir.mkdir()
        try:
            qemu_key = qemu_info(self.qemu)["key"]
            attached = await self._devices(gdir, name)
            extra: list[str] = []
            for k, (_, device, port, spec) in enumerate(attached):
                extra += await device.qemu_args(port, qemu_version=qemu_key, chardev_id=f"vu{k}",
                                          reconnect=spec.reconnect, qemu_opts=spec.qemu_opts)
            companions = [c for c in (d.companion() for _, d, _, _ in attached) if c is not None]
            initramfs = await self._initramfs(gdir)
            kwargs = dict(qemu=self.qemu, kernel=self.kernel, memory_mb=self.memory_mb,
                          extra_args=[*extra, *self.qemu_args], kernel_cmdline_extra=self.cmdline,
                          timeout=self.boot_timeout, smp=self.smp, workdir=gdir, keep_workdir=True,
                          initramfs=initramfs, watch=companions,
                          extra_diagnostics=lambda: lab.diagnostics([d for _, d, _, _ in attached]))
            keeper = self.keeper = _Keeper()
            lab.nursery.start_soon(keeper.run, kwargs)
            await keeper.ready.wait()
            if keeper.error is not None:
                raise keeper.error
            guest = keeper.guest
            assert guest is not None
            guest.name = name
            guest.devices = {label: device for label, device, _, _ in attached}
            await self._configure_net(guest)
        except BaseException:
            await self._end(failed=True)
            raise
        self.guest = guest
        return guest

    async def _end(self, failed: bool) -> list[Exception]:
        """Power off (or kill) the guest, stop its devices, free its ports;
        the problems met on the way.  Shielded, bounded."""
        problems: list[Exception] = []
        with trio.CancelScope(shield=True):
            keeper = self.keeper
            if keeper is not None:
                if keeper.guest is not None and failed:
                    keeper.guest.graceful_stop = False
                keeper.leave.set()
                await keeper.done.wait()
            for device in reversed(self.own):
                try:
                    await device.stop()
                except Exception as exc:
                    problems.append(exc)
            for switch in self.switches:
                switch.release(self.claimed)
        return problems

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        guest = self.guest
        if isinstance(exc, Exception) and guest is not None and not is_diagnosed(exc):
            exc.add_note(guest.diagnostics())
            mark_diagnosed(exc)
        problems = await self._end(failed=exc is not None)
        if problems and exc is None:
            raise problems[0]
        if problems and isinstance(exc, Exception):
            exc.add_note("\n".join(str(p) for p in problems))


_NET_SCRIPT = r"""set -e
up() {
    dev=$(grep -l "^$1\$" /sys/class/net/*/address | cut -d/ -f5)
    [ -n "$dev" ] || { echo "no interface with MAC $1" >&2; exit 1; }
    ip addr add "$2" dev "$dev"
    ip link set "$dev" up
    i=0
    until [ "$(cat /sys/class/net/$dev/carrier)" = 1 ]; do
        i=$((i + 1)); [ $i -le 200 ] || { echo "$dev: no carrier" >&2; exit 1; }; sleep 0.1
    done
}
"""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while guests ran: raised like Ctrl-C's KeyboardInterrupt,
    so every guest and device is stopped on the way out."""


async def _interrupt_on_sigterm() -> None:
    """A CI job's timeout sends SIGTERM, which by default ends Python on the
    spot and leaves QEMU and ``vuser run`` (in sessions of their own)
    running; while a lab is open it interrupts the run instead.  Only the
    main thread can receive signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            raise Terminated("SIGTERM: stopping the guests")


class Lab:
    """One test's guests, switches and work folder (see the module).
    Calling it gives a guest: ``async with lab("rng") as guest``."""

    def __init__(self, nursery: trio.Nursery, workdir: Path, *, serve: str = DEFAULT_SERVE,
                 keep: bool = False) -> None:
        self.nursery = nursery
        self.workdir = workdir
        self.serve = check_serve(serve)
        self.keep = keep
        self.failed = False
        self.switches: dict[str, Switch] = {}
        self._names: set[str] = set()
        self._log_handler: logging.Handler | None = None
        self._log_level: int | None = None

    def __call__(self, *devices: str | DeviceSpec, qemu: str = DEFAULT_QEMU,
                 kernel: str = DEFAULT_KERNEL, memory: str | int = "512M",
                 files: Mapping[str, StrPath] | None = None, packages: Sequence[str] | None = None,
                 switch: str | None = None, serve: str | None = None, name: str | None = None,
                 cmdline: str = "", smp: int = 1, qemu_args: Sequence[str] = (),
                 boot_timeout: float = BOOT_TIMEOUT) -> GuestSession:
        """A guest to boot with ``async with``.

        ``devices``: ``vuser run`` specs without the socket (``"rng"``,
        ``"balloon --without FREE_PAGE_HINT"``, ``"net"``) or
        :class:`DeviceSpec`.  ``qemu``: "7.2" or "11"; ``kernel``:
        "bookworm" or "sid"; ``memory``: guest RAM ("512M").  ``files``:
        guest path -> host file or folder, in the guest from boot (modes
        kept).  ``packages``: Debian packages unpacked into the guest with
        the libraries they need.  ``switch``: the switch of its net devices
        (default: one of its own).  ``serve``: "process" or "in-process"
        (default: the lab's).  ``name``: for logs and switch ports.
        ``cmdline``: added to the kernel command line; ``smp``: vCPUs;
        ``qemu_args``: added to QEMU's.  ``boot_timeout`` bounds the boot.
        """
        return GuestSession(self, devices, qemu=qemu, kernel=kernel, memory=memory, files=files,
                            packages=packages, switch=switch, serve=serve, name=name,
                            cmdline=cmdline, smp=smp, qemu_args=qemu_args, boot_timeout=boot_timeout)

    def switch(self, name: str, *, ports: int = DEFAULT_PORTS, tap: bool = False, spec: str = "net",
               serve: str | None = None) -> Switch:
        """The switch ``name``, declared with these options on first use
        (later calls return it as it is)."""
        if name not in self.switches:
            self.switches[name] = Switch(name, len(self.switches), self.workdir, ports=ports, tap=tap,
                                         spec=spec, serve=serve or self.serve)
        return self.switches[name]

    @asynccontextmanager
    async def together(self, *sessions: GuestSession) -> AsyncIterator[list[VuserGuest]]:
        """Boot several guests at once: ``async with lab.together(lab("net",
        switch="lan"), lab("net", switch="lan")) as (a, b)``."""
        guests: list[VuserGuest | None] = [None] * len(sessions)
        errors: list[Exception] = []

        async def enter(i: int) -> None:
            try:
                guests[i] = await sessions[i].__aenter__()
            except Exception as exc:   # re-raised below, unwrapped
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(sessions)):
                nursery.start_soon(enter, i)
        entered = [s for s, g in zip(sessions, guests) if g is not None]
        if errors:
            for session in reversed(entered):
                await session.__aexit__(type(errors[0]), errors[0], None)
            raise errors[0]
        try:
            yield [g for g in guests if g is not None]
        except BaseException as exc:
            for session in reversed(entered):
                await session.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        problems: list[Exception] = []
        for session in reversed(entered):
            try:
                await session.__aexit__(None, None, None)
            except Exception as exc:
                problems.append(exc)
        if problems:
            raise problems[0]

    # -- shared by the guests

    def _claim_name(self, name: str | None) -> str:
        if name is None:
            name = next(f"guest{i}" for i in range(len(self._names) + 1) if f"guest{i}" not in self._names)
        if name in self._names or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
            raise ValueError(f"guest name {name!r}: taken, or not 1-32 letters, digits, '.', '_', '-'")
        self._names.add(name)
        return name

    def in_process_log(self) -> Path:
        """Where the records of vuser's loggers go while devices are served
        in-process (set up on first use)."""
        path = self.workdir / "in-process.log"
        if self._log_handler is None:
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger = logging.getLogger("vuser")
            self._log_level = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
            logger.addHandler(handler)
            self._log_handler = handler
        return path

    def diagnostics(self, devices: Sequence[ServedDevice]) -> str:
        """Device logs' tails and the folder with everything, for errors."""
        seen: set[Path] = set()
        parts = []
        for device in devices:
            if device.log_path not in seen:
                seen.add(device.log_path)
                parts.append(device.log_tail())
        parts.append(f"[logs: {self.workdir} (kept when the test fails)]")
        return "\n".join(parts)

    async def aclose(self, *, cleanup: bool = True) -> None:
        """Stop the switches, then (with ``cleanup``) :meth:`tidy`."""
        problems: list[Exception] = []
        with trio.CancelScope(shield=True):
            for switch in self.switches.values():
                try:
                    await switch.stop()
                except Exception as exc:
                    problems.append(exc)
        if self._log_handler is not None:
            logger = logging.getLogger("vuser")
            logger.removeHandler(self._log_handler)
            self._log_handler.close()
            if self._log_level is not None:
                logger.setLevel(self._log_level)
        if problems:
            self.failed = True
        if cleanup:
            self.tidy()
        if problems:
            raise problems[0]

    def tidy(self) -> bool:
        """Remove the work folder unless the lab failed or keeps it; whether
        it was kept."""
        if self.failed or self.keep:
            log.warning("vuser guest logs kept in %s", self.workdir)
            return True
        shutil.rmtree(self.workdir, ignore_errors=True)
        return False


@asynccontextmanager
async def open_lab(*, serve: str = DEFAULT_SERVE, keep: bool | None = None,
                   workdir: StrPath | None = None, cleanup: bool = True) -> AsyncIterator[Lab]:
    """A :class:`Lab` for the body.  ``serve``: how devices are served
    unless a guest says otherwise.  ``keep``: keep the work folder even
    when all went well (default: the environment variable VUSER_KEEP_GUEST).
    ``workdir``: an empty folder to use instead of a new one in /tmp.
    ``cleanup=False`` leaves :meth:`Lab.tidy` to the caller (the pytest
    plugin, which learns whether the test failed only after the body)."""
    path = Path(tempfile.mkdtemp(prefix="vuser-lab-") if workdir is None else workdir)
    path.mkdir(parents=True, exist_ok=True)
    if keep is None:
        keep = bool(os.environ.get("VUSER_KEEP_GUEST"))
    async with trio.open_nursery() as nursery:
        lab = Lab(nursery, path, serve=serve, keep=keep)
        nursery.start_soon(_interrupt_on_sigterm)
        try:
            yield lab
        except BaseException:
            lab.failed = True
            raise
        finally:
            try:
                await lab.aclose(cleanup=cleanup)
            finally:
                nursery.cancel_scope.cancel()

