"""The devices of a test guest, served as ``vuser run`` serves them: in the
test's own process (quick to start; the device objects can be inspected) or
as a ``vuser run`` child process (exactly as in production).

A device is named as on the ``vuser run`` command line without the socket:
``"rng"``, ``"balloon --without FREE_PAGE_HINT"``, ``"net --mtu 9000"``.
:class:`DeviceSpec` adds what only the guest side needs (QEMU options, a
chardev that reconnects, the switch a net device joins).  Either way the
device has a control socket, and :meth:`ServedDevice.status` and
:meth:`ServedDevice.ctl` go through it, so a test sees exactly what
``vuser ctl PATH status`` prints.

Resource handling: :meth:`ServedDevice.start` and :meth:`ServedDevice.stop`
bracket the device's life; an in-process device runs in the nursery it is
given, in a cancel scope of its own.  Error handling: a spec that ``vuser
run`` would reject raises ValueError with its message, before anything
starts; a ``vuser run`` process that fails to start, or exits with a
non-zero status, raises :class:`VuserProcessError` with its log's tail;
a control socket that does not answer raises :class:`DeviceExited` with it.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import trio

from vuser.cli import UserError, create_devices, parse_run, qemu_args, runner_group
from vuser.control import call as control_call
from vuser.device import Device
from vuser.testing.child import read_text
from vuser.testing.errors import DeviceExited, tail
from vuser.testing.guest import Companion
from vuser.testing.options import check_serve
from vuser.testing.process import START_TIMEOUT, VuserProcess, vuser_command

__all__ = ["DeviceSpec", "InProcessDevice", "ProcessDevice", "ServedDevice",
           "as_spec", "served_device"]

# What the test kit decides for every device, so a spec may not.
OWNED_OPTIONS = ("--socket", "--control", "--client")
QEMU_ARGS_TIMEOUT = START_TIMEOUT   # a `vuser qemu-args` starts like a `vuser run`


@dataclass(frozen=True)
class DeviceSpec:
    """One device of a guest.

    ``spec``: ``vuser run`` arguments without the socket (``"balloon
    --stats-interval 1"``).  ``switch``: for net, the switch whose port the
    guest gets (guests naming the same switch share one ``vuser run net``).
    ``serve``: "process" or "in-process" (None: the guest's choice).
    ``qemu_opts``: appended to QEMU's ``-device`` value (``",mrg_rxbuf=off"``).
    ``reconnect``: seconds after which QEMU's chardev reconnects to a
    restarted back-end.  ``label``: the name ``guest.device()`` knows it by
    (default: the device type).  ``env``: variables added to the
    environment of its ``vuser run`` process (a process only, not a switch:
    e.g. a PYTHONPATH where a plugin's distribution lives).
    """

    spec: str
    switch: str | None = None
    serve: str | None = None
    qemu_opts: str = ""
    reconnect: int | None = None
    label: str | None = None
    env: Mapping[str, str] | None = None

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.spec)

    @property
    def kind(self) -> str:
        return self.argv[0]

    def check(self) -> None:
        argv = self.argv
        if not argv or argv[0].startswith("-"):
            raise ValueError(f"device {self.spec!r}: name the device first (rng, balloon, net ...)")
        owned = [a for a in argv if a.split("=", 1)[0] in OWNED_OPTIONS]
        if owned:
            raise ValueError(f"device {self.spec!r}: {', '.join(owned)} is the test kit's to choose")
        if self.serve is not None:
            check_serve(self.serve, f"device {self.spec!r}: serve")
        if self.env is not None and (self.serve == "in-process" or argv[0] == "net"):
            raise ValueError(f"device {self.spec!r}: env= is for a device's own `vuser run` process")


def as_spec(device: str | DeviceSpec) -> DeviceSpec:
    spec = DeviceSpec(device) if isinstance(device, str) else device
    spec.check()
    return spec


class ServedDevice:
    """What one ``vuser run DEVICE --socket ... --control PATH`` serves: a
    device per socket, one control socket.  ``guest.device(label)``."""

    serve = ""

    def __init__(self, label: str, argv: Sequence[str], sockets: Sequence[Path], control: Path,
                 log_path: Path) -> None:
        self.label = label
        self.argv = list(argv)
        self.kind = self.argv[0]
        self.sockets = list(sockets)
        self.control = control
        self.log_path = log_path
        cmdline = [*self.argv, *(a for s in self.sockets for a in ("--socket", str(s))),
                   "--control", str(control)]
        try:
            self.args: argparse.Namespace = parse_run(cmdline)
        except UserError as exc:
            raise ValueError(f"device {shlex.join(self.argv)!r}: {exc}") from None

    @property
    def name(self) -> str:
        return f"`vuser run {self.kind}` ({self.label}, {self.serve})"

    # -- control

    async def ctl(self, command: str, *args: str, timeout: float = 10.0) -> Any:
        """``vuser ctl CONTROL COMMAND ARGS``: its result (ControlError if
        the device refused the command)."""
        try:
            return await control_call(str(self.control), command, list(args), timeout=timeout)
        except (OSError, trio.TooSlowError) as exc:
            raise DeviceExited(f"{self.name}: no answer on {self.control} "
                               f"({type(exc).__name__}: {exc})\n{self.log_tail()}") from None

    async def status(self) -> dict[str, Any]:
        """The JSON object ``vuser ctl CONTROL status`` prints."""
        status: dict[str, Any] = await self.ctl("status")
        return status

    # -- QEMU

    def _devices_for_qemu(self) -> tuple[list[Device], bool]:
        """Device objects to ask for QEMU arguments, and whether to close them."""
        raise NotImplementedError

    async def qemu_args(self, port: int, *, qemu_version: str, chardev_id: str,
                        reconnect: int | None = None, qemu_opts: str = "") -> list[str]:
        """QEMU's ``-chardev`` and device arguments for socket ``port``
        (``qemu_opts`` appended to the ``-device`` value)."""
        args = await self._qemu_args(port, qemu_version, chardev_id, reconnect)
        if qemu_opts:
            last = max(i for i, a in enumerate(args) if a == "-device") + 1
            args[last] += qemu_opts
        return args

    async def _qemu_args(self, port: int, qemu_version: str, chardev_id: str,
                         reconnect: int | None) -> list[str]:
        """What the plugin says, from device objects (``vuser qemu-args``'s
        own function)."""
        devices, close = self._devices_for_qemu()
        try:
            return qemu_args(self.args.plugin, devices[port], str(self.sockets[port]),
                             qemu_version=qemu_version, memory=None, chardev_id=chardev_id,
                             reconnect=reconnect)
        finally:
            if close:
                self.args.plugin.close(devices)

    # -- diagnostics and life cycle

    def log_tail(self, lines: int = 25) -> str:
        return f"--- {self.name} log {self.log_path} (tail) ---\n{tail(read_text(self.log_path), lines)}"

    def companion(self) -> Companion | None:
        """What the guest watches: this device's process exiting unasked."""
        return None

    @property
    def instances(self) -> list[Device]:
        """The device objects (in-process devices only)."""
        raise TypeError(f"{self.name} runs in a process of its own: its device objects are not "
                        "here (serve='in-process' makes them inspectable)")

    async def start(self, nursery: trio.Nursery) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class InProcessDevice(ServedDevice):
    """Served by the test's own trio loop, in ``nursery`` (its log goes to
    the ``vuser`` logger, whose records the caller writes to ``log_path``)."""

    serve = "in-process"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._devices: list[Device] = []
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    def _devices_for_qemu(self) -> tuple[list[Device], bool]:
        return self._devices, False

    @property
    def instances(self) -> list[Device]:
        return list(self._devices)

    async def start(self, nursery: trio.Nursery) -> None:
        try:
            self._devices = create_devices(self.args.plugin, self.args, [str(s) for s in self.sockets])
        except UserError as exc:
            raise ValueError(f"device {shlex.join(self.argv)!r}: {exc}") from None
        group = runner_group(self.args.plugin, self._devices, self.args)

        async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with self._scope:
                    await group.run(task_status=task_status)
            finally:
                self.args.plugin.close(self._devices)
                self._done.set()

        await nursery.start(serve)

    async def stop(self) -> None:
        self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._done.wait()


class ProcessDevice(ServedDevice):
    """A ``vuser run`` child process (stdout and stderr in ``log_path``)."""

    serve = "process"

    def __init__(self, *args: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env = dict(env or {})
        self._process: VuserProcess | None = None
        self._starts = 0
        self._on_purpose = False   # stopped or killed by the test, not by itself
        self._restarted = trio.Event()

    @property
    def process(self) -> VuserProcess:
        assert self._process is not None, "not started"
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def _devices_for_qemu(self) -> tuple[list[Device], bool]:
        # The process owns the devices; objects made here only answer for
        # QEMU's arguments.  Options that take host resources (net's taps and
        # pcap file) are the process's alone: left out of these.
        dry = argparse.Namespace(**vars(self.args))
        for option, empty in (("tap", []), ("pcap", None)):
            if hasattr(dry, option):
                setattr(dry, option, empty)
        try:
            return create_devices(self.args.plugin, dry, [str(s) for s in self.sockets]), True
        except UserError as exc:
            raise ValueError(f"device {shlex.join(self.argv)!r}: {exc}") from None

    async def _qemu_args(self, port: int, qemu_version: str, chardev_id: str,
                         reconnect: int | None) -> list[str]:
        if not self.env:
            return await super()._qemu_args(port, qemu_version, chardev_id, reconnect)
        # Options may name what only the process's environment has (a
        # balloon policy from a distribution on its PYTHONPATH): there,
        # `vuser qemu-args` answers.
        argv = [*vuser_command(), "qemu-args", self.kind, "--socket", str(self.sockets[port]), "--no-memory",
                "--qemu-version", qemu_version, "--chardev-id", chardev_id,
                *(["--reconnect", str(reconnect)] if reconnect is not None else []), *self.argv[1:]]
        with trio.fail_after(QEMU_ARGS_TIMEOUT):
            proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                          env={**os.environ, **self.env})
        if proc.returncode != 0:
            raise ValueError(f"{shlex.join(argv)}: {proc.stderr.decode(errors='replace').strip()}")
        return shlex.split(proc.stdout.decode())

    def _describe(self) -> str:
        return f"{self.name} (pid {self.process.pid}) exited with status {self.process.returncode}"

    async def _died(self) -> None:
        """Returns once the process exits without the test asking for it."""
        while True:
            process, restarted = self.process, self._restarted
            await process.wait()
            if not self._on_purpose:
                return
            await restarted.wait()

    def companion(self) -> Companion | None:
        return (self._died, self._describe)

    async def start(self, nursery: trio.Nursery | None = None) -> None:
        """Start (or, after :meth:`kill`, start again) the process; ready
        when its sockets listen and its control socket answers."""
        log_path = self.log_path if self._starts == 0 else self.log_path.with_suffix(f".{self._starts}.log")
        self._starts += 1
        process = VuserProcess(self.kind, self.sockets, control=self.control, args=self.argv[1:],
                               log_path=log_path, env={**os.environ, **self.env} if self.env else None)
        await process.__aenter__()
        self._process, self._on_purpose = process, False
        self._restarted.set()
        self._restarted = trio.Event()

    async def kill(self) -> int:
        """SIGKILL (a crash, as the front-end sees it); the guest does not
        count it as the device dying.  Its exit status."""
        self._on_purpose = True
        return await self.process.kill()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL; VuserProcessError if it exited with a
        non-zero status (on its own, or when asked to stop)."""
        if self._process is None:
            return
        if self._on_purpose and self._process.returncode is not None:
            return   # killed by the test and not started again
        self._on_purpose = True
        await self._process.__aexit__(None, None, None)


def served_device(serve: str, label: str, argv: Sequence[str], sockets: Sequence[Path],
                  control: Path, log_path: Path, env: Mapping[str, str] | None = None) -> ServedDevice:
    """A device served the ``serve`` way ("process" or "in-process");
    ``env`` extends a process's environment."""
    if serve == "process":
        return ProcessDevice(label, argv, sockets, control, log_path, env=env)
    if env:
        raise ValueError(f"{label}: env= needs serve='process'")
    return InProcessDevice(label, argv, sockets, control, log_path)
