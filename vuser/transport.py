"""Unix sockets: listening, serving one front-end at a time, and client
mode (connect and reconnect).  Message framing is ``vuser.stream``.

Resource handling: sockets are closed by whoever opened them; a served
connection is closed when its handler returns.

Error handling: only ``OSError`` from connect/accept is retried (with
backoff in client mode); a protocol error ends one connection, never the
loop.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection

import trio

log = logging.getLogger(__name__)


ConnectionHandler = Callable[[trio.socket.SocketType], Awaitable[None]]


def _prepare_socket_path(path: str) -> None:
    """Make room for a listening socket at ``path``: nothing there, or a
    socket nobody listens on any more (a stale one is removed).  A live
    socket is never taken over, and anything that is not a socket is left
    alone: both are errors."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody there: stale
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError:  # a full backlog, a permission problem: someone's
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening there")


@dataclass
class Listener:
    """A listening unix socket and the inode it made at ``path``: closing
    it removes ``path`` only if that is still the same socket (another
    process may have replaced it meanwhile)."""

    sock: trio.socket.SocketType
    path: str
    inode: tuple[int, int]

    async def accept(self) -> tuple[trio.socket.SocketType, object]:
        sock, address = await self.sock.accept()
        return sock, address

    def close(self) -> None:
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self.inode:
            unlink_quietly(self.path)


async def listen_unix(path: str, *, backlog: int = 1, private: bool = True) -> Listener:
    """A listening unix socket at ``path`` (a stale socket file there is
    replaced; a live one or any other file is an error), created 0600 when
    ``private``."""
    try:
        _prepare_socket_path(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror or exc}") from None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177) if private else None
    try:
        await sock.bind(path)
        sock.listen(backlog)
        st = os.lstat(path)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    return Listener(sock, path, (st.st_dev, st.st_ino))


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def peer_uid(sock: trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


async def serve_unix(path: str, handler: ConnectionHandler, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``path`` (mode 0600) and serve one front-end at a time:
    the next connection is accepted after the current one ends."""
    listener = await listen_unix(path, backlog=1)
    try:
        log.info("listening on %s", path)
        task_status.started()
        await _accept_loop(listener.sock, path, handler)
    finally:
        listener.close()


async def serve_inherited(fd: int, handler: ConnectionHandler, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve front-ends on the listening unix socket inherited as ``fd``
    (vhost-user.rst "Backend program conventions", ``--fd``: systemd
    socket activation, a management layer that made the socket), one at a
    time, like ``serve_unix``.  The socket is closed on the way out.

    Error handling: OSError when ``fd`` is not a listening unix stream
    socket (before ``task_status.started()``)."""
    try:
        raw = socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, f"fd {fd}: {exc.strerror or exc}") from None
    try:
        if raw.family != socket.AF_UNIX or raw.type != socket.SOCK_STREAM:
            raise OSError(errno.ENOTSOCK, f"fd {fd} is not a unix stream socket")
        if not raw.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(errno.EINVAL, f"fd {fd} is not a listening socket")
    except BaseException:
        raw.detach()   # not ours to close when it is not what we take
        raise
    raw.setblocking(False)
    sock = trio.socket.from_stdlib_socket(raw)
    with sock:
        log.info("listening on inherited fd %d", fd)
        task_status.started()
        await _accept_loop(sock, f"fd {fd}", handler)


async def _accept_loop(sock: trio.socket.SocketType, name: str, handler: ConnectionHandler) -> None:
    while True:
        try:
            conn, _ = await sock.accept()
        except OSError as exc:  # transient accept errors (EMFILE, ECONNABORTED)
            log.warning("accept on %s failed: %s", name, exc)
            await trio.sleep(0.1)
            continue
        with conn:
            await handler(conn)


async def serve_client(path: str, handler: ConnectionHandler, *, max_backoff: float = 2.0,
                       peer_uids: Collection[int] | None = None,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Connect to a front-end listening on ``path``; reconnect with
    exponential backoff whenever it goes away or is not there yet.  The
    front-end must run as one of ``peer_uids`` (default: our uid or root;
    SO_PEERCRED): anyone who can create ``path`` could otherwise pose as
    the front-end and feed us its memory."""
    allowed = set(peer_uids) if peer_uids is not None else {os.getuid(), 0}
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
        uid = peer_uid(conn)
        if uid not in allowed:
            conn.close()
            log.error("%s: the front-end runs as uid %d, not one of %s (--allow-peer-uid); not served",
                      path, uid, sorted(allowed))
            await trio.sleep(max_backoff)
            continue
        delay = 0.05
        log.info("connected to %s", path)
        with conn:
            await handler(conn)
        await trio.sleep(delay)
