"""Sans-I/O vhost-user back-end session.

Input is one message (header, payload bytes, received fds); output is one
event describing what the front-end asked for, and, once the caller has acted
on it, the reply bytes to send (if any).  The session never touches sockets,
memory or tasks (style.md, after h11): it keeps the protocol state —
features offered / accepted / negotiated, protocol features, status, owner —
and checks the meaning of every request.

Usage::

    event = session.receive(header, payload, fds)   # may raise ProtocolError
    result = ... act on event ...                   # None, int, bytes or Refusal
    reply = session.reply(event, result)            # bytes or None

Errors: a front-end that breaks the protocol gets a ProtocolError naming the
request and the fault; the session is then permanently broken (every later
call raises) and the caller closes the connection and every fd it received.

Features (seeds 002, 004; design.md semantics 1 and 6): the device *offers*
``offered_features``; each SET_FEATURES replaces the *accepted* set (it may
come many times, including 0); the accepted set becomes *negotiated* only
when FEATURES_OK is set through SET_STATUS and the device did not refuse it.
Front-ends without the STATUS protocol feature (QEMU 7.2's rng, DPDK
without STATUS) send SET_FEATURES once when the device starts, so there the
accepted set is taken as negotiated when the first ring starts
(``start_ring``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import wire
from .wire import ProtocolFeature as PF
from .wire import Request as R

log = logging.getLogger(__name__)

# virtio device status bits (virtio spec 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

VIRTIO_F_VERSION_1 = 32

MAX_MEM_SLOTS = 64
MAX_VRING_NUM = 32768

# Protocol features this implementation can honour.  CONFIG is added only
# for devices with a config space; RARP / MTU only for devices that ask.
SUPPORTED_PROTOCOL_FEATURES = (
    (1 << PF.MQ)
    | (1 << PF.REPLY_ACK)
    | (1 << PF.BACKEND_REQ)
    | (1 << PF.STATUS)
    | (1 << PF.RESET_DEVICE)
    | (1 << PF.CONFIGURE_MEM_SLOTS)
)


class ProtocolError(Exception):
    """The front-end broke the protocol; close the connection."""

    def __init__(self, request: str, fault: str) -> None:
        super().__init__(f"{request}: {fault}")
        self.request = request
        self.fault = fault


@dataclass(frozen=True)
class Refusal:
    """Result for a request the back-end declines (REPLY_ACK non-zero)."""

    reason: str


# ----------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    request: R
    need_reply: bool


@dataclass(frozen=True)
class Query(Event):
    """GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
    GET_STATUS: answered by the session itself."""


@dataclass(frozen=True)
class FeaturesSet(Event):
    """SET_FEATURES: the accepted set changed (not final, seed 004)."""

    features: int


@dataclass(frozen=True)
class ProtocolFeaturesSet(Event):
    features: int


@dataclass(frozen=True)
class OwnerSet(Event):
    pass


@dataclass(frozen=True)
class RingsReset(Event):
    """RESET_OWNER (deprecated: disable all rings), RESET_DEVICE or
    SET_STATUS(0): stop every ring and reset the device state."""

    full: bool


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(frozen=True)
class MemTableSet(Event):
    regions: tuple[MemRegion, ...]
    fds: tuple[int, ...]


@dataclass(frozen=True)
class MemRegionAdded(Event):
    region: MemRegion
    fd: int


@dataclass(frozen=True)
class MemRegionRemoved(Event):
    region: MemRegion
    fd: int | None


@dataclass(frozen=True)
class VringNum(Event):
    index: int
    num: int


@dataclass(frozen=True)
class VringAddr(Event):
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class VringBase(Event):
    index: int
    base: int


@dataclass(frozen=True)
class VringStop(Event):
    """GET_VRING_BASE: stop the ring; the result is the next avail index."""

    index: int


@dataclass(frozen=True)
class VringFd(Event):
    """SET_VRING_KICK / CALL / ERR.  ``fd`` is None when the front-end asks
    for polling (bit 8 of the payload)."""

    index: int
    fd: int | None


@dataclass(frozen=True)
class VringEnable(Event):
    index: int
    enable: bool


@dataclass(frozen=True)
class VringKickInband(Event):
    index: int


@dataclass(frozen=True)
class BackendChannelSet(Event):
    fd: int


@dataclass(frozen=True)
class ConfigRead(Event):
    """GET_CONFIG; the result is the bytes (exactly ``size`` of them)."""

    offset: int
    size: int
    flags: int


@dataclass(frozen=True)
class ConfigWrite(Event):
    offset: int
    data: bytes
    flags: int


@dataclass(frozen=True)
class StatusSet(Event):
    """SET_STATUS.  ``features_ok_requested`` is true when this write sets
    FEATURES_OK for the first time: the caller validates ``accepted`` and
    returns a Refusal to refuse it (the bit then does not stick)."""

    status: int
    features_ok_requested: bool
    accepted: int


@dataclass(frozen=True)
class DeviceRequest(Event):
    """Device-specific requests the session does not interpret
    (SEND_RARP, NET_SET_MTU): passed to the device."""

    payload: Any


EVENT_FD_REQUESTS = {R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR}


@dataclass
class Session:
    """Protocol state of one front-end connection."""

    offered_features: int
    num_queues: int
    has_config: bool = False
    extra_protocol_features: int = 0
    max_mem_slots: int = MAX_MEM_SLOTS
    # GET_QUEUE_NUM's answer when it is not num_queues: virtio-net counts
    # queue pairs (QEMU compares it with the netdev's queues=N).
    queue_num: int | None = None
    # Protocol features this device must not offer (net: CONFIGURE_MEM_SLOTS,
    # see devices/net.py).
    excluded_protocol_features: int = 0

    acked_protocol_features: int = 0
    accepted_features: int | None = None
    negotiated_features: int | None = None
    status: int = 0
    owner: bool = False
    needs_reset: bool = False
    broken: ProtocolError | None = None
    features_set_count: int = 0
    _rings_started: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.offered_features |= 1 << wire.VHOST_USER_F_PROTOCOL_FEATURES

    # ------------------------------------------------------------ queries

    @property
    def offered_protocol_features(self) -> int:
        bits = SUPPORTED_PROTOCOL_FEATURES | self.extra_protocol_features
        if self.has_config:
            bits |= 1 << PF.CONFIG
        return bits & ~self.excluded_protocol_features

    def has_protocol(self, feature: PF) -> bool:
        return bool(self.acked_protocol_features & (1 << feature))

    @property
    def reply_ack(self) -> bool:
        return self.has_protocol(PF.REPLY_ACK)

    @property
    def effective_features(self) -> int:
        """Features the rings and device should follow right now: the
        negotiated set once there is one, else the latest accepted set."""
        if self.negotiated_features is not None:
            return self.negotiated_features
        return self.accepted_features or 0

    # ------------------------------------------------------------ input

    def receive(self, header: wire.RawHeader, payload: bytes, fds: list[int]) -> Event:
        """Check one request and turn it into an event.

        On error the session is broken for good; the caller still owns (and
        must close) ``fds``.  On success ownership of the fds moves into the
        event.
        """
        if self.broken is not None:
            raise self.broken
        name = wire.request_name(header.request)
        try:
            if header.is_reply:
                raise ProtocolError(name, "reply flag set on a request")
            body = wire.decode_payload(header.request, payload, len(fds))
            return self._event(R(header.request), header.need_reply, body, fds)
        except wire.WireError as exc:
            self.broken = ProtocolError(exc.request, exc.fault)
        except ProtocolError as exc:
            self.broken = exc
        raise self.broken

    def _index(self, req: R, index: int) -> int:
        if index >= self.num_queues:
            raise ProtocolError(req.name, f"vring index {index} out of range (device has {self.num_queues} queues)")
        return index

    def _require(self, req: R, feature: PF) -> None:
        if not self.has_protocol(feature):
            raise ProtocolError(req.name, f"protocol feature {feature.name} not negotiated")

    def _event(self, req: R, nr: bool, body: Any, fds: list[int]) -> Event:
        if req in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
                   R.GET_MAX_MEM_SLOTS, R.GET_STATUS):
            return Query(req, nr)
        if req == R.SET_FEATURES:
            value = body.u64
            unknown = value & ~self.offered_features & ~(1 << 26)  # VHOST_F_LOG_ALL
            if unknown:
                # QEMU 7.2's vhost-user-rng forces ring features on whatever
                # the back-end offers (design.md): accept, but say so.
                log.warning("SET_FEATURES accepts bits that were not offered: %#x", unknown)
            # VHOST_F_LOG_ALL (26) is toggled for migration at any time.
            if self.negotiated_features is not None and self.status & STATUS_FEATURES_OK \
                    and (value ^ self.negotiated_features) & ~(1 << 26):
                raise ProtocolError(req.name, "features changed after FEATURES_OK without a reset")
            self.accepted_features = value
            self.features_set_count += 1
            return FeaturesSet(req, nr, value)
        if req == R.SET_PROTOCOL_FEATURES:
            value = body.u64
            extra = value & ~self.offered_protocol_features
            if extra:
                raise ProtocolError(req.name, f"protocol features not offered: {wire.protocol_feature_names(extra)}")
            self.acked_protocol_features = value
            return ProtocolFeaturesSet(req, nr, value)
        if req == R.SET_OWNER:
            self.owner = True
            return OwnerSet(req, nr)
        if req == R.RESET_OWNER:
            return RingsReset(req, nr, full=False)
        if req == R.RESET_DEVICE:
            self._reset()
            return RingsReset(req, nr, full=True)
        if req == R.SET_MEM_TABLE:
            regions = tuple(_region(r) for r in body.regions)
            if len(regions) != len(fds):
                raise ProtocolError(req.name, f"{len(regions)} regions but {len(fds)} fds")
            for r in regions:
                _check_region(req, r)
            return MemTableSet(req, nr, regions, tuple(fds))
        if req == R.ADD_MEM_REG:
            self._require(req, PF.CONFIGURE_MEM_SLOTS)
            region = _region(body.region)
            _check_region(req, region)
            return MemRegionAdded(req, nr, region, fds[0])
        if req == R.REM_MEM_REG:
            self._require(req, PF.CONFIGURE_MEM_SLOTS)
            return MemRegionRemoved(req, nr, _region(body.region), fds[0] if fds else None)
        if req == R.SET_VRING_NUM:
            num = body.num
            if num == 0 or num > MAX_VRING_NUM or num & (num - 1):
                raise ProtocolError(req.name, f"queue size {num} is not a power of 2 in 1..{MAX_VRING_NUM}")
            return VringNum(req, nr, self._index(req, body.index), num)
        if req == R.SET_VRING_ADDR:
            return VringAddr(req, nr, self._index(req, body.index), body.flags, body.desc_user_addr,
                             body.used_user_addr, body.avail_user_addr, body.log_guest_addr)
        if req == R.SET_VRING_BASE:
            if body.num > 0xFFFF:
                raise ProtocolError(req.name, f"base {body.num:#x} does not fit a split ring index")
            return VringBase(req, nr, self._index(req, body.index), body.num)
        if req == R.GET_VRING_BASE:
            index = self._index(req, body.index)
            self._rings_started.discard(index)
            return VringStop(req, nr, index)
        if req in EVENT_FD_REQUESTS:
            value = body.u64
            if value & ~(wire.VRING_IDX_MASK | wire.VRING_NOFD_MASK):
                raise ProtocolError(req.name, f"reserved bits set in {value:#x}")
            nofd = bool(value & wire.VRING_NOFD_MASK)
            if nofd and fds:
                raise ProtocolError(req.name, "fd attached although the no-fd flag is set")
            if not nofd and not fds:
                raise ProtocolError(req.name, "no fd attached and the no-fd flag is clear")
            index = self._index(req, value & wire.VRING_IDX_MASK)
            if req == R.SET_VRING_KICK:
                self.start_ring(index)
            return VringFd(req, nr, index, None if nofd else fds[0])
        if req == R.SET_VRING_ENABLE:
            if body.num > 1:
                raise ProtocolError(req.name, f"enable value {body.num} is not 0 or 1")
            return VringEnable(req, nr, self._index(req, body.index), bool(body.num))
        if req == R.VRING_KICK:
            self._require(req, PF.INBAND_NOTIFICATIONS)
            return VringKickInband(req, nr, self._index(req, body.index))
        if req == R.SET_BACKEND_REQ_FD:
            self._require(req, PF.BACKEND_REQ)
            return BackendChannelSet(req, nr, fds[0])
        if req == R.GET_CONFIG:
            if body.offset + body.size > wire.MAX_CONFIG_SIZE:
                raise ProtocolError(req.name, f"offset {body.offset} + size {body.size} beyond config space")
            return ConfigRead(req, nr, body.offset, body.size, body.flags)
        if req == R.SET_CONFIG:
            if body.offset + body.size > wire.MAX_CONFIG_SIZE:
                raise ProtocolError(req.name, f"offset {body.offset} + size {body.size} beyond config space")
            return ConfigWrite(req, nr, body.offset, bytes(body.payload), body.flags)
        if req == R.SET_STATUS:
            value = body.u64
            if value > 0xFF:
                raise ProtocolError(req.name, f"status {value:#x} does not fit 8 bits")
            if value == 0:
                self._reset()
                return StatusSet(req, nr, 0, False, 0)
            first_ok = bool(value & STATUS_FEATURES_OK) and not self.status & STATUS_FEATURES_OK
            if (value & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK
                    and self.negotiated_features is None and self.accepted_features is not None
                    and not self.accepted_features & (1 << VIRTIO_F_VERSION_1)):
                # A legacy driver (VERSION_1 not accepted, seed 003) has no
                # FEATURES_OK step: its features are final at DRIVER_OK.
                self.negotiated_features = self.accepted_features
            return StatusSet(req, nr, value, first_ok, self.accepted_features or 0)
        if req == R.SEND_RARP:
            self._require(req, PF.RARP)
            return DeviceRequest(req, nr, bytes(body.mac))
        if req == R.NET_SET_MTU:
            self._require(req, PF.MTU)
            return DeviceRequest(req, nr, body.u64)
        # Everything else belongs to protocol features this back-end never
        # offers (logging, IOTLB, crypto, postcopy, inflight, GPU, shared
        # objects, device state, cross-endian): receiving one is a protocol
        # violation, reported by name.
        raise ProtocolError(req.name, "not supported by this back-end (its protocol feature was not offered)")

    def start_ring(self, index: int) -> None:
        """A ring starts (kick fd received).  Without the STATUS protocol
        feature this is where vhost-user's late SET_FEATURES becomes final."""
        self._rings_started.add(index)
        if self.negotiated_features is None and not self.has_protocol(PF.STATUS) \
                and self.accepted_features is not None:
            self.negotiated_features = self.accepted_features

    def _reset(self) -> None:
        self.accepted_features = None
        self.negotiated_features = None
        self.status = 0
        self.needs_reset = False
        self._rings_started.clear()

    def mark_needs_reset(self) -> None:
        """The guest put garbage in a ring: report DEVICE_NEEDS_RESET through
        GET_STATUS (virtio spec 2.1.2) until the driver resets the device."""
        self.needs_reset = True

    # ------------------------------------------------------------ output

    def reply(self, event: Event, result: Any = None) -> bytes | None:
        """Build the reply to ``event`` given the caller's ``result``.

        REPLY_ACK is handled here (style.md: it is the core's job): a request
        that has no reply of its own gets a u64 ack when the front-end set
        NEED_REPLY and REPLY_ACK was negotiated — 0 for success, 1 for a
        Refusal.
        """
        req = event.request
        refused = isinstance(result, Refusal)
        if isinstance(event, Query):
            return wire.encode_u64_reply(req, self._query(req))
        if isinstance(event, VringStop):
            base = 0 if refused or result is None else int(result)
            return wire.encode_reply(req, wire.VringState, {"index": event.index, "num": base})
        if isinstance(event, ConfigRead):
            if refused or result is None:
                # The spec's error signal: a reply with an empty payload.
                return wire.encode_header(req, wire.FLAG_REPLY, 0)
            data = bytes(result)
            if len(data) != event.size:
                raise ValueError(f"config read returned {len(data)} bytes, {event.size} asked")
            return wire.encode_reply(req, wire.Config, {"offset": event.offset, "size": event.size,
                                                         "flags": event.flags, "payload": data})
        if isinstance(event, StatusSet):
            self._apply_status(event, refused)
        if event.need_reply and self.reply_ack:
            return wire.encode_u64_reply(req, 1 if refused else 0)
        return None

    def _apply_status(self, event: StatusSet, refused: bool) -> None:
        if event.status == 0:
            return
        value = event.status
        if event.features_ok_requested:
            if refused:
                value &= ~STATUS_FEATURES_OK
            else:
                self.negotiated_features = event.accepted
        self.status = value

    def _query(self, req: R) -> int:
        if req == R.GET_FEATURES:
            return self.offered_features
        if req == R.GET_PROTOCOL_FEATURES:
            return self.offered_protocol_features
        if req == R.GET_QUEUE_NUM:
            return self.num_queues if self.queue_num is None else self.queue_num
        if req == R.GET_MAX_MEM_SLOTS:
            return self.max_mem_slots
        if req == R.GET_STATUS:
            return self.status | (STATUS_NEEDS_RESET if self.needs_reset else 0)
        raise AssertionError(req)


def _region(c: Any) -> MemRegion:
    return MemRegion(c.guest_phys_addr, c.memory_size, c.userspace_addr, c.mmap_offset)


def _check_region(req: R, r: MemRegion) -> None:
    if r.size == 0:
        raise ProtocolError(req.name, "memory region of size 0")
    if r.gpa + r.size > 1 << 64 or r.uva + r.size > 1 << 64:
        raise ProtocolError(req.name, "memory region wraps the address space")
