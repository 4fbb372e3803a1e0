"""vhost-user wire format: header, payload layouts, and the request table.

Everything here is syntax only (QEMU docs/interop/vhost-user.rst,
"Message Specification"): byte layouts, flag bits, payload size rules, how
many file descriptors each request may carry.  Meaning (is this request
allowed now, is the index in range) is the protocol layer's job.
construct objects never leave this module: callers get plain
``Container``/dict values.

The request table (``REQUESTS``) is the one description of every request:
its layout, its size rule, its fds, its reply, and the event
(``vuser.events``) it becomes.  The session, the handler and the front-end
harness all derive what they do from it.

All numbers are in the machine's native byte order (the spec says so), hence
the ``*un`` construct types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import events as E
from .codes import BackendRequest, ProtocolFeature, Request, protocol_feature_names
from .virtio import Transport

from construct import (
    Array,
    Bytes,
    Construct,
    ConstructError,
    GreedyBytes,
    Int8un,
    Int16un,
    Int32un,
    Int64sn,
    Int64un,
    Padding,
    Struct,
    this,
)

HEADER_SIZE = 12
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

# Largest payload any request may carry (a full VhostUserConfig is 268
# bytes, the largest layout); anything bigger is a framing error.
MAX_PAYLOAD = 4096
# Memory table messages carry at most 8 regions (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_TABLE_REGIONS = 8
MAX_CONFIG_SIZE = 256
MAX_FDS = 8

# Bits 0-7 of the u64 payload of SET_VRING_KICK/CALL/ERR carry the index,
# bit 8 says "no fd attached: poll instead".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
# SET_VRING_ADDR flags: VHOST_VRING_F_LOG, log the ring's used-ring writes
# at log_guest_addr (vhost-user.rst, "Migration").
VRING_F_LOG = 1 << 0

# Feature bit that advertises GET/SET_PROTOCOL_FEATURES (the spec reuses the
# reserved virtio bit 30).
VHOST_USER_F_PROTOCOL_FEATURES = int(Transport.PROTOCOL_FEATURES)

__all__ = ["BackendRequest", "ProtocolFeature", "Request", "protocol_feature_names"]


# ---------------------------------------------------------------- layouts

Header = Struct("request" / Int32un, "flags" / Int32un, "size" / Int32un)

U64 = Struct("u64" / Int64un)
VringState = Struct("index" / Int32un, "num" / Int32un)
VringAddr = Struct(
    "index" / Int32un,
    "flags" / Int32un,
    "desc_user_addr" / Int64un,
    "used_user_addr" / Int64un,
    "avail_user_addr" / Int64un,
    "log_guest_addr" / Int64un,
)
MemoryRegion = Struct(
    "guest_phys_addr" / Int64un,
    "memory_size" / Int64un,
    "userspace_addr" / Int64un,
    "mmap_offset" / Int64un,
)
MEMORY_REGION_SIZE = MemoryRegion.sizeof()
MemTable = Struct(
    "nregions" / Int32un,
    Padding(4),
    "regions" / Array(this.nregions, MemoryRegion),
)
SingleMemReg = Struct(Padding(8), "region" / MemoryRegion)
Log = Struct("mmap_size" / Int64un, "mmap_offset" / Int64un)
# struct vhost_iotlb_msg is not packed: 3 x u64, 2 x u8, 6 bytes padding.
Iotlb = Struct(
    "iova" / Int64un,
    "size" / Int64un,
    "uaddr" / Int64un,
    "perm" / Int8un,
    "type" / Int8un,
    Padding(6),
)
CONFIG_HEADER_SIZE = 12
Config = Struct(
    "offset" / Int32un,
    "size" / Int32un,
    "flags" / Int32un,
    "payload" / GreedyBytes,
)
VringArea = Struct("u64" / Int64un, "size" / Int64un, "offset" / Int64un)
Inflight = Struct(
    "mmap_size" / Int64un,
    "mmap_offset" / Int64un,
    "num_queues" / Int16un,
    "queue_size" / Int16un,
    Padding(4),
)
# The crypto session layout is device-specific and long; only the session
# id is interpreted here, the rest is carried through as bytes.
CryptoSession = Struct("session_id" / Int64sn, "rest" / GreedyBytes)
Shared = Struct("uuid" / Bytes(16))
DeviceStateTransfer = Struct("direction" / Int32un, "phase" / Int32un)
Empty = Struct()
RarpMac = Struct("mac" / Bytes(6), Padding(2))

CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_MIGRATION = 1


# ---------------------------------------------------------------- size rules

SizeRule = Callable[[bytes], "str | None"]
"""A payload size rule: the payload in, None if its size is right, else
what is wrong with it."""


def exact(*sizes: int) -> SizeRule:
    allowed = frozenset(sizes)
    want = " or ".join(str(s) for s in sorted(allowed))

    def rule(payload: bytes) -> str | None:
        return None if len(payload) in allowed else f"payload is {len(payload)} bytes, expected {want}"
    return rule


def _mem_table_size(payload: bytes) -> str | None:
    size = len(payload)
    if size < 8:
        return f"payload is {size} bytes, too short for a memory table"
    n = int.from_bytes(payload[:4], "little")
    if n > MAX_MEM_TABLE_REGIONS:
        return f"{n} regions, at most {MAX_MEM_TABLE_REGIONS}"
    # QEMU and DPDK send exactly the regions in use; a front-end sending
    # the whole 8-slot array is also well-formed.
    if size not in (8 + n * MEMORY_REGION_SIZE, 8 + MAX_MEM_TABLE_REGIONS * MEMORY_REGION_SIZE):
        return f"payload is {size} bytes for {n} regions"
    return None


def _config_size(payload: bytes) -> str | None:
    size = len(payload)
    if size < CONFIG_HEADER_SIZE:
        return f"payload is {size} bytes, shorter than the config header"
    csize = int.from_bytes(payload[4:8], "little")
    if csize > MAX_CONFIG_SIZE:
        return f"config size {csize} exceeds {MAX_CONFIG_SIZE}"
    if size != CONFIG_HEADER_SIZE + csize:
        return f"payload is {size} bytes, header says {csize} config bytes"
    return None


def at_least(minimum: int, what: str) -> SizeRule:
    def rule(payload: bytes) -> str | None:
        if len(payload) < minimum:
            return f"payload is {len(payload)} bytes, too short for {what}"
        return None
    return rule


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class MessageSpec:
    """One row of the request table (style.md: one table, one row a message).

    ``size`` checks the payload size (``exact(...)`` for fixed layouts).
    ``fds`` is the inclusive (min, max) number of file descriptors the
    request may carry.  ``reply`` is the reply layout of requests that
    always reply (not counting REPLY_ACK), else None; ``reply_with`` names
    the protocol feature without which such a request does not reply
    (SET_LOG_BASE replies only with LOG_SHMFD).  ``event`` is the event
    type (``vuser.events``) the request becomes.
    """

    layout: Construct
    size: SizeRule
    event: type[E.Event]
    fds: tuple[int, int] = (0, 0)
    reply: Construct | None = None
    reply_with: ProtocolFeature | None = None

    def replies(self, protocol_features: int) -> bool:
        """Does this request bring a reply of its own (REPLY_ACK aside)
        once ``protocol_features`` are negotiated?"""
        if self.reply is None:
            return False
        return self.reply_with is None or bool(protocol_features & (1 << self.reply_with))


def _fixed(layout: Construct, event: type[E.Event], fds: tuple[int, int] = (0, 0),
           reply: Construct | None = None, also: tuple[int, ...] = (),
           reply_with: ProtocolFeature | None = None) -> MessageSpec:
    return MessageSpec(layout, exact(layout.sizeof(), *also), event, fds, reply, reply_with)


# QEMU sends GET_* requests with size 0, but some front-ends put a u64 (0)
# payload on them; both are accepted for the payload-less requests that
# reply with a u64.
def _query() -> MessageSpec:
    return MessageSpec(Empty, exact(0, 8), E.Query, reply=U64)


REQUESTS: Mapping[Request, MessageSpec] = {
    Request.GET_FEATURES: _query(),
    Request.SET_FEATURES: _fixed(U64, E.FeaturesSet),
    Request.SET_OWNER: _fixed(Empty, E.OwnerSet),
    Request.RESET_OWNER: _fixed(Empty, E.RingsReset),
    Request.SET_MEM_TABLE: MessageSpec(MemTable, _mem_table_size, E.MemTableSet, fds=(0, MAX_MEM_TABLE_REGIONS)),
    Request.SET_LOG_BASE: _fixed(Log, E.LogBaseSet, fds=(0, 1), reply=U64,
                                 reply_with=ProtocolFeature.LOG_SHMFD),
    Request.SET_LOG_FD: _fixed(Empty, E.LogFdSet, fds=(1, 1), also=(8,)),
    Request.SET_VRING_NUM: _fixed(VringState, E.VringNum),
    Request.SET_VRING_ADDR: _fixed(VringAddr, E.VringAddr),
    Request.SET_VRING_BASE: _fixed(VringState, E.VringBase),
    Request.GET_VRING_BASE: _fixed(VringState, E.VringStop, reply=VringState),
    Request.SET_VRING_KICK: _fixed(U64, E.VringFd, fds=(0, 1)),
    Request.SET_VRING_CALL: _fixed(U64, E.VringFd, fds=(0, 1)),
    Request.SET_VRING_ERR: _fixed(U64, E.VringFd, fds=(0, 1)),
    Request.GET_PROTOCOL_FEATURES: _query(),
    Request.SET_PROTOCOL_FEATURES: _fixed(U64, E.ProtocolFeaturesSet),
    Request.GET_QUEUE_NUM: _query(),
    Request.SET_VRING_ENABLE: _fixed(VringState, E.VringEnable),
    Request.SEND_RARP: _fixed(RarpMac, E.DeviceRequest),
    Request.NET_SET_MTU: _fixed(U64, E.DeviceRequest),
    Request.SET_BACKEND_REQ_FD: _fixed(Empty, E.BackendChannelSet, fds=(1, 1), also=(8,)),
    Request.IOTLB_MSG: _fixed(Iotlb, E.Unsupported, reply=U64),
    Request.SET_VRING_ENDIAN: _fixed(VringState, E.Unsupported),
    Request.GET_CONFIG: MessageSpec(Config, _config_size, E.ConfigRead, reply=Config),
    Request.SET_CONFIG: MessageSpec(Config, _config_size, E.ConfigWrite),
    Request.CREATE_CRYPTO_SESSION: MessageSpec(CryptoSession, at_least(8, "a crypto session"),
                                               E.Unsupported, reply=CryptoSession),
    Request.CLOSE_CRYPTO_SESSION: _fixed(U64, E.Unsupported),
    Request.POSTCOPY_ADVISE: _fixed(Empty, E.Unsupported, reply=U64),
    Request.POSTCOPY_LISTEN: _fixed(Empty, E.Unsupported),
    Request.POSTCOPY_END: _fixed(Empty, E.Unsupported, reply=U64),
    Request.GET_INFLIGHT_FD: _fixed(Inflight, E.Unsupported, reply=Inflight),
    Request.SET_INFLIGHT_FD: _fixed(Inflight, E.Unsupported, fds=(1, 1)),
    Request.GPU_SET_SOCKET: _fixed(Empty, E.Unsupported, fds=(1, 1)),
    Request.RESET_DEVICE: _fixed(Empty, E.RingsReset),
    Request.VRING_KICK: _fixed(VringState, E.VringKickInband),
    Request.GET_MAX_MEM_SLOTS: _query(),
    Request.ADD_MEM_REG: _fixed(SingleMemReg, E.MemRegionAdded, fds=(1, 1)),
    Request.REM_MEM_REG: _fixed(SingleMemReg, E.MemRegionRemoved, fds=(0, 1)),
    Request.SET_STATUS: _fixed(U64, E.StatusSet),
    Request.GET_STATUS: _query(),
    Request.GET_SHARED_OBJECT: _fixed(Shared, E.Unsupported, reply=U64),
    Request.SET_DEVICE_STATE_FD: _fixed(DeviceStateTransfer, E.Unsupported, fds=(1, 1), reply=U64),
    Request.CHECK_DEVICE_STATE: _fixed(Empty, E.Unsupported, reply=U64),
}

# Back-end channel requests are only ever sent by vuser and read by the
# harness: their rows carry no event.
BACKEND_REQUESTS: Mapping[BackendRequest, MessageSpec] = {
    BackendRequest.IOTLB_MSG: _fixed(Iotlb, E.Event),
    BackendRequest.CONFIG_CHANGE_MSG: _fixed(Empty, E.Event),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: _fixed(VringArea, E.Event, fds=(0, 1)),
    BackendRequest.VRING_CALL: _fixed(VringState, E.Event),
    BackendRequest.VRING_ERR: _fixed(VringState, E.Event),
    BackendRequest.SHARED_OBJECT_ADD: _fixed(Shared, E.Event),
    BackendRequest.SHARED_OBJECT_REMOVE: _fixed(Shared, E.Event),
    BackendRequest.SHARED_OBJECT_LOOKUP: _fixed(Shared, E.Event, fds=(0, 1), reply=U64),
}


class WireError(Exception):
    """A message that is syntactically wrong: bad header, size or fd count."""

    def __init__(self, request: str, fault: str) -> None:
        super().__init__(f"{request}: {fault}")
        self.request = request
        self.fault = fault


@dataclass(frozen=True)
class RawHeader:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def request_name(code: int, backend: bool = False) -> str:
    enum_type: type[enum.IntEnum] = BackendRequest if backend else Request
    try:
        return enum_type(code).name
    except ValueError:
        return f"request {code}"


def decode_header(data: bytes) -> RawHeader:
    if len(data) != HEADER_SIZE:
        raise WireError("header", f"{len(data)} bytes, expected {HEADER_SIZE}")
    h = Header.parse(data)
    if h.flags & FLAG_VERSION_MASK != VERSION:
        raise WireError(request_name(h.request), f"unsupported version {h.flags & FLAG_VERSION_MASK}")
    if h.flags & ~KNOWN_FLAGS:
        raise WireError(request_name(h.request), f"reserved flag bits set: {h.flags:#x}")
    if h.size > MAX_PAYLOAD:
        raise WireError(request_name(h.request), f"payload size {h.size} exceeds {MAX_PAYLOAD}")
    return RawHeader(h.request, h.flags, h.size)


def encode_header(request: int, flags: int, size: int) -> bytes:
    return bytes(Header.build(dict(request=request, flags=flags | VERSION, size=size)))


def spec_for(code: int, backend: bool = False) -> MessageSpec:
    table: Mapping[Any, MessageSpec] = BACKEND_REQUESTS if backend else REQUESTS
    try:
        key: enum.IntEnum = BackendRequest(code) if backend else Request(code)
    except ValueError:
        raise WireError(request_name(code, backend), "unknown request") from None
    return table[key]


def decode_payload(code: int, payload: bytes, nfds: int, backend: bool = False) -> Any:
    """Check size and fd count of a request and parse its payload.

    Checks follow rust-vmm's order: fds allowed for this request, exact
    payload size, then parse.  Returns a construct Container (dict-like).
    """
    spec = spec_for(code, backend)
    name = request_name(code, backend)
    lo, hi = spec.fds
    if not lo <= nfds <= hi:
        raise WireError(name, f"carries {nfds} fds, expected {lo}..{hi}" if lo != hi
                        else f"carries {nfds} fds, expected {lo}")
    fault = spec.size(payload)
    if fault is not None:
        raise WireError(name, fault)
    if not payload or spec.layout is Empty:
        return {}
    try:
        return spec.layout.parse(payload)
    except ConstructError as exc:  # pragma: no cover - sizes were checked above
        raise WireError(name, f"malformed payload: {exc}") from None


def encode(code: int, payload: Mapping[str, Any] | None = None, *, flags: int = 0,
           backend: bool = False, layout: Construct | None = None) -> bytes:
    """Build a whole message (header + payload) for request ``code``.

    ``layout`` overrides the request's layout (used for replies).
    """
    spec = spec_for(code, backend)
    lay = layout if layout is not None else spec.layout
    body = b"" if lay is Empty else lay.build(dict(payload or {}))
    return encode_header(code, flags, len(body)) + body


def encode_reply(code: int, layout: Construct, payload: Mapping[str, Any]) -> bytes:
    body = bytes(layout.build(dict(payload)))
    return encode_header(code, FLAG_REPLY, len(body)) + body


def encode_u64_reply(code: int, value: int) -> bytes:
    return encode_reply(code, U64, {"u64": value})


def decode_reply(code: int, payload: bytes, backend: bool = False) -> Any:
    """Parse a reply payload to request ``code`` (front-end side)."""
    spec = spec_for(code, backend)
    layout = spec.reply if spec.reply is not None else U64
    name = request_name(code, backend)
    if layout is not Config and layout is not CryptoSession and len(payload) != layout.sizeof():
        raise WireError(name, f"reply payload is {len(payload)} bytes, expected {layout.sizeof()}")
    try:
        return layout.parse(payload)
    except ConstructError as exc:
        raise WireError(name, f"malformed reply: {exc}") from None
