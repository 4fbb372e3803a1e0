"""The front-end's end of the back-end channel (SET_BACKEND_REQ_FD).

The back-end sends requests here (CONFIG_CHANGE_MSG above all).  Each one
is decoded, recorded, counted, passed to an optional handler and, when it
carries NEED_REPLY, answered with a REPLY_ACK: 0 for what was handled, 1
otherwise — as QEMU's backend_read does.

Resource handling: fds arriving with a request are closed once it is
recorded.  The channel socket is closed by ``close()`` (or when a new one
replaces it).

Error handling: a malformed or truncated message ends serving that channel
and is kept in ``error``; it never disturbs the main socket.
"""

from __future__ import annotations

import inspect
import logging
from typing import Awaitable, Callable

import trio

from vuser import wire
from vuser.frontend.connection import FrontendError, MessageRecord
from vuser.stream import MessageStream
from vuser.wire import BackendRequest

log = logging.getLogger(__name__)


class BackendMessage(MessageRecord):
    """A request the back-end sent on the back-end channel."""


# Returns the REPLY_ACK value to send (None: the default, 0 for
# CONFIG_CHANGE_MSG and 1 for anything else).
BackendHandler = Callable[[BackendMessage], "int | None | Awaitable[int | None]"]


class BackendChannel:
    """Records and answers back-end requests; see the module docstring."""

    def __init__(self, handler: BackendHandler | None = None) -> None:
        self.handler = handler
        self.messages: list[BackendMessage] = []
        self.config_changes = 0
        self.error: str | None = None
        self._changed = trio.Event()
        self._chan: MessageStream | None = None

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()
            self._chan = None

    async def serve(self, chan: MessageStream) -> None:
        """Serve ``chan`` until the back-end closes it (replaces any earlier one)."""
        self.close()
        self._chan = chan
        while True:
            try:
                msg = await chan.recv()
            except trio.ClosedResourceError:  # closed by us (replaced, or the front-end exits)
                return
            except (wire.WireError, OSError) as exc:
                self.error = str(exc)
                log.warning("back-end channel: %s", exc)
                return
            if msg is None:
                return
            fields = None
            try:
                fields = wire.decode_payload(msg.request, msg.payload, len(msg.fds), backend=True)
            except wire.WireError as exc:
                self.error = str(exc)
            msg.close_fds()
            event = BackendMessage(wire.request_name(msg.request, backend=True), msg.request,
                                   msg.flags, msg.payload, len(msg.fds), fields)
            self.messages.append(event)
            log.debug("back-end channel <- %s flags=%#x", event.request, msg.flags)
            result = await self._handle(event)
            if msg.flags & wire.FLAG_NEED_REPLY:
                reply = wire.encode_header(msg.request, wire.FLAG_REPLY, 8) + result.to_bytes(8, "little")
                try:
                    await chan.send(reply)
                except OSError as exc:
                    self.error = str(exc)
                    return

    async def _handle(self, event: BackendMessage) -> int:
        result: int | None = None
        if event.code == BackendRequest.CONFIG_CHANGE_MSG:
            self.config_changes += 1
            changed, self._changed = self._changed, trio.Event()
            changed.set()
            result = 0
        if self.handler is not None:
            out = self.handler(event)
            if inspect.isawaitable(out):
                out = await out
            if out is not None:
                result = int(out)
        return 1 if result is None else result

    async def wait_config_change(self, since: int | None, timeout: float) -> int:
        """Wait until more than ``since`` CONFIG_CHANGE_MSGs arrived (default:
        the count now); returns the new count."""
        base = self.config_changes if since is None else since
        try:
            with trio.fail_after(timeout):
                while self.config_changes <= base:
                    await self._changed.wait()
        except trio.TooSlowError:
            raise FrontendError("CONFIG_CHANGE_MSG", f"no config change announced "
                                                     f"within {timeout}s") from None
        return self.config_changes
