"""vhost-user message framing over a unix stream socket, fds via SCM_RIGHTS.

One ``MessageStream`` serves both ends: vuser's back-end reads front-end
requests *strictly* (a bad header is a protocol error), the front-end
harness reads replies and back-end requests *tolerantly* (it must see and
report whatever a back-end sends: wrong version bits, reserved flags).
In both modes a payload beyond ``wire.MAX_PAYLOAD`` cannot be framed and
an end of stream inside a message is an error.

Resource handling: every fd received is handed to exactly one owner, the
caller of ``recv`` (``Message.fds``); on any error the fds received so far
are closed here.  The socket belongs to whoever made the stream
(``close`` closes it).

Error handling: ``recv`` returns None at a clean end of stream (between
messages) and raises ``wire.WireError`` for a message that cannot be
framed (``Truncated`` when the stream ends inside one); ``OSError`` from
the socket passes through.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field
from typing import Sequence

import trio

from . import wire

_FD_SPACE = socket.CMSG_SPACE(wire.MAX_FDS * array.array("i").itemsize)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds


class Truncated(wire.WireError):
    """The stream ended inside a message."""


@dataclass(frozen=True)
class Message:
    """One framed message: header fields, payload and the fds it carried."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def header(self) -> wire.RawHeader:
        return wire.RawHeader(self.request, self.flags, len(self.payload))

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & wire.FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & wire.FLAG_REPLY)

    def close_fds(self) -> None:
        close_fds(self.fds)


class _End(Exception):
    """End of stream after ``received`` bytes of an expected read."""

    def __init__(self, received: int) -> None:
        self.received = received


class MessageStream:
    """Whole messages on a connected unix stream socket; see the module doc.
    ``backend``: the messages read are back-end channel requests (only
    used to name them in errors)."""

    def __init__(self, sock: trio.socket.SocketType, *, strict: bool, backend: bool = False) -> None:
        self.sock = sock
        self.strict = strict
        self.backend = backend

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        view = memoryview(data)
        sent = await self.sock.sendmsg([view], anc)
        while sent < len(data):
            sent += await self.sock.send(view[sent:])

    async def _recv_exact(self, size: int, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            data, ancdata, flags, _ = await self.sock.recvmsg(size - len(buf), _FD_SPACE,
                                                              socket.MSG_CMSG_CLOEXEC)
            fds.extend(take_fds(ancdata))
            if flags & socket.MSG_CTRUNC:
                raise wire.WireError("message", "too many fds attached (control data truncated)")
            if not data:
                raise _End(len(buf))
            buf += data
        return bytes(buf)

    def _header(self, data: bytes) -> wire.RawHeader:
        if self.strict:
            return wire.decode_header(data)
        h = wire.Header.parse(data)
        if h.size > wire.MAX_PAYLOAD:
            raise wire.WireError(wire.request_name(h.request, self.backend),
                                 f"payload size {h.size} exceeds {wire.MAX_PAYLOAD}")
        return wire.RawHeader(int(h.request), int(h.flags), int(h.size))

    async def recv(self) -> Message | None:
        """The next message, or None at a clean end of stream."""
        fds: list[int] = []
        try:
            try:
                head = await self._recv_exact(wire.HEADER_SIZE, fds)
            except _End as end:
                if not end.received:
                    close_fds(fds)
                    return None
                raise Truncated("header", f"connection closed after {end.received} of "
                                          f"{wire.HEADER_SIZE} header bytes") from None
            header = self._header(head)
            try:
                payload = await self._recv_exact(header.size, fds) if header.size else b""
            except _End as end:
                raise Truncated(wire.request_name(header.request, self.backend),
                                f"connection closed after {end.received} of {header.size} "
                                f"payload bytes") from None
        except BaseException:
            close_fds(fds)
            raise
        return Message(header.request, header.flags, payload, fds)

    def close(self) -> None:
        self.sock.close()
