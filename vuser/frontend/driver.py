"""A Linux-like virtio driver on top of the front-end harness.

``Driver.probe()`` follows drivers/virtio/virtio.c (register_virtio_device
and virtio_dev_probe, Linux 6.x):

1. reset, ACKNOWLEDGE, DRIVER;
2. read the device features; accept the intersection with the driver's
   feature table, keep the transport features the ring implements
   (INDIRECT_DESC, EVENT_IDX, VERSION_1), drop the ``decline``d ones (the
   debugfs feature filter);
3. write the features (finalize_features);
4. ``validate`` hook (virtnet_validate, virtballoon_validate): it may read
   config and clear bits; if the features changed they are written again;
5. FEATURES_OK, then read the status back: a device refuses a feature set
   by not keeping FEATURES_OK (modern devices only, as Linux);
6. find the virtqueues, run the ``setup`` hook (the driver's probe: fill
   queues, kick — a kick fd may thus be signalled before the back-end gets
   it, as with the balloon stats queue);
7. DRIVER_OK.

How guest actions reach the back-end depends on ``feature_writes``
(design.md, semantics 6):

* ``"qemu"``: as through QEMU.  Feature writes, status writes and
  FEATURES_OK stay in the front-end; at DRIVER_OK the front-end sends ONE
  SET_FEATURES with the final set, then (with STATUS) FEATURES_OK, memory,
  rings, DRIVER_OK.  A refusal surfaces at DRIVER_OK.
* ``"each"``: every feature write becomes a SET_FEATURES (several, possibly
  0, before FEATURES_OK), and with STATUS every status write becomes a
  SET_STATUS and every status read a GET_STATUS — the semantics the seeds
  ask a back-end to handle.

Config reads go to the back-end at any time, also before any feature write
(GET_CONFIG); with a whole-config personality (QEMU's generic device) each
access reads the whole config and a write sends the whole cached copy with
the bytes patched, stale fields included (design.md, semantics 4).
"""

from __future__ import annotations

import inspect
from typing import Awaitable, Callable, Iterable, Literal, Mapping, Sequence

from vuser.frontend.connection import FeaturesRefused, FrontendError
from vuser.frontend.frontend import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    PROTOCOL_FEATURES_BIT,
    Frontend,
)
from vuser.frontend.queue import DriverQueueBase
from vuser.frontend.vring import LEGACY_ALIGN
from vuser.virtio import Transport, mask
from vuser.wire import ProtocolFeature as PF

FeatureWrites = Literal["qemu", "each"]
Hook = Callable[["Driver"], "Awaitable[None] | None"]

# Transport features the harness ring implements (Linux keeps these in
# vring_transport_features when the device offers them).
DEFAULT_TRANSPORT_FEATURES: tuple[int, ...] = (
    Transport.INDIRECT_DESC, Transport.EVENT_IDX, Transport.VERSION_1, Transport.RING_PACKED)
# Linux's modern PCI transport aligns the used ring to SMP_CACHE_BYTES.
MODERN_ALIGN = 64


async def _run_hook(hook: Hook, drv: Driver) -> None:
    result = hook(drv)
    if inspect.isawaitable(result):
        await result


