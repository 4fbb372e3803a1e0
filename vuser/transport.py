"""Unix-socket message I/O with SCM_RIGHTS, and the listen / connect loops.

Resource handling: every fd received is handed to exactly one owner (the
caller of ``recv_message``); on a framing error the fds received so far are
closed here.  Sockets are closed by whoever opened them.

Error handling: only ``OSError`` from connect/accept is retried (with
backoff in client mode); a protocol error ends one connection, never the
loop.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat
from typing import Awaitable, Callable, Sequence

import trio

from . import wire

log = logging.getLogger(__name__)

_FD_SPACE = socket.CMSG_SPACE(wire.MAX_FDS * array.array("i").itemsize)


class Disconnected(Exception):
    """The peer closed the connection (possibly mid-message)."""


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


class _Truncated(Exception):
    """End of stream after ``received`` bytes of an expected read."""

    def __init__(self, received: int) -> None:
        self.received = received


async def _recv_exact(sock: trio.socket.SocketType, size: int, fds: list[int]) -> bytes:
    """Read exactly ``size`` bytes; fds that arrive on the way are appended.
    Raises _Truncated at end of stream."""
    buf = bytearray()
    while len(buf) < size:
        data, ancdata, flags, _ = await sock.recvmsg(size - len(buf), _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds.extend(take_fds(ancdata))
        if flags & socket.MSG_CTRUNC:
            raise wire.WireError("message", "too many fds attached (control data truncated)")
        if not data:
            raise _Truncated(len(buf))
        buf += data
    return bytes(buf)


async def recv_message(sock: trio.socket.SocketType, *, backend: bool = False
                       ) -> tuple[wire.RawHeader, bytes, list[int]]:
    """Receive one whole message.  Raises Disconnected at a clean end of
    stream (between messages) and WireError on a bad header or a message cut
    short by the end of stream (fds received so far are closed in every
    case)."""
    fds: list[int] = []
    try:
        try:
            head = await _recv_exact(sock, wire.HEADER_SIZE, fds)
        except _Truncated as exc:
            if not exc.received:
                raise Disconnected("peer closed the connection") from None
            raise wire.WireError("header", f"connection closed after {exc.received} of "
                                           f"{wire.HEADER_SIZE} header bytes") from None
        header = wire.decode_header(head)
        try:
            payload = await _recv_exact(sock, header.size, fds) if header.size else b""
        except _Truncated as exc:
            raise wire.WireError(wire.request_name(header.request, backend),
                                 f"connection closed after {exc.received} of {header.size} "
                                 f"payload bytes") from None
    except BaseException:
        close_fds(fds)
        raise
    return header, payload, fds


async def send_message(sock: trio.socket.SocketType, data: bytes, fds: Sequence[int] = ()) -> None:
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    view = memoryview(data)
    sent = await sock.sendmsg([view], anc)
    while sent < len(data):
        sent += await sock.send(view[sent:])


ConnectionHandler = Callable[[trio.socket.SocketType], Awaitable[None]]


def _prepare_socket_path(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)


async def listen_unix(path: str, *, backlog: int = 1, private: bool = True) -> trio.socket.SocketType:
    """A listening unix socket at ``path`` (a stale socket file there is
    replaced; any other file is an error), created 0600 when ``private``."""
    _prepare_socket_path(path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177) if private else None
    try:
        await listener.bind(path)
        listener.listen(backlog)
    except BaseException:
        listener.close()
        raise
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    return listener


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def serve_unix(path: str, handler: ConnectionHandler, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``path`` (mode 0600) and serve one front-end at a time:
    the next connection is accepted after the current one ends."""
    listener = await listen_unix(path, backlog=1)
    try:
        log.info("listening on %s", path)
        task_status.started()
        while True:
            try:
                conn, _ = await listener.accept()
            except OSError as exc:  # transient accept errors (EMFILE, ECONNABORTED)
                log.warning("accept on %s failed: %s", path, exc)
                await trio.sleep(0.1)
                continue
            with conn:
                await handler(conn)
    finally:
        listener.close()
        unlink_quietly(path)


async def serve_client(path: str, handler: ConnectionHandler, *, max_backoff: float = 2.0,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Connect to a front-end listening on ``path``; reconnect with
    exponential backoff whenever it goes away or is not there yet."""
    started = False
    delay = 0.05
    while True:
        conn = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await conn.connect(path)
        except OSError as exc:
            conn.close()
            if not started:
                task_status.started()
                started = True
            log.debug("connect to %s failed (%s); retrying in %.2fs", path, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, max_backoff)
            continue
        if not started:
            task_status.started()
            started = True
        delay = 0.05
        log.info("connected to %s", path)
        with conn:
            await handler(conn)
        await trio.sleep(delay)
