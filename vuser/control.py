"""Control socket: one JSON request per line in, one JSON answer per line out.

Request:  {"command": "status", "args": []}
Answer:   {"ok": true, "result": ...}
          {"ok": false, "error": "...", "usage": true|false}

``usage`` says the request itself was wrong (unknown command, bad
arguments: the user's error) rather than the device failing to do it.
Commands are ``status``, ``commands``, ``record``, ``sample`` and the
device plugin's (see ``vuser.runner``).  The socket is created 0600.

Error handling: each client is served on its own; a request that is not
JSON, too long, or too deeply nested gets an error answer (and a request
over ``MAX_REQUEST`` bytes ends that client); an answer that cannot be
sent or encoded ends that client with a log line; beyond ``MAX_CLIENTS``
at once a client is closed at once.  Never the process.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import trio

from .errors import UsageError
from .transport import listen_unix

log = logging.getLogger(__name__)

Handler = Callable[[str, list[str]], Any]
MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 32
CLIENT_IDLE = 60.0  # seconds a client may stay silent


class ControlError(RuntimeError):
    """The control socket answered with an error."""

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


async def serve_control(path: str, handler: Handler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    listener = await listen_unix(path, backlog=8)
    log.info("control socket on %s", path)
    clients = [0]
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    conn, _ = await listener.accept()
                except OSError as exc:  # transient (EMFILE, ECONNABORTED)
                    log.warning("control socket %s: accept failed: %s", path, exc)
                    await trio.sleep(0.1)
                    continue
                if clients[0] >= MAX_CLIENTS:
                    conn.close()
                    continue
                clients[0] += 1
                nursery.start_soon(_client, trio.SocketStream(conn), handler, clients)
    finally:
        listener.close()


async def _client(stream: trio.SocketStream, handler: Handler, clients: list[int]) -> None:
    try:
        await _serve_client(stream, handler)
    except Exception as exc:  # one client's trouble is that client's
        log.warning("control client ended: %s: %s", type(exc).__name__, exc)
    finally:
        clients[0] -= 1


async def _serve_client(stream: trio.SocketStream, handler: Handler) -> None:
    buf = b""
    chunk: bytes | None = None
    async with stream:
        try:
            while True:
                chunk = None
                with trio.move_on_after(CLIENT_IDLE):
                    chunk = await stream.receive_some(4096)
                if chunk is None or not chunk:  # idle too long, or closed
                    return
                buf += chunk
                if len(buf) > MAX_REQUEST and b"\n" not in buf:
                    await stream.send_all(b'{"ok": false, "error": "request too long", "usage": true}\n')
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
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return {"ok": False, "error": f"bad request: {type(exc).__name__}: {exc}"[:500], "usage": True}
    try:
        return {"ok": True, "result": handler(command, args)}
    except UsageError as exc:
        return {"ok": False, "error": str(exc), "usage": True}
    except Exception as exc:  # reported to the client; the device keeps running
        log.exception("control command %s failed", command)
        return {"ok": False, "error": str(exc), "usage": False}


async def call(path: str, command: str, args: list[str] | None = None, timeout: float = 10) -> Any:
    """Client side: send one command and return its result (raises
    ControlError for an error answer, OSError if nobody listens)."""
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
        raise ControlError(answer.get("error", "unknown error"), bool(answer.get("usage")))
    return answer["result"]
