"""Runs one device: the vhost-user socket (server or client mode), the
optional control socket, and the status they share."""

from __future__ import annotations

import logging
from typing import Any

import trio

from .connection import Connection
from .control import serve_control
from .device import Device
from .transport import serve_client, serve_unix

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, device: Device, socket_path: str, *, client: bool = False,
                 control_path: str | None = None, ring_impl: str = "native") -> None:
        self.device = device
        self.socket_path = socket_path
        self.client = client
        self.control_path = control_path
        self.ring_impl = ring_impl
        self.connection: Connection | None = None
        self.connections = 0

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        conn = Connection(self.device, sock, ring_impl=self.ring_impl, name=f"{self.device.name}")
        self.connection = conn
        self.connections += 1
        try:
            await conn.serve()
        finally:
            self.connection = None

    def status(self) -> dict[str, Any]:
        dev = self.device
        out: dict[str, Any] = {
            "device": dev.name,
            "virtio_id": dev.virtio_id,
            "socket": self.socket_path,
            "mode": "client" if self.client else "server",
            "connections": self.connections,
            "offered_features": dev.feature_names(dev.offered_bits),
        }
        if self.connection is not None:
            out.update(self.connection.status())
        else:
            out.update({"connected": False, "queue_policy": dev.queue_policy,
                        "queues": dev.queue_layout(None).as_list(), "negotiated_features": None})
        device_status = dev.status()
        out["device_status"] = device_status
        # Device figures also at the top level (e.g. the balloon's target,
        # actual, bytes_released, stats), without shadowing generic keys.
        for key, value in device_status.items():
            out.setdefault(key, value)
        return out

    def control(self, command: str, args: list[str]) -> Any:
        if command == "status":
            return self.status()
        return self.device.control(command, args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.control_path:
                await nursery.start(serve_control, self.control_path, self.control)
            serve = serve_client if self.client else serve_unix
            await nursery.start(serve, self.socket_path, self._handle)
            task_status.started()


class RunnerGroup:
    """Several sockets served by one process (a multi-port device such as
    net: one Runner, so one Connection and one device, per socket), one
    control socket for all of them, and the devices' shared background work
    (``background``: ``async fn(task_status=...)`` run once, such as the net
    switch's tap readers).

    With one runner the control socket answers exactly as that runner's.
    """

    def __init__(self, runners: list[Runner], *, control_path: str | None = None,
                 background: list[Any] | None = None) -> None:
        if not runners:
            raise ValueError("a runner group needs at least one runner")
        self.runners = runners
        self.control_path = control_path
        self.background = list(background or [])

    def status(self) -> dict[str, Any]:
        if len(self.runners) == 1:
            return self.runners[0].status()
        first = self.runners[0].device
        sockets = []
        for r in self.runners:
            s = r.status()
            s.pop("device_status", None)
            sockets.append(s)
        return {"device": first.name, "sockets": sockets, "device_status": first.status()}

    def control(self, command: str, args: list[str]) -> Any:
        if command == "status":
            return self.status()
        return self.runners[0].device.control(command, args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for task in self.background:
                await nursery.start(task)
            for runner in self.runners:
                await nursery.start(runner.run)
            if self.control_path:
                await nursery.start(serve_control, self.control_path, self.control)
            task_status.started()
