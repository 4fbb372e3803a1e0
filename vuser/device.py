"""Device model: what a device declares, what the framework derives, and
every hook a device may implement.

A device declares (style.md, "Devices"): its virtio id, the queues it always
has, an ordered list of device-specific features where a feature may bring
queues, and its config fields (offset, size, the feature that makes the field
exist, whether the driver may write it).  From that the framework derives:

* the offered feature bits (minus what the user switched off),
* the queue layout — which index is which queue — under a switchable policy
  (design.md semantics 2, seeds 000 and 001):

  ``offered`` (default)  queues exist when their feature is *offered*;
                         indexes are compact in feature-list order.  This is
                         what QEMU and Linux do.
  ``negotiated``         compact over the *negotiated* features (the reading
                         seed 001 shows people assume).
  ``fixed``              the spec's numbering: every declared queue keeps the
                         index it has when all features are offered.

* the config space: a field exists when its feature is offered, at its fixed
  offset, readable at any time — also before any SET_FEATURES (seed 002) —
  and a config write only changes the fields the driver may write
  (design.md semantics 4).

The hooks (section "Hooks" of ``Device``) are the whole contract between
the framework and a device; each has a default, so a device overrides only
what it needs.  Devices see chains as memoryviews (``QueueHandle``), never
guest addresses; a device with its own C data path gets ``RawQueue``
handles pushed to it by the queue-lifecycle hooks.

CLI options, sockets, QEMU arguments and control commands are the device
type's plugin (``vuser.plugin``), not the device's.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Protocol

from .errors import UsageError
from .handles import QueueHandle, RawQueue
from .memory import GuestMemory
from .virtio import Transport, spec_name
from .virtqueue import RingError

log = logging.getLogger(__name__)

POLICIES = ("offered", "negotiated", "fixed")


@dataclass(frozen=True)
class Feature:
    """A feature bit (``flag``: a ``vuser.virtio`` enum member, or any
    ``IntEnum`` of bit numbers); ``queues`` are the roles of the queues it
    brings.  ``name`` defaults to the spec name of ``flag``."""

    flag: enum.IntEnum
    queues: tuple[str, ...] = ()
    doc: str = ""
    spec: str | None = None

    @property
    def bit(self) -> int:
        return int(self.flag)

    @property
    def name(self) -> str:
        return self.spec or spec_name(self.flag)

    @property
    def short(self) -> str:
        """The name without its VIRTIO_xxx_F_ prefix."""
        head, sep, tail = self.name.partition("_F_")
        return tail if sep else self.name


# Transport and ring features (virtio spec 6) the framework offers for every
# device: the ring code implements both ring features (QEMU 7.2's rng turns
# them on anyway, design.md) and both ring layouts (RING_PACKED, spec 2.8;
# `--without RING_PACKED` keeps drivers on split rings); VERSION_1 makes the
# device transitional-capable modern; a legacy driver simply does not accept
# it (seed 003).  VHOST_F_LOG_ALL is a vhost bit, not a virtio one: the
# front-end needs it (and protocol feature LOG_SHMFD) to migrate the guest,
# and never shows it to the guest; the framework logs every write to guest
# memory while it is on (vuser.dirtylog).  Appended last: no queue follows it.
TRANSPORT_FEATURES: tuple[Feature, ...] = (
    Feature(Transport.INDIRECT_DESC),
    Feature(Transport.EVENT_IDX),
    Feature(Transport.VERSION_1),
    Feature(Transport.RING_PACKED),
    Feature(Transport.LOG_ALL, doc="dirty page logging for live migration"),
)
KNOWN_TRANSPORT_FEATURES: tuple[Feature, ...] = tuple(Feature(t) for t in Transport)


@dataclass(frozen=True)
class ConfigField:
    """A device config field at a fixed offset (drivers use offsetof)."""

    name: str
    offset: int
    size: int
    feature: str | None = None  # short or full feature name; None: always exists
    writable: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class QueueLayout:
    """Queue index -> role under one policy."""

    policy: str
    roles: Mapping[int, str]

    def index_of(self, role: str) -> int | None:
        for index, r in self.roles.items():
            if r == role:
                return index
        return None

    def as_list(self) -> list[dict[str, Any]]:
        return [{"index": i, "role": r} for i, r in sorted(self.roles.items())]


class DeviceError(UsageError):
    """A device option or declaration is invalid (user error)."""


class DeviceContext(Protocol):
    """What a device may do with the connection it is attached to."""

    @property
    def memory(self) -> GuestMemory: ...
    @property
    def negotiated_features(self) -> int | None: ...
    @property
    def effective_features(self) -> int: ...

    def queue(self, role: str) -> QueueHandle | None:
        """The running queue the active layout gives ``role``."""
        ...

    def announce_config_change(self) -> None: ...


def _feature_key(name: str) -> str:
    up = name.strip().upper()
    head, sep, tail = up.partition("_F_")
    return tail if sep else up


class Device:
    """Base class of every device.  Subclasses fill the class variables and
    override the hooks they need."""

    # ----------------------------------------------------------- declarations
    name: ClassVar[str] = ""
    virtio_id: ClassVar[int] = 0
    base_queues: ClassVar[tuple[str, ...]] = ()
    features: tuple[Feature, ...] = ()
    config_fields: ClassVar[tuple[ConfigField, ...]] = ()
    transport_features: ClassVar[tuple[Feature, ...]] = TRANSPORT_FEATURES
    description: ClassVar[str] = ""
    # vhost-user protocol features the device adds (net: RARP, MTU) or must
    # not offer (net: CONFIGURE_MEM_SLOTS, CONFIG), as bit sets.
    protocol_features: ClassVar[int] = 0
    excluded_protocol_features: ClassVar[int] = 0

    def __init__(self, *, without: Iterable[str] = (), queue_policy: str = "offered") -> None:
        if queue_policy not in POLICIES:
            raise DeviceError(f"queue policy {queue_policy!r} is not one of {', '.join(POLICIES)}")
        self.queue_policy = queue_policy
        wanted_off = {_feature_key(n) for n in without}
        by_key = {_feature_key(f.name): f for f in (*self.features, *self.transport_features)}
        unknown = wanted_off - set(by_key)
        if unknown:
            known = ", ".join(f.short for f in (*self.features, *self.transport_features))
            raise DeviceError(f"{self.name}: unknown feature(s) {', '.join(sorted(unknown))}; known: {known}")
        self.offered: tuple[Feature, ...] = tuple(
            f for f in (*self.features, *self.transport_features) if _feature_key(f.name) not in wanted_off
        )
        self.context: DeviceContext | None = None

    # ----------------------------------------------------------- features

    @property
    def offered_bits(self) -> int:
        bits = 0
        for f in self.offered:
            bits |= 1 << f.bit
        return bits

    def all_features(self) -> tuple[Feature, ...]:
        return (*self.features, *self.transport_features)

    def feature_names(self, bits: int) -> list[str]:
        """Decode feature bits to spec names (device, then transport)."""
        names = {f.bit: f.name for f in KNOWN_TRANSPORT_FEATURES}
        names.update({f.bit: f.name for f in self.features})
        return [names.get(b, f"bit{b}") for b in range(64) if bits & (1 << b)]

    def is_offered(self, name: str) -> bool:
        key = _feature_key(name)
        return any(_feature_key(f.name) == key for f in self.offered)

    def feature(self, name: str) -> Feature:
        key = _feature_key(name)
        for f in self.all_features():
            if _feature_key(f.name) == key:
                return f
        raise KeyError(name)

    def has(self, name: str, features: int) -> bool:
        """Is feature ``name`` in the bit set ``features``?"""
        return bool(features & (1 << self.feature(name).bit))

    # ----------------------------------------------------------- queues

    def queue_layout(self, negotiated: int | None = None, policy: str | None = None) -> QueueLayout:
        """Derive index -> role.  ``negotiated`` matters only for the
        ``negotiated`` policy (None there means: nothing negotiated yet, so
        the offered set stands in)."""
        policy = policy or self.queue_policy
        roles: dict[int, str] = {}
        index = 0
        for role in self.base_queues:
            roles[index] = role
            index += 1
        offered_keys = {_feature_key(f.name) for f in self.offered}
        for f in self.features:
            present = _feature_key(f.name) in offered_keys
            if policy == "negotiated" and negotiated is not None:
                present = present and bool(negotiated & (1 << f.bit))
            for role in f.queues:
                if present:
                    roles[index] = role
                if present or policy == "fixed":
                    index += 1
        return QueueLayout(policy, roles)

    @property
    def max_queues(self) -> int:
        """Number of queue slots the front-end may address: the highest index
        any policy can give, plus one."""
        counts = [max(self.queue_layout(None, p).roles, default=-1) + 1 for p in POLICIES]
        return max(counts)

    # ----------------------------------------------------------- config

    def existing_fields(self) -> list[ConfigField]:
        return [f for f in self.config_fields if f.feature is None or self.is_offered(f.feature)]

    @property
    def config_size(self) -> int:
        return max((f.end for f in self.existing_fields()), default=0)

    def read_config(self, offset: int, size: int) -> bytes:
        """Config bytes [offset, offset+size): fields that exist per the
        offered features, zeros elsewhere.  Readable at any time."""
        space = bytearray(max(self.config_size, offset + size))
        for f in self.existing_fields():
            space[f.offset:f.end] = _to_bytes(self.config_value(f), f.size)
        return bytes(space[offset:offset + size])

    def write_config(self, offset: int, data: bytes) -> list[str]:
        """Apply a config write: only driver-writable fields change; bytes
        over read-only fields are ignored (QEMU 11.1 writes the whole balloon
        config from a stale copy, design.md semantics 4).  Returns the names
        of the fields written."""
        end = offset + len(data)
        written = []
        for f in self.existing_fields():
            if not f.writable or f.end <= offset or f.offset >= end:
                continue
            current = bytearray(_to_bytes(self.config_value(f), f.size))
            lo, hi = max(f.offset, offset), min(f.end, end)
            current[lo - f.offset:hi - f.offset] = data[lo - offset:hi - offset]
            value: int | bytes = int.from_bytes(current, "little") if f.size <= 8 else bytes(current)
            self.config_written(f, value)
            written.append(f.name)
        return written

    def config_changed(self) -> None:
        """Tell the front-end (and so the guest) that the config changed."""
        if self.context is not None:
            self.context.announce_config_change()

    # ======================================================================
    # Hooks: the whole contract.  Each default does nothing (or the least).
    # ======================================================================

    # --- connection

    def attach(self, context: DeviceContext) -> None:
        """A front-end connected (one at a time per device instance)."""
        self.context = context

    def detach(self) -> None:
        """The front-end went away; every queue handle is stale now."""
        self.context = None

    def reset(self) -> None:
        """The driver reset the device (SET_STATUS 0 / RESET_DEVICE)."""

    async def run(self, context: DeviceContext) -> None:
        """Background work for the life of a connection (timers)."""

    # --- features

    def features_accepted(self, features: int) -> None:
        """SET_FEATURES: the driver's current choice (not final, seed 004)."""

    def validate_features(self, accepted: int) -> str | None:
        """FEATURES_OK: a reason to refuse ``accepted``, or None."""
        return None

    def features_negotiated(self, features: int) -> None:
        """Feature negotiation completed with ``features``."""

    def vhost_queue_num(self) -> int | None:
        """GET_QUEUE_NUM's answer when it is not the number of queues
        (virtio-net answers in queue pairs)."""
        return None

    # --- queue lifecycle (push: devices with their own C data path keep
    # their structures current from these, instead of reading queue state
    # on every kick)

    def queue_started(self, queue: RawQueue) -> None:
        """A ring started (kick fd received, ring configured)."""

    def queue_stopped(self, queue: RawQueue) -> None:
        """A ring stopped (GET_VRING_BASE, reset, disconnect); its ring
        pointer is invalid from now on."""

    def queue_enabled(self, queue: RawQueue, enabled: bool) -> None:
        """SET_VRING_ENABLE."""

    def call_changed(self, queue: RawQueue) -> None:
        """A new call fd (or none) for the queue."""

    def memory_changed(self, memory: GuestMemory) -> None:
        """The memory table changed (rings were re-translated)."""

    def queues_broken(self, error: RingError) -> None:
        """The guest broke a ring: no queue may be used until a reset."""

    # --- data

    def on_kick(self, queue: QueueHandle) -> None:
        """Process the available buffers of ``queue`` (synchronous: it runs
        to completion, so GET_VRING_BASE always sees a consistent index)."""

    def request(self, name: str, payload: Any) -> Any:
        """Device-specific vhost-user requests (SEND_RARP, NET_SET_MTU); a
        ``vuser.events.Refusal`` declines one."""
        raise NotImplementedError(name)

    # --- config and status

    def config_value(self, field: ConfigField) -> int | bytes:
        """The current value of a config field."""
        return 0

    def config_written(self, field: ConfigField, value: int | bytes) -> None:
        """The driver wrote a writable field."""

    def status(self) -> dict[str, Any]:
        """Device-specific status for the control socket."""
        return {}


def _to_bytes(value: int | bytes, size: int) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).ljust(size, b"\0")[:size]
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
