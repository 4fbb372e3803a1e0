"""Protocol events: what a front-end asked for, as small frozen dataclasses
(style.md, after h11).

Each row of the request table (``wire.REQUESTS``) names the event its
request becomes; the session (``protocol.Session``) checks a request's
meaning and builds that event; the handler (``handler.Handler``) applies it
to memory, queues and the device.  A new message is one row, one check and
one handler.

Events carry received fds; from the moment an event exists the fds belong
to whoever applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .codes import Request


@dataclass(frozen=True)
class Event:
    request: Request
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
    """RESET_OWNER (deprecated: disable all rings) or RESET_DEVICE: stop
    every ring; ``full`` also resets the device state."""

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
class LogBaseSet(Event):
    """SET_LOG_BASE (protocol feature LOG_SHMFD): the dirty page log is
    ``[offset, offset + size)`` of ``fd``; replaces any earlier log."""

    size: int
    offset: int
    fd: int


@dataclass(frozen=True)
class LogFdSet(Event):
    """SET_LOG_FD: an eventfd to signal after the log was written."""

    fd: int


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


@dataclass(frozen=True)
class Unsupported(Event):
    """A request of a protocol feature this back-end never offers: the
    session refuses it before an event is ever built (kept so every table
    row names an event type)."""


@dataclass(frozen=True)
class Refusal:
    """Result for a request the back-end declines (REPLY_ACK non-zero)."""

    reason: str
