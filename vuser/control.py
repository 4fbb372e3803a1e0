"""Control socket: one JSON request per line in, one JSON answer per line out.

Request:  {"command": "status", "args": []}
Answer:   {"ok": true, "result": ...}  or  {"ok": false, "error": "..."}

Generic commands: ``status`` (connection, features by name, queue layout,
device status), ``stats`` and anything else the device's ``control`` hook
knows.  The socket is created 0600.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import trio

from .transport import listen_unix, unlink_quietly

log = logging.getLogger(__name__)

Handler = Callable[[str, list[str]], Any]
MAX_REQUEST = 64 * 1024


async def serve_control(path: str, handler: Handler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    listener = await listen_unix(path, backlog=8)
    log.info("control socket on %s", path)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_client, trio.SocketStream(conn), handler)
    finally:
        listener.close()
        unlink_quietly(path)


async def _client(stream: trio.SocketStream, handler: Handler) -> None:
    buf = b""
    async with stream:
        try:
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_REQUEST:
                    await stream.send_all(b'{"ok": false, "error": "request too long"}\n')
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    answer = _answer(line, handler)
                    await stream.send_all(json.dumps(answer).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _answer(line: bytes, handler: Handler) -> dict[str, Any]:
    try:
        req = json.loads(line)
        command = str(req["command"])
        args = [str(a) for a in req.get("args", [])]
    except (ValueError, KeyError, TypeError) as exc:
        return {"ok": False, "error": f"bad request: {exc}"}
    try:
        return {"ok": True, "result": handler(command, args)}
    except Exception as exc:  # reported to the client; the device keeps running
        return {"ok": False, "error": str(exc)}


async def call(path: str, command: str, args: list[str] | None = None, timeout: float = 10) -> Any:
    """Client side: send one command and return its result (raises on error)."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(json.dumps({"command": command, "args": args or []}).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("control socket closed without an answer")
                buf += chunk
    answer = json.loads(buf.split(b"\n", 1)[0])
    if not answer.get("ok"):
        raise RuntimeError(answer.get("error", "unknown error"))
    return answer["result"]
