"""Unix sockets: listening, serving one front-end at a time, and client
mode (connect and reconnect).  Message framing is ``vuser.stream``.

Resource handling: sockets are closed by whoever opened them; a served
connection is closed when its handler returns.

Error handling: only ``OSError`` from connect/accept is retried (with
backoff in client mode); a protocol error ends one connection, never the
loop.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from typing import Awaitable, Callable

import trio

log = logging.getLogger(__name__)


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
    try:
        _prepare_socket_path(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror or exc}") from None
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177) if private else None
    try:
        await listener.bind(path)
        listener.listen(backlog)
    except OSError as exc:
        listener.close()
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror or exc}") from None
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
