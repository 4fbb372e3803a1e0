"""Front-end side of a vhost-user socket: request/reply discipline.

Framing is ``vuser.stream.MessageStream`` in its tolerant mode (the harness
reads and reports whatever a back-end sends).  ``FrontendChannel`` adds
the front-end's request discipline: one request at a time, NEED_REPLY when
asked, strict validation of every reply (flags exactly VERSION|REPLY as
QEMU and DPDK demand, same request code, exact payload size), REPLY_ACK
payloads other than u64 0 turned into ``BackendRefused``, and a trace of
every message sent.  Which requests bring a reply of their own comes from
the request table (``wire.REQUESTS``), the one the back-end uses too.

Error handling: every wait is bounded by the connection's timeout.  A
misbehaving back-end surfaces as a ``FrontendError`` subclass whose
message starts with the request name: ``BackendTimeout``,
``BackendDisconnected``, ``BadReply``, ``BackendRefused``.

Resource handling: fds received with a reply belong to the ``Reply``
(``Reply.close_fds()``); fds received with anything invalid are closed
here.  The socket is closed by ``FrontendChannel.close()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import trio

from vuser import wire
from vuser.stream import Message, MessageStream, Truncated, close_fds
from vuser.wire import Request

log = logging.getLogger(__name__)

REPLY_FLAGS = wire.VERSION | wire.FLAG_REPLY


def replies(code: int, protocol_features: int) -> bool:
    """Does the back-end answer request ``code`` whether or not NEED_REPLY
    is set (its reply replaces the REPLY_ACK one)?  From the request table."""
    try:
        return wire.spec_for(code).replies(protocol_features)
    except wire.WireError:  # an unknown request: nothing to expect
        return False


class FrontendError(Exception):
    """The back-end misbehaved; ``request`` names the request concerned."""

    def __init__(self, request: str, problem: str) -> None:
        super().__init__(f"{request}: {problem}")
        self.request = request
        self.problem = problem


class BackendTimeout(FrontendError):
    """No (complete) reply within the timeout."""


class BackendDisconnected(FrontendError):
    """The back-end closed the connection."""


class BadReply(FrontendError):
    """A reply with wrong flags, request code, size or fds."""


class BackendRefused(FrontendError):
    """A REPLY_ACK payload other than 0 (or an empty GET_CONFIG reply)."""

    def __init__(self, request: str, value: int) -> None:
        super().__init__(request, f"refused by the back-end (reply-ack value {value:#x})")
        self.value = value


class FeaturesRefused(FrontendError):
    """FEATURES_OK did not stick: the back-end refused the feature set."""

    def __init__(self, features: int, status: int) -> None:
        super().__init__("SET_STATUS", f"FEATURES_OK not set after accepting features "
                                       f"{features:#x} (status read back {status:#x})")
        self.features = features
        self.status = status


@dataclass(frozen=True)
class Reply:
    """A validated reply; ``fields`` is the decoded payload (dict-like) when
    the reply has a fixed layout, else None."""

    request: int
    flags: int
    payload: bytes
    fds: list[int]
    fields: Any = None

    @property
    def u64(self) -> int:
        return int.from_bytes(self.payload[:8], "little")

    def close_fds(self) -> None:
        close_fds(self.fds)


@dataclass(frozen=True)
class MessageRecord:
    """One message as recorded by the harness, in either direction.
    ``fields`` is the decoded payload (None when it does not decode: raw and
    malformed messages)."""

    request: str
    code: int
    flags: int
    payload: bytes
    nfds: int
    fields: Any = None

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & wire.FLAG_NEED_REPLY)


class TraceEntry(MessageRecord):
    """One message the harness sent."""


def _decode_fields(code: int, payload: bytes, nfds: int, backend: bool = False) -> Any:
    try:
        return wire.decode_payload(code, payload, nfds, backend=backend)
    except wire.WireError:
        return None


def build(code: int, payload: bytes | Mapping[str, Any] | None = None) -> bytes:
    """Payload bytes for ``code`` from a dict (built with the request's wire
    layout) or raw bytes (used as is)."""
    if payload is None:
        return b""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    msg = wire.encode(code, payload)
    return msg[wire.HEADER_SIZE:]


class FrontendChannel:
    """Request/reply on the front-end socket; see the module docstring."""

    def __init__(self, sock: trio.socket.SocketType, *, timeout: float = 5.0) -> None:
        self.stream = MessageStream(sock, strict=False)
        self.timeout = timeout
        # on_send(message bytes, fds) -> (bytes, fds) actually sent: a hook
        # for experiments that rewrite what a real front-end would send.
        self.on_send: Callable[[bytes, list[int]], tuple[bytes, list[int]]] | None = None
        self.protocol_features = 0  # set once negotiated
        self.reply_ack = False   # set once REPLY_ACK is negotiated
        self.trace: list[TraceEntry] = []
        self.closed = False
        self._lock = trio.Lock()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.close()

    # ---------------------------------------------------------- sending

    async def _send(self, code: int, flags: int, body: bytes, fds: Sequence[int],
                    name: str) -> None:
        data, sent_fds = wire.encode_header(code, flags, len(body)) + body, list(fds)
        if self.on_send is not None:
            # An experiment (a fuzzer) rewrites what goes out; the harness
            # goes on as if its own message had been sent.
            data, sent_fds = self.on_send(data, sent_fds)
        try:
            await self.stream.send(data, sent_fds)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendDisconnected(name, f"back-end closed the connection ({exc})") from None
        except OSError as exc:
            raise FrontendError(name, f"sending failed: {exc}") from None
        fields = _decode_fields(code, body, len(fds)) if self.on_send is None else None
        self.trace.append(TraceEntry(name, code, flags | wire.VERSION, body, len(fds), fields))
        log.debug("-> %s flags=%#x size=%d fds=%d", name, flags | wire.VERSION, len(body), len(fds))

    async def _recv(self, name: str) -> Message:
        try:
            msg = await self.stream.recv()
        except Truncated as exc:
            raise BackendDisconnected(name, f"back-end closed the connection mid-reply ({exc.fault})") from None
        except wire.WireError as exc:
            raise BadReply(name, exc.fault) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise BackendDisconnected(name, f"back-end closed the connection ({exc})") from None
        if msg is None:
            raise BackendDisconnected(name, "back-end closed the connection instead of replying")
        log.debug("<- %s flags=%#x size=%d fds=%d", wire.request_name(msg.request), msg.flags,
                  len(msg.payload), len(msg.fds))
        return msg

    async def request(self, code: int, payload: bytes | Mapping[str, Any] | None = None,
                      fds: Sequence[int] = (), *, need_reply: bool = False,
                      expect_reply: bool | None = None) -> Reply | None:
        """Send one request and wait for what it brings back.

        ``expect_reply`` None means: the request's own reply if it has one
        (``replies``), else a REPLY_ACK if ``need_reply``, else nothing.
        Returns the validated reply (None when nothing is expected).
        """
        name = wire.request_name(code)
        body = build(code, payload)
        natural = replies(code, self.protocol_features) if expect_reply is None else expect_reply
        flags = wire.FLAG_NEED_REPLY if need_reply else 0
        async with self._lock:
            try:
                with trio.fail_after(self.timeout):
                    await self._send(code, flags, body, fds, name)
                    if natural:
                        return self._validate(code, name, await self._recv(name), ack=False)
                    if need_reply:
                        reply = self._validate(code, name, await self._recv(name), ack=True)
                        if reply.u64 != 0:
                            raise BackendRefused(name, reply.u64)
                        return reply
                    return None
            except trio.TooSlowError:
                raise BackendTimeout(name, f"no reply within {self.timeout}s") from None

    def _validate(self, code: int, name: str, msg: Message, *, ack: bool) -> Reply:
        try:
            if msg.flags != REPLY_FLAGS:
                raise BadReply(name, f"reply flags {msg.flags:#x}, expected {REPLY_FLAGS:#x}")
            if msg.request != code:
                raise BadReply(name, f"reply carries request {wire.request_name(msg.request)}")
            if ack:
                if len(msg.payload) != 8:
                    raise BadReply(name, f"REPLY_ACK payload is {len(msg.payload)} bytes, expected 8")
                if msg.fds:
                    raise BadReply(name, f"REPLY_ACK carried {len(msg.fds)} fds")
                return Reply(code, msg.flags, msg.payload, [], None)
            fields = None
            if code != Request.GET_CONFIG:
                try:
                    fields = wire.decode_reply(code, msg.payload)
                except wire.WireError as exc:
                    raise BadReply(name, exc.fault) from None
        except BadReply:
            msg.close_fds()
            raise
        return Reply(code, msg.flags, msg.payload, list(msg.fds), fields)

    # ---------------------------------------------------------- raw access

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (malformed-message tests); traced by the
        request code in the first 4 bytes when there are that many."""
        code = int.from_bytes(data[:4], "little") if len(data) >= 4 else -1
        name = wire.request_name(code) if code >= 0 else "raw"
        try:
            with trio.fail_after(self.timeout):
                await self.stream.send(data, fds)
        except trio.TooSlowError:
            raise BackendTimeout(name, f"send did not complete within {self.timeout}s") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BackendDisconnected(name, f"back-end closed the connection ({exc})") from None
        flags = int.from_bytes(data[4:8], "little") if len(data) >= 8 else 0
        self.trace.append(TraceEntry(name, code, flags, data[wire.HEADER_SIZE:], len(fds), None))

    async def recv_raw(self, timeout: float | None = None) -> Message | None:
        """Receive one message without validation; None at end of stream.
        Raises BackendTimeout when nothing arrives in time."""
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                return await self.stream.recv()
        except trio.TooSlowError:
            raise BackendTimeout("raw receive", "nothing arrived in time") from None
        except Truncated:
            return None
        except (ConnectionResetError, BrokenPipeError):
            return None
