"""The back-end channel (SET_BACKEND_REQ_FD): requests vuser sends to the
front-end, such as VHOST_USER_BACKEND_CONFIG_CHANGE_MSG.

Resource handling: the channel owns its socket (``replace`` closes the
previous one, ``close`` the current one).  Error handling: a request that
cannot be delivered (socket error, no ack in time, a refusal) is logged
and reported as False; it never ends the connection.
"""

from __future__ import annotations

import logging
import socket

import trio

from . import wire
from .stream import MessageStream

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0


class BackendChannelSender:
    """Sends back-end requests, one at a time, on the channel the
    front-end gave with SET_BACKEND_REQ_FD."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stream: MessageStream | None = None
        self._lock = trio.Lock()

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def replace(self, fd: int) -> None:
        """Take the socket ``fd`` (duplicated; the caller closes ``fd``)."""
        self.close()
        sock = trio.socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
        self._stream = MessageStream(sock, strict=True, backend=True)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def config_change(self, reply_ack: bool) -> bool:
        """CONFIG_CHANGE_MSG; waits for the ack when ``reply_ack`` (REPLY_ACK
        negotiated).  Returns whether it was delivered."""
        stream = self._stream
        if stream is None:
            return False
        msg = wire.encode(wire.BackendRequest.CONFIG_CHANGE_MSG, backend=True,
                          flags=wire.FLAG_NEED_REPLY if reply_ack else 0)
        async with self._lock:
            try:
                await stream.send(msg)
                if reply_ack:
                    with trio.fail_after(ACK_TIMEOUT):
                        reply = await stream.recv()
                    if reply is None:
                        raise OSError("channel closed before the ack")
                    reply.close_fds()
                    if reply.payload and int.from_bytes(reply.payload[:8], "little") != 0:
                        log.warning("%s: front-end refused the config change message", self.name)
                        return False
            except (OSError, wire.WireError, trio.TooSlowError) as exc:
                log.warning("%s: back-end channel: config change not delivered: %s", self.name, exc)
                return False
        log.debug("%s: -> CONFIG_CHANGE_MSG", self.name)
        return True
