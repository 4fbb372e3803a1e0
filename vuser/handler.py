"""Where protocol events meet the device: the handler of one connection
(after rust-vmm's vhost-user-backend ``handler.rs``).

``Handler.apply(event)`` applies one event (``vuser.events``) to guest
memory, the queue runtime and the device, through one mapping from event
type to method, and returns the result the session builds the reply from.
It is also the ``DeviceContext`` the device sees, and it pushes queue
lifecycle changes to the device's hooks (``Device.queue_started`` ...).

Error handling: a request that cannot be honoured (a memory table that
cannot be mapped, a ring outside guest memory, a request the device does
not know) raises ``ProtocolError``; a guest ring error goes through the
runtime's ``fault`` to ``_fault`` (the device needs a reset).

Dirty logging (live migration, vhost-user.rst "Migration"): the log
SET_LOG_BASE maps (``vuser.dirtylog``) is hooked up -- to the memory table
for data paths, to each ring whose SET_VRING_ADDR carried VHOST_VRING_F_LOG
-- while the accepted features hold VHOST_F_LOG_ALL, and unhooked when they
do not; ``_sync_log`` does it after every event that changes one of those
(push: C data paths are told, nothing is re-read per frame).  Toggling
LOG_ALL or the ring flag never restarts a ring.  ``force_dirty_log``
(``vuser run --force-dirty-log``, for benchmarks): a private log sized to
each memory table, every ring logging at its own used area, whatever the
front-end says.

Resource handling: the fds in an event belong to the handler from
``apply`` on: queue fds go to their slot, region fds to the memory, the
log fd to the dirty log, the log eventfd to its slot, the back-end channel
fd to its sender; ``release`` closes them all.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Awaitable, Callable, Mapping

import trio

from . import events as E
from . import wire
from .backend_channel import BackendChannelSender
from .device import Device
from .dirtylog import LOG_PAGE, DirtyLog
from .fds import FdKindError, require_eventfd, require_unix_stream, signal_eventfd
from .handles import QueueHandle, RawQueue
from .memory import GuestMemory, MemoryAccessError, RegionSpec
from .protocol import ProtocolError, Session
from .queues import FdSlot, QueueRuntime, QueueSlot
from .ringstate import RingStateFile
from .virtio import Transport, has, mask
from .virtqueue import RingError

log = logging.getLogger(__name__)

Apply = Callable[["Handler", Any], Awaitable[Any]]
_FD_ROLE = {wire.Request.SET_VRING_KICK: "kick", wire.Request.SET_VRING_CALL: "call",
            wire.Request.SET_VRING_ERR: "err"}
LOG_ALL = mask(Transport.LOG_ALL)
# SET_LOG_FD: how often the log's update counter is looked at (the writes
# that move it happen in C, in this connection's or another's calls).
LOG_FD_INTERVAL = 0.01


def _spec(r: E.MemRegion) -> RegionSpec:
    return RegionSpec(r.gpa, r.size, r.uva, r.mmap_offset)


class Handler:
    """Applies one connection's events; see the module docstring."""

    def __init__(self, device: Device, session: Session, *, ring_impl: str = "native",
                 ring_state: RingStateFile | None = None,
                 name: str = "vhost-user", force_dirty_log: bool = False) -> None:
        self.device = device
        self.session = session
        self.name = name
        self.memory = GuestMemory()
        self.dirty_log = DirtyLog(self.memory.owner)
        self.force_dirty_log = force_dirty_log
        self.log_call = FdSlot()  # SET_LOG_FD's eventfd
        self._log_call_task = False
        self.runtime = QueueRuntime(self.memory, device.max_queues, round=self._round, on_fault=self._fault,
                                    ring_impl=ring_impl, name=name, ring_state=ring_state)
        self.backend = BackendChannelSender(name)
        self.handles = [QueueHandle(self.runtime, s) for s in self.runtime.slots]
        self.raw = [RawQueue(self.runtime, s) for s in self.runtime.slots]
        self.nursery: trio.Nursery | None = None
        self._features_announced = False
        self._warned: set[tuple[int, str]] = set()

    @property
    def slots(self) -> list[QueueSlot]:
        return self.runtime.slots

    @property
    def device_broken(self) -> RingError | None:
        return self.runtime.broken

    # ------------------------------------------------------------ DeviceContext

    @property
    def negotiated_features(self) -> int | None:
        return self.session.negotiated_features

    @property
    def effective_features(self) -> int:
        return self.session.effective_features

    def queue(self, role: str) -> QueueHandle | None:
        for slot, handle in zip(self.slots, self.handles):
            if slot.role == role and slot.running:
                return handle
        return None

    def announce_config_change(self) -> None:
        if self.nursery is not None and self.backend.connected:
            self.nursery.start_soon(self.backend.config_change, self.session.reply_ack)

    # ------------------------------------------------------------ life

    def start(self, nursery: trio.Nursery) -> None:
        self.nursery = self.runtime.nursery = nursery
        self.device.attach(self)

    def release(self) -> None:
        """The connection ended: the device lets go of every queue, then
        every fd and mapping is closed."""
        for slot, raw in zip(self.slots, self.raw):
            if slot.running:
                self.device.queue_stopped(raw)
        self.runtime.release()
        self.backend.close()
        self.memory.set_dirty_log(None)
        self.dirty_log.clear()
        self.log_call.close()
        self.memory.clear()
        self.nursery = self.runtime.nursery = None
        self.device.detach()

    # ------------------------------------------------------------ events

    async def apply(self, event: E.Event) -> Any:
        """Apply ``event``; anything the front-end made fail (an fd of the
        wrong kind, a system call on what it sent) is a ProtocolError
        naming the request."""
        try:
            return await self._APPLY[type(event)](self, event)
        except FdKindError as exc:
            raise ProtocolError(event.request.name, str(exc)) from None
        except OSError as exc:
            raise ProtocolError(event.request.name, f"{exc.strerror or exc}") from None

    async def _nothing(self, ev: E.Event) -> None:
        return None

    async def _features_set(self, ev: E.FeaturesSet) -> None:
        log.debug("%s: driver accepted %s", self.name, self.device.feature_names(ev.features))
        self.device.features_accepted(ev.features)
        self._sync_log()

    async def _protocol_features_set(self, ev: E.ProtocolFeaturesSet) -> None:
        log.info("%s: protocol features: %s", self.name, ", ".join(wire.protocol_feature_names(ev.features)))

    async def _rings_reset(self, ev: E.RingsReset) -> None:
        await self._stop_all()
        if ev.full:
            self._reset_device()

    async def _mem_table_set(self, ev: E.MemTableSet) -> None:
        specs = [_spec(r) for r in ev.regions]
        await self._change_memory(ev.request, lambda: self.memory.replace(list(zip(ev.fds, specs))))

    async def _mem_region_added(self, ev: E.MemRegionAdded) -> None:
        await self._change_memory(ev.request, lambda: self.memory.add_region(ev.fd, _spec(ev.region)))

    async def _mem_region_removed(self, ev: E.MemRegionRemoved) -> None:
        if ev.fd is not None:
            os.close(ev.fd)
        await self._change_memory(ev.request, lambda: self.memory.remove_region(_spec(ev.region)))

    async def _vring_num(self, ev: E.VringNum) -> None:
        self.slots[ev.index].num = ev.num

    async def _vring_addr(self, ev: E.VringAddr) -> None:
        slot = self.slots[ev.index]
        slot.addr = ev
        if slot.running:
            self._configure(slot, ev.request)

    async def _vring_base(self, ev: E.VringBase) -> None:
        self.slots[ev.index].base = ev.base

    async def _vring_stop(self, ev: E.VringStop) -> int:
        return await self._stop_ring(self.slots[ev.index])

    async def _vring_fd(self, ev: E.VringFd) -> None:
        slot = self.slots[ev.index]
        if ev.fd is not None:
            try:
                require_eventfd(ev.fd, _FD_ROLE[ev.request])
            except BaseException:
                os.close(ev.fd)
                raise
        if ev.request == wire.Request.SET_VRING_KICK:
            await self.runtime.cancel(slot)
            slot.kick.replace(ev.fd)
            slot.poll = ev.fd is None
            self._start_ring(slot)
        elif ev.request == wire.Request.SET_VRING_CALL:
            slot.call.replace(ev.fd)
            self.device.call_changed(self.raw[slot.index])
        else:
            slot.err.replace(ev.fd)

    async def _vring_enable(self, ev: E.VringEnable) -> None:
        slot = self.slots[ev.index]
        slot.enabled = ev.enable
        log.debug("%s: queue %d %s", self.name, ev.index, "enabled" if ev.enable else "disabled")
        self.device.queue_enabled(self.raw[slot.index], ev.enable)
        if ev.enable and slot.running:
            self.runtime.wake(slot)

    async def _vring_kick_inband(self, ev: E.VringKickInband) -> None:  # pragma: no cover - never offered
        self.runtime.wake(self.slots[ev.index])

    async def _log_base_set(self, ev: E.LogBaseSet) -> int:
        try:
            self.dirty_log.replace(ev.fd, ev.size, ev.offset)
        except MemoryAccessError as exc:
            raise ProtocolError(ev.request.name, str(exc)) from None
        self._sync_log()
        return 0

    async def _log_fd_set(self, ev: E.LogFdSet) -> None:
        try:
            require_eventfd(ev.fd, "log")
        except BaseException:
            os.close(ev.fd)
            raise
        self.log_call.replace(ev.fd)
        if not self._log_call_task and self.nursery is not None:
            self._log_call_task = True
            self.nursery.start_soon(self._signal_log_updates)

    async def _signal_log_updates(self) -> None:
        """SET_LOG_FD: signal the eventfd when the log was written since the
        last look (vhost-user.rst, "Migration")."""
        seen = self.dirty_log.updates
        while True:
            await trio.sleep(LOG_FD_INTERVAL)
            now = self.dirty_log.updates
            if now != seen and self.log_call.fd is not None:
                seen = now
                signal_eventfd(self.log_call.fd)

    async def _backend_channel_set(self, ev: E.BackendChannelSet) -> None:
        try:
            require_unix_stream(ev.fd, "back-end channel")
            self.backend.replace(ev.fd)
        finally:
            os.close(ev.fd)  # replace duplicated it

    async def _config_read(self, ev: E.ConfigRead) -> bytes:
        return self.device.read_config(ev.offset, ev.size)

    async def _config_write(self, ev: E.ConfigWrite) -> None:
        written = self.device.write_config(ev.offset, ev.data)
        log.debug("%s: config write at %d (%d bytes) changed %s", self.name, ev.offset, len(ev.data), written)

    async def _status_set(self, ev: E.StatusSet) -> E.Refusal | None:
        if ev.status == 0:
            log.info("%s: device reset by the driver (status 0)", self.name)
            self._reset_device()
            return None
        if ev.features_ok_requested:
            reason = self.device.validate_features(ev.accepted)
            if reason is not None:
                log.warning("%s: refusing features %s at FEATURES_OK: %s", self.name,
                            self.device.feature_names(ev.accepted), reason)
                return E.Refusal(reason)
            self._announce_features(ev.accepted)
        elif self.session.negotiated_features is not None:
            # Legacy drivers' features become final at DRIVER_OK (negotiation rule 7).
            self._announce_features(self.session.negotiated_features)
        return None

    async def _device_request(self, ev: E.DeviceRequest) -> Any:
        try:
            return self.device.request(ev.request.name, ev.payload)
        except NotImplementedError:
            raise ProtocolError(ev.request.name, f"not supported by device {self.device.name}") from None

    _APPLY: Mapping[type[E.Event], Apply] = {
        E.Query: _nothing,
        E.OwnerSet: _nothing,
        E.FeaturesSet: _features_set,
        E.ProtocolFeaturesSet: _protocol_features_set,
        E.RingsReset: _rings_reset,
        E.MemTableSet: _mem_table_set,
        E.MemRegionAdded: _mem_region_added,
        E.MemRegionRemoved: _mem_region_removed,
        E.VringNum: _vring_num,
        E.VringAddr: _vring_addr,
        E.VringBase: _vring_base,
        E.VringStop: _vring_stop,
        E.VringFd: _vring_fd,
        E.VringEnable: _vring_enable,
        E.VringKickInband: _vring_kick_inband,
        E.BackendChannelSet: _backend_channel_set,
        E.ConfigRead: _config_read,
        E.ConfigWrite: _config_write,
        E.StatusSet: _status_set,
        E.DeviceRequest: _device_request,
        E.LogBaseSet: _log_base_set,
        E.LogFdSet: _log_fd_set,
    }

    # ------------------------------------------------------------ features

    def _announce_features(self, features: int) -> None:
        if self._features_announced:
            return
        self._features_announced = True
        log.info("%s: negotiated features: %s", self.name, ", ".join(self.device.feature_names(features)))
        self.device.features_negotiated(features)

    def _reset_device(self) -> None:
        self._features_announced = False
        self.runtime.broken = None
        self.runtime.forget_ring_state()
        self.device.reset()

    # ------------------------------------------------------------ memory

    async def _change_memory(self, req: wire.Request, change: Callable[[], None]) -> None:
        # Rings hold pointers into the old mappings: stop their tasks first,
        # then re-translate (DPDK replaces the table while running).
        running = [s for s in self.slots if s.running]
        for slot in running:
            await self.runtime.cancel(slot)
        try:
            change()
        except MemoryAccessError as exc:
            raise ProtocolError(req.name, str(exc)) from None
        for slot in running:
            self._configure(slot, req)
            self.runtime.spawn(slot)
        if self.force_dirty_log and self.memory.regions:
            self._private_log()
            self._sync_log()
        if self.runtime.ring_impl == "python" and not all(r.sealed for r in self.memory.regions):
            log.warning("%s: guest memory that cannot be sealed, with the pure-Python ring (--ring python): "
                        "a truncation of it would end the process", self.name)
        self.device.memory_changed(self.memory)

    # ------------------------------------------------------------ rings

    def _configure(self, slot: QueueSlot, req: wire.Request, base: int | None = None) -> None:
        features = self.session.effective_features
        try:
            self.runtime.configure(slot, event_idx=has(features, Transport.EVENT_IDX), base=base,
                                   packed=has(features, Transport.RING_PACKED),
                                   in_order=has(features, Transport.IN_ORDER))
        except ValueError as exc:
            raise ProtocolError(req.name, str(exc)) from None
        self._sync_log()

    # ------------------------------------------------------------ dirty logging

    @property
    def logging(self) -> bool:
        """Is the front-end logging (VHOST_F_LOG_ALL accepted, a log mapped)?"""
        return self.dirty_log.mapped and (self.force_dirty_log or
                                          bool((self.session.accepted_features or 0) & LOG_ALL))

    def _private_log(self) -> None:
        """``force_dirty_log``: a log of our own covering the memory table."""
        top = max(r.end for r in self.memory.regions)
        size = (top - 1) // (LOG_PAGE * 8) + 1
        fd = os.memfd_create("vuser-dirty-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        self.dirty_log.replace(fd, size, 0)

    def _sync_log(self) -> None:
        """Hook the dirty log up where it is due, unhook it elsewhere (see
        the module docstring)."""
        log_ = self.dirty_log if self.logging else None
        if (log_ is None) != (self.memory.dirty_log is None):
            log.info("%s: dirty logging %s", self.name, "on" if log_ is not None else "off")
        self.memory.set_dirty_log(log_)
        for slot in self.slots:
            if slot.vq is None:
                continue
            addr = slot.addr
            if log_ is not None and addr is not None and addr.flags & wire.VRING_F_LOG:
                slot.vq.set_log(log_, addr.log)
            elif log_ is not None and addr is not None and self.force_dirty_log:
                slot.vq.set_log(log_, self.memory.uva_to_gpa(addr.used, 1))
            else:
                slot.vq.set_log(None)

    def _start_ring(self, slot: QueueSlot) -> None:
        """Spec: a ring starts when its kick fd arrives."""
        if slot.addr is None or slot.num == 0:
            raise ProtocolError("SET_VRING_KICK", f"queue {slot.index} started without size or addresses")
        if not self._features_announced and self.session.negotiated_features is not None:
            self._announce_features(self.session.negotiated_features)
        self._configure(slot, wire.Request.SET_VRING_KICK, base=slot.base)
        self._check_role(slot)
        # Spec: without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        if not has(self.session.accepted_features or 0, Transport.PROTOCOL_FEATURES):
            slot.enabled = True
        self.device.queue_started(self.raw[slot.index])
        self.runtime.spawn(slot)

    async def _stop_ring(self, slot: QueueSlot) -> int:
        await self.runtime.cancel(slot)
        if slot.running:
            self.device.queue_stopped(self.raw[slot.index])
        return await self.runtime.stop(slot)

    async def _stop_all(self) -> None:
        for slot in self.slots:
            if slot.running:
                await self._stop_ring(slot)
            slot.enabled = False

    def _check_role(self, slot: QueueSlot) -> None:
        """Name the queue per the active policy and warn when the driver's
        use disagrees with it (design.md semantics 2)."""
        dev = self.device
        negotiated = self.session.effective_features
        layout = dev.queue_layout(negotiated)
        slot.role = layout.roles.get(slot.index)
        if slot.role is None:
            self._warn_once(slot.index, "none", "%s: driver started queue %d, which the %s layout does not have",
                            self.name, slot.index, layout.policy)
            return
        feature = next((f for f in dev.features if slot.role in f.queues), None)
        if feature is not None and not negotiated & (1 << feature.bit):
            alt = dev.queue_layout(negotiated, "negotiated").roles.get(slot.index)
            self._warn_once(slot.index, "feature",
                            "%s: driver uses queue %d, the %s layout's %s, but did not accept %s "
                            "(a driver numbering by negotiated features means %s)",
                            self.name, slot.index, layout.policy, slot.role, feature.name, alt)
        log.info("%s: queue %d (%s) started, size %d", self.name, slot.index, slot.role, slot.num)

    def _warn_once(self, index: int, kind: str, msg: str, *args: Any) -> None:
        if (index, kind) not in self._warned:
            self._warned.add((index, kind))
            log.warning(msg, *args)

    # ------------------------------------------------------------ runtime callbacks

    def _round(self, slot: QueueSlot) -> None:
        self.device.on_kick(self.handles[slot.index])

    def _fault(self, slot: QueueSlot, error: RingError) -> None:
        self.session.mark_needs_reset()
        self.device.queues_broken(error)
        self.announce_config_change()
