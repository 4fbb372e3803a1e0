"""One front-end connection to a served device: the message loop.

Each message is framed (``stream``), checked and turned into an event by
the session (``protocol``), applied by the handler (``handler``), and
answered with the reply the session builds.  Messages are applied in
order, one at a time; queue tasks run beside the loop in the connection's
nursery (``queues``).

Error handling: a front-end that breaks the protocol (a ProtocolError, a
message that cannot be framed) ends this connection with one log line
naming the request and the fault.  Anything else that goes wrong while a
request is applied (a device hook raising, whatever the cause) ends the
connection the same way, with the traceback in the log; so does a failure
in a queue task or in the device's background task.  Nothing here ends
the process or touches another connection (``Runner`` adds a last resort
around the whole connection).

Resource handling: fds of a message the session refuses are closed here;
everything the handler took is closed by ``Handler.release`` when the
connection ends, however it ends.
"""

from __future__ import annotations

import logging

import trio

from . import wire
from .device import Device
from .events import ProtocolFeaturesSet
from .handler import Handler
from .protocol import ProtocolError, Session
from .ringstate import RingStateFile
from .stream import Message, MessageStream

log = logging.getLogger(__name__)


def new_session(device: Device) -> Session:
    return Session(
        offered_features=device.offered_bits,
        num_queues=device.max_queues,
        has_config=bool(device.config_fields),
        extra_protocol_features=device.protocol_features,
        queue_num=device.vhost_queue_num(),
        excluded_protocol_features=device.excluded_protocol_features,
    )


class DeviceConnection:
    """Serves ``device`` to the front-end on one connected socket."""

    def __init__(self, device: Device, sock: trio.socket.SocketType, *, ring_impl: str = "native",
                 name: str = "vhost-user", ring_state: RingStateFile | None = None,
                 force_dirty_log: bool = False) -> None:
        self.device = device
        self.name = name
        self.stream = MessageStream(sock, strict=True)
        self.session = new_session(device)
        self.handler = Handler(device, self.session, ring_impl=ring_impl, name=name, ring_state=ring_state,
                               force_dirty_log=force_dirty_log)
        self.messages = 0

    async def serve(self) -> None:
        """Run until the front-end disconnects or breaks the protocol."""
        log.info("%s: front-end connected (device %s)", self.name, self.device.name)
        try:
            async with trio.open_nursery() as nursery:
                self.handler.start(nursery)
                nursery.start_soon(self._run_device, nursery)
                try:
                    await self._loop()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.handler.release()
            log.info("%s: front-end disconnected", self.name)

    def _closing(self, request: str, fault: str) -> None:
        log.error("%s: closing connection: %s: %s", self.name, request, fault)

    async def _run_device(self, nursery: trio.Nursery) -> None:
        try:
            await self.device.run(self.handler)
        except Exception as exc:
            log.exception("%s: closing connection: device background task: %s: %s", self.name,
                          type(exc).__name__, exc)
            nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        while True:
            try:
                msg = await self.stream.recv()
            except wire.WireError as exc:
                self._closing(exc.request, exc.fault)
                return
            except OSError as exc:
                log.info("%s: connection error: %s", self.name, exc)
                return
            if msg is None:
                return
            self.messages += 1
            header = msg.header
            try:
                event = self.session.receive(header, msg.payload, msg.fds)
            except ProtocolError as exc:
                msg.close_fds()
                self._closing(exc.request, exc.fault)
                return
            self._trace(msg, event)
            try:
                result = await self.handler.apply(event)
                reply = self.session.reply(event, result)
            except ProtocolError as exc:
                self._closing(exc.request, exc.fault)
                return
            except Exception as exc:
                log.exception("%s: closing connection: %s: internal error: %s: %s", self.name,
                              event.request.name, type(exc).__name__, exc)
                return
            if reply is not None:
                try:
                    await self.stream.send(reply)
                except OSError as exc:
                    log.info("%s: cannot send reply to %s: %s", self.name, event.request.name, exc)
                    return

    def _trace(self, msg: Message, event: object) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        fields = {k: v for k, v in vars(event).items() if k not in ("request", "need_reply")}
        for key in ("features", "accepted"):
            if key in fields and isinstance(fields[key], int):
                fields[key] = f"{fields[key]:#x} {self.device.feature_names(fields[key])}"
        if isinstance(event, ProtocolFeaturesSet):
            fields["features"] = wire.protocol_feature_names(event.features)
        log.debug("%s: <- %s flags=%#x %s", self.name, wire.request_name(msg.request), msg.flags, fields)
