"""A QMP (QEMU Machine Protocol) client: the one in vuser's tooling.

::

    qmp = QmpClient(guest.qmp_socket)
    balloon = await qmp.execute("query-balloon")
    await qmp.execute("balloon", value=256 << 20)

QMP is one JSON object per line each way: a greeting from QEMU, then
``qmp_capabilities``, then commands carrying an ``id`` that comes back in
their reply.  Asynchronous events may arrive between them; they are kept in
:attr:`QmpClient.events`.  :class:`vuser.testing.guest.Guest` uses one for
its ``qmp.sock`` (``guest.qmp(...)``).

Resource handling: the connection is opened on the first command and closed
by :meth:`QmpClient.aclose`; commands take a lock, so concurrent callers
queue.  Error handling: a refused command raises :class:`QmpError` with
QEMU's description; a connection QEMU closed raises GuestExited, with the
guest's diagnostics when a ``diagnostics`` callable was given.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import trio

from vuser.testing.errors import GuestError, GuestExited, diagnosed

__all__ = ["QmpClient", "QmpError"]


class QmpError(GuestError):
    """QEMU answered a QMP command with an error."""


class QmpClient:
    """QMP over the unix socket ``path`` (QEMU's ``-qmp unix:PATH,server=on``)."""

    def __init__(self, path: str | os.PathLike[str], *,
                 diagnostics: Callable[[], str] = lambda: "") -> None:
        self.path = str(path)
        self.events: list[dict[str, Any]] = []
        self._diagnostics = diagnostics
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._id = 0

    async def execute(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run a QMP command and return its "return" value (events seen on the
        way are appended to :attr:`events`)."""
        async with self._lock:
            with trio.fail_after(timeout):
                if self._stream is None:
                    self._stream = await trio.open_unix_socket(self.path)
                    greeting = await self._read_message()
                    if "QMP" not in greeting:
                        raise diagnosed(GuestError, f"unexpected QMP greeting {greeting}",
                                        self._diagnostics())
                    await self._exchange("qmp_capabilities", {})
                return await self._exchange(command, arguments)

    async def _read_message(self) -> dict[str, Any]:
        assert self._stream is not None
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[:i + 1]
                if not line.strip():
                    continue
                msg: dict[str, Any] = json.loads(line)
                if "event" in msg:
                    self.events.append(msg)
                    continue
                return msg
            data = await self._stream.receive_some(1 << 16)
            if not data:
                raise diagnosed(GuestExited, "QMP connection closed", self._diagnostics())
            self._buf += data

    async def _exchange(self, command: str, arguments: Mapping[str, Any]) -> Any:
        assert self._stream is not None
        self._id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = dict(arguments)
        await self._stream.send_all(json.dumps(msg).encode() + b"\n")
        while True:
            reply = await self._read_message()
            if reply.get("id") != self._id:
                continue   # a late reply to a command that timed out
            if "error" in reply:
                raise QmpError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    async def aclose(self) -> None:
        if self._stream is not None:
            try:
                await self._stream.aclose()
            except Exception:   # closing on the way out: QEMU may be gone already
                pass
            self._stream = None
