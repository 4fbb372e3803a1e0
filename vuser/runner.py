"""Runs devices: one vhost-user socket per device instance (server or client
mode), the optional control socket, and the status and commands they share.

Control commands: ``status`` (``vuser.status``), ``commands`` (what this
process answers to), ``record`` and ``sample`` (time series,
``vuser.recorder``), and the commands of the device's plugin
(``vuser.plugin.Command``), run on the device instances in socket order.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Sequence

import trio

from .connection import DeviceConnection
from .control import serve_control
from .device import Device
from .plugin import BackgroundTask, CommandError, DevicePlugin
from .recorder import Recorder
from .ringstate import RingStateFile
from .status import group_status, socket_status
from .transport import serve_client, serve_inherited, serve_unix

log = logging.getLogger(__name__)


# Commands every device answers, besides its plugin's.
_GENERIC = (
    {"name": "status", "usage": "status", "help": "connection, features, queues, device"},
    {"name": "record", "usage": "record FILE [--interval S] | record stop | record",
     "help": "write a time series (JSON lines) to FILE until 'record stop'"},
    {"name": "sample", "usage": "sample [CURSOR]", "help": "one row of the time series"},
)


class Runner:
    """Serves one device on one socket (one front-end at a time)."""

    def __init__(self, device: Device, socket_path: str, *, client: bool = False,
                 control_path: str | None = None, ring_impl: str = "native",
                 plugin: DevicePlugin[Any] | None = None, peer_uids: Sequence[int] | None = None,
                 ring_state: str | None = None, fd: int | None = None,
                 force_dirty_log: bool = False) -> None:
        """``ring_state``: a file where packed rings keep their state across
        vuser restarts (``vuser.ringstate``); None: kept in memory only.
        ``fd``: serve the listening socket inherited as this fd (``--fd``)
        instead of listening on ``socket_path`` (then only a name).
        ``force_dirty_log``: log as if migrating, always (``Handler``)."""
        self.device = device
        self.ring_state = None if ring_state is None or ring_impl != "native" else \
            RingStateFile(ring_state, device.max_queues)
        self.peer_uids = peer_uids
        self.socket_path = socket_path
        self.client = client
        self.fd = fd
        self.control_path = control_path
        self.ring_impl = ring_impl
        self.force_dirty_log = force_dirty_log
        self.plugin = plugin
        self.connection: DeviceConnection | None = None
        self.connections = 0
        self._group: RunnerGroup | None = None

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        """Serve one connection.  Last resort (one connection is one fault
        domain): whatever escapes it is logged with its traceback and ends
        that connection only; the next one is served."""
        conn = DeviceConnection(self.device, sock, ring_impl=self.ring_impl, name=self.device.name,
                                ring_state=self.ring_state, force_dirty_log=self.force_dirty_log)
        self.connection = conn
        self.connections += 1
        try:
            await conn.serve()
        except* Exception as group:
            for exc in group.exceptions:
                log.error("%s: connection ended by an unexpected error: %s: %s", self.device.name,
                          type(exc).__name__, exc, exc_info=exc)
        finally:
            self.connection = None

    def status(self, with_device: bool = True) -> dict[str, Any]:
        return socket_status(self.device, self.socket_path, client=self.client, connections=self.connections,
                             conn=self.connection, with_device=with_device)

    @property
    def group(self) -> RunnerGroup:
        """This runner as a group of one: the control commands it answers."""
        if self._group is None:
            self._group = RunnerGroup([self], plugin=self.plugin)
        return self._group

    def control(self, command: str, args: list[str]) -> Any:
        return self.group.control(command, args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.control_path:
                await nursery.start(self.group.recorder.run)
                await nursery.start(serve_control, self.control_path, self.control)
            if self.fd is not None:
                await nursery.start(serve_inherited, self.fd, self._handle)
            elif self.client:
                await nursery.start(partial(serve_client, peer_uids=self.peer_uids), self.socket_path,
                                    self._handle)
            else:
                await nursery.start(serve_unix, self.socket_path, self._handle)
            task_status.started()


class RunnerGroup:
    """Several sockets served by one process (a multi-port device such as
    net: one Runner, so one connection and one device, per socket), one
    control socket for all of them, and the devices' shared background work
    (``background``: ``async fn(task_status=...)`` run once, such as the net
    switch's tap readers).

    With one runner the control socket answers exactly as that runner's.
    """

    def __init__(self, runners: Sequence[Runner], *, control_path: str | None = None,
                 background: Sequence[BackgroundTask] = (), plugin: DevicePlugin[Any] | None = None) -> None:
        if not runners:
            raise ValueError("a runner group needs at least one runner")
        self.runners = list(runners)
        self.control_path = control_path
        self.background = list(background)
        if plugin is None:
            from .registry import plugin_for
            plugin = plugin_for(self.runners[0].device)
        self.plugin = plugin
        self.recorder = Recorder(self.sample)

    @property
    def devices(self) -> list[Device]:
        return [r.device for r in self.runners]

    def status(self) -> dict[str, Any]:
        if len(self.runners) == 1:
            return self.runners[0].status()
        return group_status([r.status(with_device=False) for r in self.runners], self.runners[0].device)

    def sample(self, since: Any = None) -> dict[str, Any]:
        """One row of the time series (``vuser.recorder``)."""
        return {"time": time.time(), "device": self.plugin.name, **self.plugin.sample(self.devices, since)}

    def control(self, command: str, args: list[str]) -> Any:
        if command == "status":
            if args:
                raise CommandError("status takes no arguments")
            return self.status()
        if command == "commands":
            return [*_GENERIC, *(c.describe() for c in self.plugin.commands)]
        if command == "record":
            return self.recorder.control(args)
        if command == "sample":
            if len(args) > 1 or (args and not args[0].isdigit()):
                raise CommandError("usage: sample [CURSOR] (CURSOR: the cursor of the previous row)")
            return self.sample(int(args[0]) if args else None)
        found = self.plugin.command(command)
        if found is None:
            known = ", ".join([*(c["name"] for c in _GENERIC), *(c.name for c in self.plugin.commands)])
            raise CommandError(f"{self.plugin.name}: unknown command {command!r} (commands: {known})")
        return found(self.devices, args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for task in self.background:
                await nursery.start(task)
            for runner in self.runners:
                await nursery.start(runner.run)
            if self.control_path:
                await nursery.start(self.recorder.run)
                await nursery.start(serve_control, self.control_path, self.control)
            task_status.started()
