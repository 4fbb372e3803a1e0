"""The host end of the test guest's command channel, and what a command returns.

The guest's second serial port (ttyS1) is a QEMU socket chardev connected to
a unix socket the host listens on.  The guest's command server
(``vuser/testing/guest_files/cmdserver``) speaks one line per message,
payloads base64::

    guest -> host  @@vuser-ready 1 <uname -r>
    host -> guest  @@vuser-run <id> <timeout> <s|m> :<cmd> :<stdin>
    guest -> host  @@vuser-result <id> <status> :<stdout> :<stderr>

so output and exit status are unambiguous whatever bytes a command prints.

Resource handling: the channel owns its stream and closes it in
:meth:`CommandChannel.aclose`.  Error handling: errors carry the guest's
diagnostics (the ``diagnostics`` callable given by :class:`Guest`); a
command that gets no answer or a garbled one makes the channel unusable
(later commands fail at once rather than read someone else's answer).
"""

from __future__ import annotations

import base64
import math
import time
from typing import Awaitable, Callable

import trio

from vuser.testing.errors import CommandResult, GuestError, GuestExited, GuestTimeout, diagnosed, tail
from vuser.testing.manifest import HOW_TO_PROVISION

__all__ = ["PROTOCOL", "CommandChannel", "CommandResult"]

PROTOCOL = "1"
# Runs a channel read, raising GuestExited if QEMU exits meanwhile.
Guard = Callable[[Callable[[], Awaitable[bytes]], str], Awaitable[bytes]]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class CommandChannel:
    """One guest's command channel over ``stream``.  ``guard`` wraps every
    read so that QEMU exiting ends it; ``diagnostics`` is appended to errors."""

    def __init__(self, stream: trio.SocketStream, *, guard: Guard,
                 diagnostics: Callable[[], str]) -> None:
        self._stream = stream
        self._guard = guard
        self._diagnostics = diagnostics
        self._buf = bytearray()
        self._lock = trio.Lock()
        self._next_id = 0
        self.broken: str | None = None

    def _error(self, cls: type[GuestError], message: str, **kw: object) -> GuestError:
        return diagnosed(cls, message, self._diagnostics(), **kw)

    async def _readline(self) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[:i + 1]
                return line
            data = await self._stream.receive_some(1 << 16)
            if not data:
                await trio.sleep(0.2)   # usually QEMU is exiting: let its log settle
                raise self._error(GuestExited, "the guest command channel closed")
            self._buf += data

    async def wait_ready(self) -> str:
        """Wait for the command server's greeting; the guest's kernel release."""
        while True:
            line = await self._guard(self._readline, "booting")
            if line.startswith(b"@@vuser-ready "):
                _, proto, release = line.decode(errors="replace").split(" ", 2)
                if proto != PROTOCOL:
                    raise self._error(GuestError, f"guest command server speaks protocol "
                                      f"{proto}, expected {PROTOCOL}: {HOW_TO_PROVISION}")
                return release

    async def run(self, command: str, *, timeout: float, input: bytes,
                  merge_stderr: bool) -> CommandResult:
        """Run ``command`` with ``sh`` in the guest and wait for its result.
        Commands run one at a time; concurrent calls queue."""
        async with self._lock:
            if self.broken:
                raise self._error(GuestError, f"command channel unusable: {self.broken}")
            self._next_id += 1
            cid = self._next_id
            guest_timeout = max(1, math.ceil(timeout))
            request = (f"@@vuser-run {cid} {guest_timeout} {'m' if merge_stderr else 's'} "
                       f":{_b64(command.encode())} :{_b64(input)}\n")
            t0 = time.monotonic()
            # Grace for QEMU and the serial line: output travels as base64 lines.
            try:
                with trio.move_on_after(guest_timeout + 15 + len(request) / 20000) as scope:
                    await self._stream.send_all(request.encode())
                    while True:
                        line = await self._guard(self._readline, f"running {command!r}")
                        if not line.startswith(b"@@vuser-result "):
                            continue
                        fields = line.decode("ascii", "replace").split(" ")
                        if len(fields) == 5 and fields[1] == str(cid):
                            break
            except BaseException:
                # Cancelled, or QEMU or a device gone: the command may still
                # run in the guest, and the server answers nothing else first.
                self.broken = f"interrupted while waiting for {command!r}"
                raise
            duration = time.monotonic() - t0
            if scope.cancelled_caught:
                self.broken = f"no answer to {command!r} within {timeout}s"
                raise self._error(GuestTimeout, f"guest command timed out after "
                                  f"{duration:.1f}s (no answer): {command!r}")
            try:
                result = CommandResult(command, int(fields[2]),
                                       base64.b64decode(fields[3][1:], validate=True),
                                       base64.b64decode(fields[4][1:], validate=True), duration)
            except ValueError as exc:
                self.broken = "garbled answer"
                raise self._error(GuestError, f"garbled answer to {command!r}: {exc}") from None
        # The guest runs commands under "timeout -s KILL": 137 at the limit is ours.
        if result.exit_code == 137 and duration >= guest_timeout - 0.5:
            raise self._error(GuestTimeout, f"guest command killed after {timeout}s: "
                              f"{command!r}\n--- stdout ---\n{tail(result.stdout, 30)}\n"
                              f"--- stderr ---\n{tail(result.stderr, 30)}", result=result)
        return result

    async def request_poweroff(self) -> None:
        """Ask for ``poweroff -f`` without waiting for an answer (there is
        none: the guest is gone).  Never raises for a dead channel."""
        if self.broken:
            return
        self._next_id += 1
        request = f"@@vuser-run {self._next_id} 0 m :{_b64(b'poweroff -f')} :\n"
        try:
            with trio.move_on_after(5):
                await self._stream.send_all(request.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        except Exception:   # closing on the way out: the stream may already be broken
            pass