class Driver:
    """A virtio driver as Linux's core runs it; see the module docstring.

    ``features``: the driver's feature table (bit numbers); None accepts
    every offered device feature.  ``decline``: offered bits the driver
    would take but refuses.  ``queues``: indexes the driver sets up
    (default: all of the front-end's queues); other queues exist but get no
    addresses.  ``queue_size``: one size, or a size per index.
    """

    def __init__(self, fe: Frontend, *, features: Iterable[int] | None = None,
                 decline: Iterable[int] = (),
                 force_features: Iterable[int] = (),
                 transport_features: Iterable[int] = DEFAULT_TRANSPORT_FEATURES,
                 validate: Hook | None = None,
                 setup: Hook | None = None,
                 feature_writes: FeatureWrites = "qemu",
                 pre_feature_writes: Sequence[int] = (),
                 queues: Iterable[int] | None = None,
                 queue_size: int | Mapping[int, int] = 256,
                 callbacks: bool = True) -> None:
        if feature_writes not in ("qemu", "each"):
            raise ValueError(f"feature_writes must be 'qemu' or 'each', not {feature_writes!r}")
        self.fe = fe
        self.driver_features = None if features is None else mask(features)
        self.declined = mask(decline)
        self.forced = mask(force_features)
        self.transport_features = mask(transport_features)
        self.validate = validate
        self.setup = setup
        self.feature_writes: FeatureWrites = feature_writes
        self.pre_feature_writes = list(pre_feature_writes)
        self.wanted_queues = None if queues is None else sorted(queues)
        self.queue_size = queue_size
        self.callbacks = callbacks
        self.device_features = 0
        self.features = 0                  # currently accepted (dev->features)
        self.written_features: list[int] = []  # every value the driver wrote
        self.negotiated_features: int | None = None
        self.status = 0
        self.queues: dict[int, DriverQueueBase] = {}
        self.config_cache: bytes | None = None

    # ---------------------------------------------------------- features

    def offers(self, bit: int) -> bool:
        return bool(self.device_features & (1 << bit))

    def has_feature(self, bit: int) -> bool:
        """Is ``bit`` among the accepted features (virtio_has_feature)?"""
        return bool(self.features & (1 << bit))

    def clear_feature(self, bit: int) -> None:
        self.features &= ~(1 << bit)

    def set_feature(self, bit: int) -> None:
        self.features |= 1 << bit

    @property
    def status_forwarded(self) -> bool:
        return self.feature_writes == "each" and self.fe.has_protocol_feature(PF.STATUS)

    def read_device_features(self) -> int:
        """The device features as the guest sees them: what GET_FEATURES
        returned, without the vhost-user-only protocol-features bit and the
        bits the front-end never passes on (DPDK: EVENT_IDX)."""
        if self.fe.backend_features is None:
            raise FrontendError("GET_FEATURES", "the handshake has not read the device features")
        hidden = PROTOCOL_FEATURES_BIT | self.fe.stripped_features
        self.device_features = self.fe.backend_features & ~hidden
        return self.device_features

    def initial_features(self) -> int:
        """Linux virtio_dev_probe: driver table ∩ device features, plus the
        transport features the device offers, minus declined features, plus
        ``force_features`` even if not offered (QEMU 7.2's vhost-user-rng
        turns on EVENT_IDX and INDIRECT_DESC that way)."""
        dev = self.device_features
        table = dev if self.driver_features is None else self.driver_features
        accepted = (table & dev) | (dev & self.transport_features)
        return (accepted & ~self.declined) | self.forced

    async def write_features(self, features: int) -> None:
        """One guest write of the driver-features register."""
        self.written_features.append(features)
        if self.feature_writes == "each":
            await self.fe.set_features(features)

    async def finalize_features(self) -> None:
        await self.write_features(self.features)

    # ---------------------------------------------------------- status

    async def set_status(self, status: int) -> None:
        self.status = status
        if self.status_forwarded:
            await self.fe.set_status(status)

    async def add_status(self, bit: int) -> None:
        await self.set_status(self.status | bit)

    async def get_status(self) -> int:
        if self.status_forwarded:
            return await self.fe.get_status()
        return self.status

    async def reset(self) -> None:
        await self.set_status(0)

    async def features_ok(self) -> None:
        """virtio_features_ok: FEATURES_OK (modern only) and read it back."""
        if not self.has_feature(Transport.VERSION_1):
            return
        await self.add_status(FEATURES_OK)
        status = await self.get_status()
        if not status & FEATURES_OK:
            raise FeaturesRefused(self.features, status)
        if self.feature_writes == "each":
            self.negotiated_features = self.features

    # ---------------------------------------------------------- config

    async def read_config(self, offset: int, size: int) -> bytes:
        """A guest config read (allowed at any time, also before features)."""
        if self.fe.personality.whole_config and self.fe.config_size:
            self.config_cache = await self.fe.get_config(0, self.fe.config_size)
            if offset + size > len(self.config_cache):
                raise FrontendError("GET_CONFIG", f"read of {size} bytes at {offset} beyond the "
                                                  f"{len(self.config_cache)}-byte config")
            return self.config_cache[offset:offset + size]
        return await self.fe.get_config(offset, size)

    async def write_config(self, offset: int, data: bytes) -> None:
        """A guest config write.  Whole-config personalities patch the last
        config read (possibly stale, as QEMU does) and send all of it."""
        if self.fe.personality.whole_config and self.fe.config_size:
            if self.config_cache is None:
                self.config_cache = await self.fe.get_config(0, self.fe.config_size)
            cfg = bytearray(self.config_cache)
            cfg[offset:offset + len(data)] = data
            self.config_cache = bytes(cfg)
            await self.fe.set_config(0, self.config_cache)
        else:
            await self.fe.set_config(offset, data)

    # ---------------------------------------------------------- queues

    def _size_of(self, index: int) -> int:
        if isinstance(self.queue_size, int):
            return self.queue_size
        return self.queue_size.get(index, 256)

    def find_vqs(self) -> dict[int, DriverQueueBase]:
        """Allocate rings for the wanted queues: packed when RING_PACKED was
        accepted, using EVENT_IDX, indirect descriptors and in-order
        completion when accepted (vring_create_virtqueue)."""
        wanted = self.wanted_queues if self.wanted_queues is not None else range(self.fe.num_queues)
        align = MODERN_ALIGN if self.has_feature(Transport.VERSION_1) else LEGACY_ALIGN
        for i in wanted:
            self.queues[i] = self.fe.new_queue(
                i, self._size_of(i), align=align,
                packed=self.has_feature(Transport.RING_PACKED),
                event_idx=self.has_feature(Transport.EVENT_IDX),
                indirect=self.has_feature(Transport.INDIRECT_DESC),
                in_order=self.has_feature(Transport.IN_ORDER),
                callbacks=self.callbacks)
        return self.queues

    def queue(self, index: int) -> DriverQueueBase:
        try:
            return self.queues[index]
        except KeyError:
            raise KeyError(f"queue {index} was not set up by the driver "
                           f"(set up: {sorted(self.queues)})") from None

    # ---------------------------------------------------------- the sequence

    async def driver_ok(self) -> None:
        """DRIVER_OK: the front-end starts the back-end (features for
        ``"qemu"``, memory, rings, enable, status)."""
        if self.feature_writes == "qemu":
            await self.fe.start(self.queues, features=self.features)
            self.negotiated_features = self.fe.negotiated_features
            self.status |= DRIVER_OK
        else:
            await self.fe.start(self.queues, features=None, features_ok=False, driver_ok=False)
            await self.add_status(DRIVER_OK)
            if self.negotiated_features is None:  # legacy: no FEATURES_OK step
                self.negotiated_features = self.features

    async def probe(self) -> None:
        """The whole init sequence; see the module docstring."""
        await self.reset()
        await self.add_status(ACKNOWLEDGE)
        await self.add_status(DRIVER)
        self.read_device_features()
        self.features = self.initial_features()
        for value in self.pre_feature_writes:
            await self.write_features(value)
        await self.finalize_features()
        if self.validate is not None:
            before = self.features
            await _run_hook(self.validate, self)
            if self.features != before:
                await self.finalize_features()
        await self.features_ok()
        self.find_vqs()
        if self.setup is not None:
            await _run_hook(self.setup, self)
        await self.driver_ok()

    async def remove(self) -> dict[int, int]:
        """Device reset on driver removal / power-off: the front-end stops
        the back-end (returns the GET_VRING_BASE values)."""
        bases = await self.fe.stop()
        self.status = 0
        return bases


__all__ = ["DEFAULT_TRANSPORT_FEATURES", "Driver", "FeatureWrites", "Hook"]
