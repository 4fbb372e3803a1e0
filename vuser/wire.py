"""vhost-user wire format: header, request numbers, payload layouts.

Everything here is syntax only (QEMU docs/interop/vhost-user.rst,
"Message Specification"): byte layouts, request numbers, flag bits, how many
file descriptors each request may carry.  Meaning (is this request allowed
now, is the index in range) is the protocol layer's job.  construct objects
never leave this module: callers get plain ``Container``/dict values.

All numbers are in the machine's native byte order (the spec says so), hence
the ``*un`` construct types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

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

# Feature bit that advertises GET/SET_PROTOCOL_FEATURES (the spec reuses the
# reserved virtio bit 30).
VHOST_USER_F_PROTOCOL_FEATURES = 30


class Request(enum.IntEnum):
    """Front-end to back-end requests (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end to front-end requests on the back-end channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def protocol_feature_names(bits: int) -> list[str]:
    names = []
    for bit in range(64):
        if bits & (1 << bit):
            try:
                names.append(ProtocolFeature(bit).name)
            except ValueError:
                names.append(f"bit{bit}")
    return names


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


@dataclass(frozen=True)
class MessageSpec:
    """One row of the request table (style.md: one table, one row a message).

    ``sizes`` is the exact set of payload sizes accepted, or None when the
    layout has a variable size checked by ``size_ok``.  ``fds`` is the
    inclusive (min, max) number of file descriptors the request may carry.
    ``reply`` is the reply layout for requests that always reply (not counting
    REPLY_ACK), else None.
    """

    layout: Construct
    sizes: frozenset[int] | None
    fds: tuple[int, int] = (0, 0)
    reply: Construct | None = None


def _fixed(layout: Construct, fds: tuple[int, int] = (0, 0), reply: Construct | None = None,
           also: tuple[int, ...] = ()) -> MessageSpec:
    return MessageSpec(layout, frozenset((layout.sizeof(), *also)), fds, reply)


def _variable(layout: Construct, fds: tuple[int, int] = (0, 0),
              reply: Construct | None = None) -> MessageSpec:
    return MessageSpec(layout, None, fds, reply)


# QEMU sends GET_* requests with size 0, but some front-ends put a u64 (0)
# payload on them; both are accepted for the payload-less requests that
# reply with a u64.
_NOARG = (0, 8)

REQUESTS: Mapping[Request, MessageSpec] = {
    Request.GET_FEATURES: MessageSpec(Empty, frozenset(_NOARG), reply=U64),
    Request.SET_FEATURES: _fixed(U64),
    Request.SET_OWNER: _fixed(Empty),
    Request.RESET_OWNER: _fixed(Empty),
    Request.SET_MEM_TABLE: _variable(MemTable, fds=(0, MAX_MEM_TABLE_REGIONS)),
    Request.SET_LOG_BASE: _fixed(Log, fds=(0, 1), reply=U64, also=(8,)),
    Request.SET_LOG_FD: _fixed(Empty, fds=(1, 1), also=(8,)),
    Request.SET_VRING_NUM: _fixed(VringState),
    Request.SET_VRING_ADDR: _fixed(VringAddr),
    Request.SET_VRING_BASE: _fixed(VringState),
    Request.GET_VRING_BASE: _fixed(VringState, reply=VringState),
    Request.SET_VRING_KICK: _fixed(U64, fds=(0, 1)),
    Request.SET_VRING_CALL: _fixed(U64, fds=(0, 1)),
    Request.SET_VRING_ERR: _fixed(U64, fds=(0, 1)),
    Request.GET_PROTOCOL_FEATURES: MessageSpec(Empty, frozenset(_NOARG), reply=U64),
    Request.SET_PROTOCOL_FEATURES: _fixed(U64),
    Request.GET_QUEUE_NUM: MessageSpec(Empty, frozenset(_NOARG), reply=U64),
    Request.SET_VRING_ENABLE: _fixed(VringState),
    Request.SEND_RARP: _fixed(RarpMac),
    Request.NET_SET_MTU: _fixed(U64),
    Request.SET_BACKEND_REQ_FD: _fixed(Empty, fds=(1, 1), also=(8,)),
    Request.IOTLB_MSG: _fixed(Iotlb, reply=U64),
    Request.SET_VRING_ENDIAN: _fixed(VringState),
    Request.GET_CONFIG: _variable(Config, reply=Config),
    Request.SET_CONFIG: _variable(Config),
    Request.CREATE_CRYPTO_SESSION: _variable(CryptoSession, reply=CryptoSession),
    Request.CLOSE_CRYPTO_SESSION: _fixed(U64),
    Request.POSTCOPY_ADVISE: _fixed(Empty, reply=U64),
    Request.POSTCOPY_LISTEN: _fixed(Empty),
    Request.POSTCOPY_END: _fixed(Empty, reply=U64),
    Request.GET_INFLIGHT_FD: _fixed(Inflight, reply=Inflight),
    Request.SET_INFLIGHT_FD: _fixed(Inflight, fds=(1, 1)),
    Request.GPU_SET_SOCKET: _fixed(Empty, fds=(1, 1)),
    Request.RESET_DEVICE: _fixed(Empty),
    Request.VRING_KICK: _fixed(VringState),
    Request.GET_MAX_MEM_SLOTS: MessageSpec(Empty, frozenset(_NOARG), reply=U64),
    Request.ADD_MEM_REG: _fixed(SingleMemReg, fds=(1, 1)),
    Request.REM_MEM_REG: _fixed(SingleMemReg, fds=(0, 1)),
    Request.SET_STATUS: _fixed(U64),
    Request.GET_STATUS: MessageSpec(Empty, frozenset(_NOARG), reply=U64),
    Request.GET_SHARED_OBJECT: _fixed(Shared, reply=U64),
    Request.SET_DEVICE_STATE_FD: _fixed(DeviceStateTransfer, fds=(1, 1), reply=U64),
    Request.CHECK_DEVICE_STATE: _fixed(Empty, reply=U64),
}

BACKEND_REQUESTS: Mapping[BackendRequest, MessageSpec] = {
    BackendRequest.IOTLB_MSG: _fixed(Iotlb),
    BackendRequest.CONFIG_CHANGE_MSG: _fixed(Empty),
    BackendRequest.VRING_HOST_NOTIFIER_MSG: _fixed(VringArea, fds=(0, 1)),
    BackendRequest.VRING_CALL: _fixed(VringState),
    BackendRequest.VRING_ERR: _fixed(VringState),
    BackendRequest.SHARED_OBJECT_ADD: _fixed(Shared),
    BackendRequest.SHARED_OBJECT_REMOVE: _fixed(Shared),
    BackendRequest.SHARED_OBJECT_LOOKUP: _fixed(Shared, fds=(0, 1), reply=U64),
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
    return Header.build(dict(request=request, flags=flags | VERSION, size=size))


def spec_for(code: int, backend: bool = False) -> MessageSpec:
    table: Mapping[Any, MessageSpec] = BACKEND_REQUESTS if backend else REQUESTS
    try:
        key: enum.IntEnum = BackendRequest(code) if backend else Request(code)
    except ValueError:
        raise WireError(request_name(code, backend), "unknown request") from None
    return table[key]


def _check_size(code: int, spec: MessageSpec, payload: bytes, backend: bool) -> None:
    name = request_name(code, backend)
    size = len(payload)
    if spec.sizes is not None:
        if size not in spec.sizes:
            want = " or ".join(str(s) for s in sorted(spec.sizes))
            raise WireError(name, f"payload is {size} bytes, expected {want}")
        return
    layout = spec.layout
    if layout is MemTable:
        if size < 8:
            raise WireError(name, f"payload is {size} bytes, too short for a memory table")
        n = int.from_bytes(payload[:4], "little")
        if n > MAX_MEM_TABLE_REGIONS:
            raise WireError(name, f"{n} regions, at most {MAX_MEM_TABLE_REGIONS}")
        # QEMU and DPDK send exactly the regions in use; a front-end sending
        # the whole 8-slot array is also well-formed.
        if size not in (8 + n * MEMORY_REGION_SIZE, 8 + MAX_MEM_TABLE_REGIONS * MEMORY_REGION_SIZE):
            raise WireError(name, f"payload is {size} bytes for {n} regions")
    elif layout is Config:
        if size < CONFIG_HEADER_SIZE:
            raise WireError(name, f"payload is {size} bytes, shorter than the config header")
        csize = int.from_bytes(payload[4:8], "little")
        if csize > MAX_CONFIG_SIZE:
            raise WireError(name, f"config size {csize} exceeds {MAX_CONFIG_SIZE}")
        if size != CONFIG_HEADER_SIZE + csize:
            raise WireError(name, f"payload is {size} bytes, header says {csize} config bytes")
    elif layout is CryptoSession:
        if size < 8:
            raise WireError(name, f"payload is {size} bytes, too short for a crypto session")


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
    _check_size(code, spec, payload, backend)
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
    body = layout.build(dict(payload))
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
