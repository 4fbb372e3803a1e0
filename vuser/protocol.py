"""Sans-I/O vhost-user back-end session.

Input is one message (header, payload bytes, received fds); output is one
event (``vuser.events``) describing what the front-end asked for, and, once
the caller has acted on it, the reply bytes to send (if any).  The session
never touches sockets, memory or tasks (style.md, after h11): it keeps the
protocol state — protocol features, owner, the feature negotiation
(``vuser.negotiation``) — and checks the meaning of every request.

Usage::

    event = session.receive(header, payload, fds)   # may raise ProtocolError
    result = ... act on event ...                   # None, int, bytes or Refusal
    reply = session.reply(event, result)            # bytes or None

Dispatch: ``wire.REQUESTS`` says how each request looks and which event it
becomes; ``Session._CHECKS`` (one entry per request) checks its meaning and
builds that event.  Requests of protocol features never offered (IOTLB,
crypto, postcopy, inflight, GPU, shared objects, device state,
cross-endian) have no check: receiving one is a protocol violation,
reported by name.

Errors: a front-end that breaks the protocol gets a ProtocolError naming the
request and the fault; the session is then permanently broken (every later
call raises) and the caller closes the connection and every fd it received.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from . import events as E
from . import wire
from .negotiation import Negotiation, NegotiationError, StatusChange
from .virtio import MAX_QUEUE_SIZE, Transport, has
from .wire import ProtocolFeature as PF
from .wire import Request as R

MAX_MEM_SLOTS = 64

# Protocol features this implementation can honour.  CONFIG is added only
# for devices with a config space; RARP / MTU only for devices that ask.
# LOG_SHMFD: live migration's dirty page log (vuser.dirtylog).
SUPPORTED_PROTOCOL_FEATURES = (
    (1 << PF.MQ)
    | (1 << PF.LOG_SHMFD)
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


Check = Callable[["Session", R, bool, Any, list[int]], E.Event]


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
    # Protocol features this device must not offer (net: CONFIGURE_MEM_SLOTS).
    excluded_protocol_features: int = 0

    acked_protocol_features: int = 0
    owner: bool = False
    broken: ProtocolError | None = None
    features_set_count: int = 0
    negotiation: Negotiation = field(init=False)

    def __post_init__(self) -> None:
        self.offered_features |= 1 << wire.VHOST_USER_F_PROTOCOL_FEATURES
        self.negotiation = Negotiation(self.offered_features)

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
    def accepted_features(self) -> int | None:
        return self.negotiation.accepted

    @property
    def negotiated_features(self) -> int | None:
        return self.negotiation.negotiated

    @property
    def effective_features(self) -> int:
        """Features the rings and device should follow right now."""
        return self.negotiation.effective

    @property
    def status(self) -> int:
        return self.negotiation.status

    @property
    def needs_reset(self) -> bool:
        return self.negotiation.needs_reset

    # ------------------------------------------------------------ input

    def receive(self, header: wire.RawHeader, payload: bytes, fds: list[int]) -> E.Event:
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
            req = R(header.request)
            check = self._CHECKS.get(req)
            if check is None:
                raise ProtocolError(req.name, "not supported by this back-end (its protocol feature "
                                              "was not offered)")
            try:
                return check(self, req, header.need_reply, body, fds)
            except NegotiationError as exc:
                raise ProtocolError(req.name, str(exc)) from None
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

    # ------------------------------------------------------------ checks (one per request)

    def _query(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        return E.Query(req, nr)

    def _set_features(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self.negotiation.set_features(body.u64)
        self.features_set_count += 1
        return E.FeaturesSet(req, nr, body.u64)

    def _set_protocol_features(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        extra = body.u64 & ~self.offered_protocol_features
        if extra:
            raise ProtocolError(req.name, f"protocol features not offered: {wire.protocol_feature_names(extra)}")
        self.acked_protocol_features = body.u64
        return E.ProtocolFeaturesSet(req, nr, body.u64)

    def _set_owner(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self.owner = True
        return E.OwnerSet(req, nr)

    def _reset_owner(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        return E.RingsReset(req, nr, full=False)

    def _reset_device(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self.negotiation.reset()
        return E.RingsReset(req, nr, full=True)

    def _set_mem_table(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        regions = tuple(_region(r) for r in body.regions)
        if len(regions) != len(fds):
            raise ProtocolError(req.name, f"{len(regions)} regions but {len(fds)} fds")
        for r in regions:
            _check_region(req, r)
        return E.MemTableSet(req, nr, regions, tuple(fds))

    def _add_mem_reg(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._require(req, PF.CONFIGURE_MEM_SLOTS)
        region = _region(body.region)
        _check_region(req, region)
        return E.MemRegionAdded(req, nr, region, fds[0])

    def _rem_mem_reg(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._require(req, PF.CONFIGURE_MEM_SLOTS)
        return E.MemRegionRemoved(req, nr, _region(body.region), fds[0] if fds else None)

    @property
    def _packed(self) -> bool:
        """Rings in the packed layout (the features are sent before rings
        are set up: QEMU's vhost_dev_start, DPDK's virtio_user_start_device)."""
        return has(self.effective_features, Transport.RING_PACKED)

    def _set_vring_num(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        num = body.num
        # Split sizes are powers of 2 (virtio 2.7); packed ones need not be (2.6).
        if not 1 <= num <= MAX_QUEUE_SIZE or (num & (num - 1) and not self._packed):
            raise ProtocolError(req.name, f"queue size {num} is not "
                                f"{'' if self._packed else 'a power of 2 '}in 1..{MAX_QUEUE_SIZE}")
        return E.VringNum(req, nr, self._index(req, body.index), num)

    def _set_vring_addr(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        if body.flags & ~wire.VRING_F_LOG:
            raise ProtocolError(req.name, f"unknown flags {body.flags:#x} (only VHOST_VRING_F_LOG is defined)")
        return E.VringAddr(req, nr, self._index(req, body.index), body.flags, body.desc_user_addr,
                           body.used_user_addr, body.avail_user_addr, body.log_guest_addr)

    def _set_vring_base(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        # Packed rings carry both indexes and wrap counters (vhost-user.rst).
        if body.num > 0xFFFF and not self._packed:
            raise ProtocolError(req.name, f"base {body.num:#x} does not fit a split ring index")
        return E.VringBase(req, nr, self._index(req, body.index), body.num)

    def _get_vring_base(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        return E.VringStop(req, nr, self._index(req, body.index))

    def _set_vring_fd(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
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
        return E.VringFd(req, nr, index, None if nofd else fds[0])

    def _set_vring_enable(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        if body.num > 1:
            raise ProtocolError(req.name, f"enable value {body.num} is not 0 or 1")
        return E.VringEnable(req, nr, self._index(req, body.index), bool(body.num))

    def _vring_kick(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._require(req, PF.INBAND_NOTIFICATIONS)
        return E.VringKickInband(req, nr, self._index(req, body.index))

    def _set_backend_req_fd(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._require(req, PF.BACKEND_REQ)
        return E.BackendChannelSet(req, nr, fds[0])

    def _config_range(self, req: R, body: Any) -> None:
        if body.offset + body.size > wire.MAX_CONFIG_SIZE:
            raise ProtocolError(req.name, f"offset {body.offset} + size {body.size} beyond config space")

    def _get_config(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._config_range(req, body)
        return E.ConfigRead(req, nr, body.offset, body.size, body.flags)

    def _set_config(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._config_range(req, body)
        return E.ConfigWrite(req, nr, body.offset, bytes(body.payload), body.flags)

    def _set_status(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        if body.u64 > 0xFF:
            raise ProtocolError(req.name, f"status {body.u64:#x} does not fit 8 bits")
        change = self.negotiation.set_status(body.u64)
        return E.StatusSet(req, nr, change.status, change.features_ok_requested, change.accepted)

    def _send_rarp(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._require(req, PF.RARP)
        return E.DeviceRequest(req, nr, bytes(body.mac))

    def _set_log_base(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        # Without LOG_SHMFD the log is the front-end's own memory (the
        # kernel's VHOST_SET_LOG_BASE): nothing a back-end could map.
        self._require(req, PF.LOG_SHMFD)
        if len(fds) != 1:
            raise ProtocolError(req.name, "no log fd attached")
        if body.mmap_offset + body.mmap_size > 1 << 64:
            raise ProtocolError(req.name, f"log at offset {body.mmap_offset:#x} size {body.mmap_size:#x} "
                                          "wraps 2^64")
        return E.LogBaseSet(req, nr, body.mmap_size, body.mmap_offset, fds[0])

    def _set_log_fd(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        # Not tied to a protocol feature (vhost-user.rst; QEMU never sends it).
        return E.LogFdSet(req, nr, fds[0])

    def _net_set_mtu(self, req: R, nr: bool, body: Any, fds: list[int]) -> E.Event:
        self._require(req, PF.MTU)
        return E.DeviceRequest(req, nr, body.u64)

    _CHECKS: ClassVar[Mapping[R, Check]] = {
        R.GET_FEATURES: _query,
        R.GET_PROTOCOL_FEATURES: _query,
        R.GET_QUEUE_NUM: _query,
        R.GET_MAX_MEM_SLOTS: _query,
        R.GET_STATUS: _query,
        R.SET_FEATURES: _set_features,
        R.SET_PROTOCOL_FEATURES: _set_protocol_features,
        R.SET_OWNER: _set_owner,
        R.RESET_OWNER: _reset_owner,
        R.RESET_DEVICE: _reset_device,
        R.SET_MEM_TABLE: _set_mem_table,
        R.ADD_MEM_REG: _add_mem_reg,
        R.REM_MEM_REG: _rem_mem_reg,
        R.SET_VRING_NUM: _set_vring_num,
        R.SET_VRING_ADDR: _set_vring_addr,
        R.SET_VRING_BASE: _set_vring_base,
        R.GET_VRING_BASE: _get_vring_base,
        R.SET_VRING_KICK: _set_vring_fd,
        R.SET_VRING_CALL: _set_vring_fd,
        R.SET_VRING_ERR: _set_vring_fd,
        R.SET_VRING_ENABLE: _set_vring_enable,
        R.VRING_KICK: _vring_kick,
        R.SET_BACKEND_REQ_FD: _set_backend_req_fd,
        R.GET_CONFIG: _get_config,
        R.SET_CONFIG: _set_config,
        R.SET_STATUS: _set_status,
        R.SEND_RARP: _send_rarp,
        R.NET_SET_MTU: _net_set_mtu,
        R.SET_LOG_BASE: _set_log_base,
        R.SET_LOG_FD: _set_log_fd,
    }

    def start_ring(self, index: int) -> None:
        """A ring starts (kick fd received): negotiation rule 8."""
        self.negotiation.ring_started(self.has_protocol(PF.STATUS))

    def mark_needs_reset(self) -> None:
        """The guest put garbage in a ring: report DEVICE_NEEDS_RESET through
        GET_STATUS (virtio spec 2.1.2) until the driver resets the device."""
        self.negotiation.needs_reset = True

    # ------------------------------------------------------------ output

    def reply(self, event: E.Event, result: Any = None) -> bytes | None:
        """Build the reply to ``event`` given the caller's ``result``.

        REPLY_ACK is handled here (style.md: it is the core's job): a request
        that has no reply of its own gets a u64 ack when the front-end set
        NEED_REPLY and REPLY_ACK was negotiated — 0 for success, 1 for a
        Refusal.
        """
        req = event.request
        refused = isinstance(result, E.Refusal)
        if isinstance(event, E.Query):
            return wire.encode_u64_reply(req, self._answer(req))
        if isinstance(event, E.VringStop):
            base = 0 if refused or result is None else int(result)
            return wire.encode_reply(req, wire.VringState, {"index": event.index, "num": base})
        if isinstance(event, E.ConfigRead):
            if refused or result is None:
                # The spec's error signal: a reply with an empty payload.
                return wire.encode_header(req, wire.FLAG_REPLY, 0)
            data = bytes(result)
            if len(data) != event.size:
                raise ValueError(f"config read returned {len(data)} bytes, {event.size} asked")
            return wire.encode_reply(req, wire.Config, {"offset": event.offset, "size": event.size,
                                                         "flags": event.flags, "payload": data})
        if isinstance(event, E.LogBaseSet):
            # QEMU reads a reply of any size (vhost_user_set_log_base);
            # libvhost-user and passt send a u64 0, as here.
            return wire.encode_u64_reply(req, 1 if refused else 0)
        if isinstance(event, E.StatusSet):
            self.negotiation.settle(StatusChange(event.status, event.features_ok_requested, event.accepted),
                                    refused)
        if event.need_reply and self.reply_ack:
            return wire.encode_u64_reply(req, 1 if refused else 0)
        return None

    def _answer(self, req: R) -> int:
        answers = {
            R.GET_FEATURES: lambda: self.offered_features,
            R.GET_PROTOCOL_FEATURES: lambda: self.offered_protocol_features,
            R.GET_QUEUE_NUM: lambda: self.num_queues if self.queue_num is None else self.queue_num,
            R.GET_MAX_MEM_SLOTS: lambda: self.max_mem_slots,
            R.GET_STATUS: lambda: self.negotiation.device_status,
        }
        return int(answers[req]())


def _region(c: Any) -> E.MemRegion:
    return E.MemRegion(c.guest_phys_addr, c.memory_size, c.userspace_addr, c.mmap_offset)


def _check_region(req: R, r: E.MemRegion) -> None:
    if r.size == 0:
        raise ProtocolError(req.name, "memory region of size 0")
    if r.gpa + r.size > 1 << 64 or r.uva + r.size > 1 << 64:
        raise ProtocolError(req.name, "memory region wraps the address space")
