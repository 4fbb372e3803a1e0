"""Back-ends with planted bugs, for the probe to find.

``planted_balloon``: vuser's balloon numbering its queues over the
*negotiated* features (the reading seed 001 shows people assume; QEMU and
Linux number by offered ones) behind a proxy that adds ``base_error`` to
every GET_VRING_BASE reply.  With ``queue_policy="offered"`` and
``base_error=0`` it is a faithful control: the same proxy, no bug.

Run as a script it is a back-end that misbehaves at the socket level::

    python planted.py crash SOCKET    # killed by SIGSEGV on its first message
    python planted.py silent SOCKET   # accepts, reads, never answers
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from vuser import wire
from vuser.devices.balloon import BalloonDevice
from vuser.runner import Runner
from vuser.stream import Message, MessageStream
from vuser.transport import listen_unix
from vuser.wire import Request


def _bytes(msg: Message) -> bytes:
    return wire.encode_header(msg.request, msg.flags, len(msg.payload)) + msg.payload


def _wrong_base(msg: Message, error: int) -> Message:
    if msg.request != Request.GET_VRING_BASE or not msg.is_reply or len(msg.payload) != 8:
        return msg
    state = wire.VringState.parse(msg.payload)
    payload = wire.VringState.build({"index": state.index, "num": (state.num + error) & 0xFFFF_FFFF})
    return Message(msg.request, msg.flags, payload, msg.fds)


async def _pipe(src: MessageStream, dst: MessageStream, error: int) -> None:
    while (msg := await src.recv()) is not None:
        msg = _wrong_base(msg, error)
        try:
            await dst.send(_bytes(msg), msg.fds)
        finally:
            msg.close_fds()


async def _proxy(path: str, backend: str, error: int, *,
                 task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    listener = await listen_unix(path)
    task_status.started()
    try:
        while True:
            front, _ = await listener.accept()
            back = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await back.connect(backend)
            with front, back:
                async with trio.open_nursery() as nursery:
                    async def one_way(src: MessageStream, dst: MessageStream) -> None:
                        try:
                            await _pipe(src, dst, error)
                        except (OSError, wire.WireError):
                            pass
                        nursery.cancel_scope.cancel()   # one side gone: so is the connection
                    front_stream = MessageStream(front, strict=False)
                    back_stream = MessageStream(back, strict=False)
                    nursery.start_soon(one_way, front_stream, back_stream)
                    nursery.start_soon(one_way, back_stream, front_stream)
    finally:
        listener.close()


@asynccontextmanager
async def planted_balloon(path: Path, *, queue_policy: str = "negotiated",
                          base_error: int = 2) -> AsyncIterator[BalloonDevice]:
    """Serve the planted back-end on ``path`` for the body of the block."""
    device = BalloonDevice(queue_policy=queue_policy, stats_interval=0)
    inner = str(path) + ".inner"
    async with trio.open_nursery() as nursery:
        await nursery.start(Runner(device, inner).run)
        await nursery.start(_proxy, str(path), inner, base_error)
        try:
            yield device
        finally:
            nursery.cancel_scope.cancel()


def misbehave(mode: str, path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        conn, _ = server.accept()
        conn.recv(12)
        if mode == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        while conn.recv(4096):   # silent: read everything, answer nothing
            pass


if __name__ == "__main__":
    misbehave(sys.argv[1], sys.argv[2])
