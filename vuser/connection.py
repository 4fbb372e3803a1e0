"""One front-end connection: session events applied to memory, rings, device.

Shape (style.md, "Concurrency"): one nursery per connection; the control
task reads messages in order and applies them; one task per running queue
waits on its kick eventfd (``trio.lowlevel.wait_readable``) and runs the
device's synchronous ``on_kick``.  GET_VRING_BASE, reset and fd replacement
cancel the queue task and wait for it before going on, so the returned base
is exact and no task ever waits on a closed fd.

Resource handling: every fd received is owned by exactly one holder — a
queue slot (kick/call/err), the guest memory (region fds) or the back-end
channel — and closed when replaced, unused, or at disconnect.

Error handling: a ProtocolError (or a memory table that cannot be mapped)
ends this connection with one log line naming the request and the fault; a
RingError marks the device as needing reset and stops its queues.  Neither
touches another connection.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import trio

from . import protocol as P
from . import wire
from .memory import GuestMemory, MemoryAccessError, RegionSpec
from .transport import Disconnected, close_fds, recv_message, send_message
from .virtqueue import Chain, RingError, VirtQueue

if TYPE_CHECKING:  # pragma: no cover
    from .device import Device, QueueLayout

log = logging.getLogger(__name__)

_EVENTFD_ONE = (1).to_bytes(8, "little")
RING_EVENT_IDX_BIT = 29


class FdSlot:
    """Owns at most one fd; closing sets it to None so a reused number can
    never be closed twice (after trio's fd holders)."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def replace(self, fd: int | None) -> None:
        old, self.fd = self.fd, fd
        if old is not None and old != fd:
            os.close(old)

    def close(self) -> None:
        self.replace(None)


@dataclass
class QueueSlot:
    index: int
    num: int = 0
    addr: P.VringAddr | None = None
    base: int = 0
    enabled: bool = False
    kick: FdSlot = field(default_factory=FdSlot)
    call: FdSlot = field(default_factory=FdSlot)
    err: FdSlot = field(default_factory=FdSlot)
    poll: bool = False
    vq: VirtQueue | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    buffers: int = 0
    kicks: int = 0
    self_wakes: int = 0
    notifies: int = 0
    role: str | None = None

    @property
    def running(self) -> bool:
        return self.vq is not None


class QueueHandle:
    """What a device sees of a queue: pop chains, push used buffers."""

    def __init__(self, conn: Connection, slot: QueueSlot) -> None:
        self._conn = conn
        self._slot = slot

    @property
    def index(self) -> int:
        return self._slot.index

    @property
    def role(self) -> str | None:
        return self._slot.role

    @property
    def buffers(self) -> int:
        return self._slot.buffers

    def pop(self, max_chains: int = 256) -> list[Chain]:
        """Every available chain (one call into the ring code)."""
        vq = self._slot.vq
        if vq is None or self._conn.device_broken:
            return []
        try:
            chains = vq.pop_all(max_chains)
        except RingError as exc:
            self._conn.ring_fault(self._slot, exc)
            return []
        if vq.error is not None:
            # The chains before the bad one are good and are still served;
            # nothing after it is touched (the ring is marked broken).
            self._conn.ring_fault(self._slot, vq.error)
        self._slot.buffers += len(chains)
        return chains

    def push(self, used: Sequence[tuple[int, int]], notify: bool = True) -> None:
        """Return chains (head, bytes written) in one batch; signal the guest
        if it wants an interrupt."""
        vq = self._slot.vq
        if vq is None or not used:
            return
        vq.push(used)
        if notify:
            self.notify()

    def notify(self) -> None:
        vq = self._slot.vq
        if vq is not None and vq.need_notify():
            self._conn.signal_call(self._slot)


class DeviceContext:
    """What a device may do with its connection."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @property
    def memory(self) -> GuestMemory:
        return self._conn.memory

    @property
    def negotiated_features(self) -> int | None:
        return self._conn.session.negotiated_features

    @property
    def effective_features(self) -> int:
        return self._conn.session.effective_features

    def queue(self, role: str) -> QueueHandle | None:
        """The running queue that the active layout gives ``role``."""
        for slot in self._conn.slots:
            if slot.role == role and slot.running:
                return QueueHandle(self._conn, slot)
        return None

    def announce_config_change(self) -> None:
        self._conn.schedule_config_change()

    # For devices with their own C data path (net): every queue slot by
    # index (ring, call fd, state), the ring-error state, and reporting one.
    @property
    def slots(self) -> Sequence[QueueSlot]:
        return self._conn.slots

    @property
    def device_broken(self) -> RingError | None:
        return self._conn.device_broken

    def ring_fault(self, slot: QueueSlot, error: RingError) -> None:
        self._conn.ring_fault(slot, error)

    @property
    def nursery(self) -> trio.Nursery | None:
        return self._conn.nursery


class Connection:
    """Serves one front-end on one connected socket."""

    def __init__(self, device: Device, sock: trio.socket.SocketType, *, ring_impl: str = "native",
                 name: str = "vhost-user") -> None:
        self.device = device
        self.sock = sock
        self.ring_impl = ring_impl
        self.name = name
        self.session = P.Session(
            offered_features=device.offered_bits,
            num_queues=device.max_queues,
            has_config=bool(device.config_fields),
            extra_protocol_features=getattr(device, "protocol_features", 0),
            queue_num=getattr(device, "vhost_queue_num", None),
            excluded_protocol_features=getattr(device, "excluded_protocol_features", 0),
        )
        self.memory = GuestMemory()
        self.slots = [QueueSlot(i) for i in range(device.max_queues)]
        self.backend_sock: trio.socket.SocketType | None = None
        self.backend_lock = trio.Lock()
        self.nursery: trio.Nursery | None = None
        self.device_broken: RingError | None = None
        self._features_announced = False
        self._warned: set[tuple[int, str]] = set()
        self.messages = 0

    # ------------------------------------------------------------ life

    async def serve(self) -> None:
        """Run until the front-end disconnects or breaks the protocol."""
        self.device.attach(DeviceContext(self))
        log.info("%s: front-end connected (device %s)", self.name, self.device.name)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.device.run, DeviceContext(self))
                try:
                    await self._control_loop()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.nursery = None
            self._release()
            self.device.detach()
            log.info("%s: front-end disconnected", self.name)

    async def _control_loop(self) -> None:
        while True:
            try:
                header, payload, fds = await recv_message(self.sock)
            except Disconnected:
                return
            except wire.WireError as exc:
                log.error("%s: closing connection: %s: %s", self.name, exc.request, exc.fault)
                return
            except OSError as exc:
                log.info("%s: connection error: %s", self.name, exc)
                return
            self.messages += 1
            try:
                event = self.session.receive(header, payload, fds)
            except P.ProtocolError as exc:
                close_fds(fds)
                log.error("%s: closing connection: %s: %s", self.name, exc.request, exc.fault)
                return
            self._trace(header, event)
            try:
                result = await self._apply(event)
            except P.ProtocolError as exc:
                log.error("%s: closing connection: %s: %s", self.name, exc.request, exc.fault)
                return
            reply = self.session.reply(event, result)
            if reply is not None:
                try:
                    await send_message(self.sock, reply)
                except OSError as exc:
                    log.info("%s: cannot send reply to %s: %s", self.name, event.request.name, exc)
                    return

    def _release(self) -> None:
        for slot in self.slots:
            slot.vq = None
            for holder in (slot.kick, slot.call, slot.err):
                holder.close()
        if self.backend_sock is not None:
            self.backend_sock.close()
            self.backend_sock = None
        self.memory.clear()

    # ------------------------------------------------------------ trace

    def _trace(self, header: wire.RawHeader, event: P.Event) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        fields = {k: v for k, v in vars(event).items() if k not in ("request", "need_reply")}
        for key in ("features", "accepted"):
            if key in fields and isinstance(fields[key], int):
                fields[key] = f"{fields[key]:#x} {self.device.feature_names(fields[key])}"
        if isinstance(event, P.ProtocolFeaturesSet):
            fields["features"] = wire.protocol_feature_names(event.features)
        log.debug("%s: <- %s flags=%#x %s", self.name, event.request.name, header.flags, fields)

    # ------------------------------------------------------------ events

    async def _apply(self, ev: P.Event) -> Any:  # noqa: C901 - one branch per event type
        if isinstance(ev, P.Query):
            return None
        if isinstance(ev, P.FeaturesSet):
            self.device_features_accepted(ev.features)
            return None
        if isinstance(ev, P.ProtocolFeaturesSet):
            log.info("%s: protocol features: %s", self.name, ", ".join(wire.protocol_feature_names(ev.features)))
            return None
        if isinstance(ev, P.OwnerSet):
            return None
        if isinstance(ev, P.RingsReset):
            await self._stop_all()
            if ev.full:
                self._reset_device()
            return None
        if isinstance(ev, P.MemTableSet):
            specs = [RegionSpec(r.gpa, r.size, r.uva, r.mmap_offset) for r in ev.regions]
            await self._change_memory(ev.request, lambda: self.memory.replace(list(zip(ev.fds, specs))), ev.fds)
            return None
        if isinstance(ev, P.MemRegionAdded):
            r = ev.region
            await self._change_memory(ev.request, lambda: self.memory.add_region(
                ev.fd, RegionSpec(r.gpa, r.size, r.uva, r.mmap_offset)), (ev.fd,))
            return None
        if isinstance(ev, P.MemRegionRemoved):
            r = ev.region
            if ev.fd is not None:
                os.close(ev.fd)
            await self._change_memory(ev.request, lambda: self.memory.remove_region(
                RegionSpec(r.gpa, r.size, r.uva, r.mmap_offset)), ())
            return None
        if isinstance(ev, P.VringNum):
            self.slots[ev.index].num = ev.num
            return None
        if isinstance(ev, P.VringAddr):
            slot = self.slots[ev.index]
            slot.addr = ev
            if slot.running:
                self._configure_ring(slot, ev.request)
            return None
        if isinstance(ev, P.VringBase):
            self.slots[ev.index].base = ev.base
            return None
        if isinstance(ev, P.VringStop):
            return await self._stop_ring(self.slots[ev.index])
        if isinstance(ev, P.VringFd):
            return await self._set_vring_fd(ev)
        if isinstance(ev, P.VringEnable):
            slot = self.slots[ev.index]
            slot.enabled = ev.enable
            log.debug("%s: queue %d %s", self.name, ev.index, "enabled" if ev.enable else "disabled")
            if ev.enable and slot.running:
                self._wake(slot)
            return None
        if isinstance(ev, P.VringKickInband):  # pragma: no cover - never offered
            self._wake(self.slots[ev.index])
            return None
        if isinstance(ev, P.BackendChannelSet):
            if self.backend_sock is not None:
                self.backend_sock.close()
            self.backend_sock = trio.socket.fromfd(ev.fd, socket.AF_UNIX, socket.SOCK_STREAM)
            os.close(ev.fd)  # fromfd duplicated it
            return None
        if isinstance(ev, P.ConfigRead):
            return self.device.read_config(ev.offset, ev.size)
        if isinstance(ev, P.ConfigWrite):
            written = self.device.write_config(ev.offset, ev.data)
            log.debug("%s: config write at %d (%d bytes) changed %s", self.name, ev.offset, len(ev.data), written)
            return None
        if isinstance(ev, P.StatusSet):
            return self._status(ev)
        if isinstance(ev, P.DeviceRequest):
            try:
                return self.device.request(ev.request.name, ev.payload)
            except NotImplementedError:
                raise P.ProtocolError(ev.request.name, f"not supported by device {self.device.name}") from None
        raise AssertionError(f"unhandled event {ev!r}")  # pragma: no cover

    def device_features_accepted(self, features: int) -> None:
        log.debug("%s: driver accepted %s", self.name, self.device.feature_names(features))

    def _status(self, ev: P.StatusSet) -> Any:
        if ev.status == 0:
            log.info("%s: device reset by the driver (status 0)", self.name)
            self._reset_device()
            return None
        if ev.features_ok_requested:
            reason = self.device.validate_features(ev.accepted)
            if reason is not None:
                log.warning("%s: refusing features %s at FEATURES_OK: %s", self.name,
                            self.device.feature_names(ev.accepted), reason)
                return P.Refusal(reason)
            self._announce_features(ev.accepted)
        elif self.session.negotiated_features is not None:
            # Legacy drivers' features become final at DRIVER_OK (protocol.py).
            self._announce_features(self.session.negotiated_features)
        return None

    def _announce_features(self, features: int) -> None:
        if self._features_announced:
            return
        self._features_announced = True
        log.info("%s: negotiated features: %s", self.name, ", ".join(self.device.feature_names(features)))
        self.device.features_negotiated(features)

    def _reset_device(self) -> None:
        self._features_announced = False
        self.device_broken = None
        self.device.reset()

    async def _change_memory(self, req: wire.Request, change: Any, fds: Sequence[int]) -> None:
        # Rings hold pointers into the old mappings: stop their tasks first,
        # then re-translate (DPDK replaces the table while running).
        running = [s for s in self.slots if s.running]
        for slot in running:
            await self._cancel_task(slot)
        try:
            change()
        except MemoryAccessError as exc:
            raise P.ProtocolError(req.name, str(exc)) from None
        for slot in running:
            self._configure_ring(slot, req)
            self._spawn(slot)

    # ------------------------------------------------------------ rings

    async def _set_vring_fd(self, ev: P.VringFd) -> None:
        slot = self.slots[ev.index]
        if ev.fd is not None:
            # Never block the event loop on an eventfd a front-end made blocking.
            os.set_blocking(ev.fd, False)
        if ev.request == wire.Request.SET_VRING_KICK:
            await self._cancel_task(slot)
            slot.kick.replace(ev.fd)
            slot.poll = ev.fd is None
            self._start_ring(slot)
        elif ev.request == wire.Request.SET_VRING_CALL:
            slot.call.replace(ev.fd)
        else:
            slot.err.replace(ev.fd)

    def _start_ring(self, slot: QueueSlot) -> None:
        """Spec: a ring starts when its kick fd arrives."""
        if slot.addr is None or slot.num == 0:
            raise P.ProtocolError("SET_VRING_KICK", f"queue {slot.index} started without size or addresses")
        if not self._features_announced and self.session.negotiated_features is not None:
            self._announce_features(self.session.negotiated_features)
        if slot.vq is None:
            slot.vq = VirtQueue(self.memory, impl=self.ring_impl)
        self._configure_ring(slot, wire.Request.SET_VRING_KICK, base=slot.base)
        self._check_role(slot)
        self._spawn(slot)
        # Spec: without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        if not self.session.accepted_features or not (
                self.session.accepted_features & (1 << wire.VHOST_USER_F_PROTOCOL_FEATURES)):
            slot.enabled = True

    def _configure_ring(self, slot: QueueSlot, req: wire.Request, base: int | None = None) -> None:
        assert slot.vq is not None and slot.addr is not None
        num = slot.num
        try:
            desc = self.memory.uva_to_gpa(slot.addr.desc, 16 * num)
            avail = self.memory.uva_to_gpa(slot.addr.avail, 6 + 2 * num)
            used = self.memory.uva_to_gpa(slot.addr.used, 6 + 8 * num)
            event_idx = bool(self.session.effective_features & (1 << RING_EVENT_IDX_BIT))
            last = base if base is not None else slot.vq.last_avail_idx
            slot.vq.configure(num, desc, avail, used, event_idx=event_idx, last_avail_idx=last)
        except (MemoryAccessError, RingError, ValueError) as exc:
            slot.vq = None
            raise P.ProtocolError(req.name, f"queue {slot.index}: ring not in guest memory: {exc}") from None

    def _check_role(self, slot: QueueSlot) -> None:
        """Name the queue per the active policy and warn when the driver's
        use disagrees with it (design.md semantics 2)."""
        dev = self.device
        negotiated = self.session.effective_features
        layout: QueueLayout = dev.queue_layout(negotiated)
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

    def _spawn(self, slot: QueueSlot) -> None:
        assert self.nursery is not None
        slot.scope = trio.CancelScope()
        slot.stopped = trio.Event()
        self.nursery.start_soon(self._queue_task, slot, slot.scope, slot.stopped)

    async def _queue_task(self, slot: QueueSlot, scope: trio.CancelScope, stopped: trio.Event) -> None:
        try:
            with scope:
                # First pass without waiting: buffers made available while
                # the ring was stopped or its memory was being replaced may
                # never be kicked again.
                more = True
                while True:
                    if more:  # chains left after a full round: no kick may come for them
                        await trio.lowlevel.checkpoint()
                    elif slot.kick.fd is not None:
                        await trio.lowlevel.wait_readable(slot.kick.fd)
                        _drain_eventfd(slot.kick.fd)
                        if slot.self_wakes:  # our own wake-up, not the front-end's kick
                            slot.self_wakes -= 1
                        else:
                            slot.kicks += 1
                    else:  # front-end asked for polling
                        await trio.sleep(0.001)
                        slot.kicks += 1
                    more = self._process(slot)
        finally:
            stopped.set()

    async def _cancel_task(self, slot: QueueSlot) -> None:
        if slot.scope is not None and slot.stopped is not None:
            slot.scope.cancel()
            await slot.stopped.wait()
        slot.scope = slot.stopped = None

    async def _stop_ring(self, slot: QueueSlot) -> int:
        await self._cancel_task(slot)
        if slot.vq is None:
            return slot.base
        base = slot.vq.stop()
        log.info("%s: queue %d (%s) stopped at avail index %d after %d buffers", self.name, slot.index,
                 slot.role, base, slot.buffers)
        slot.base = base
        slot.vq = None
        return base

    async def _stop_all(self) -> None:
        for slot in self.slots:
            if slot.running:
                await self._stop_ring(slot)
            slot.enabled = False

    def _process(self, slot: QueueSlot) -> bool:
        """Run the device on every available chain; re-check after enabling
        notifications so a kick that raced with us is not lost.  True when
        chains are still pending after 64 rounds: the guest may have read
        avail_event before we moved it and will not kick for them, so the
        caller must come back without waiting for a kick."""
        vq = slot.vq
        if vq is None or not slot.enabled or self.device_broken is not None:
            return False
        handle = QueueHandle(self, slot)
        for _ in range(64):
            before = vq.last_avail_idx
            vq.set_notification(False)
            self.device.on_kick(handle)
            vq.set_notification(True)
            if self.device_broken is not None or vq.last_avail_idx == before or not vq.avail_pending():
                return False
        return True

    def _wake(self, slot: QueueSlot) -> None:
        """Make the queue task run a pass now: all processing happens in that
        task, so its 'chains still pending' loop covers every path.  Writing
        the kick eventfd is what a front-end kick does anyway."""
        fd = slot.kick.fd
        if fd is not None:
            slot.self_wakes += 1
            try:
                os.write(fd, _EVENTFD_ONE)
            except BlockingIOError:
                pass  # counter saturated: a wake-up is pending anyway
        # Polling queues run a pass every millisecond regardless.

    def signal_call(self, slot: QueueSlot) -> None:
        fd = slot.call.fd
        if fd is None:
            return
        slot.notifies += 1
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # counter saturated: the guest will be interrupted anyway

    def ring_fault(self, slot: QueueSlot, error: RingError) -> None:
        """The guest put garbage in a ring: the device needs a reset."""
        if self.device_broken is None:
            self.device_broken = error
            log.warning("%s: queue %d: guest ring error %s; device needs reset", self.name, slot.index, error)
            self.session.mark_needs_reset()
            self.schedule_config_change()

    # ------------------------------------------------------------ back-end channel

    def schedule_config_change(self) -> None:
        if self.nursery is not None and self.backend_sock is not None:
            self.nursery.start_soon(self.send_config_change)

    async def send_config_change(self) -> bool:
        """VHOST_USER_BACKEND_CONFIG_CHANGE_MSG; waits for the ack when
        REPLY_ACK was negotiated.  Returns whether it was delivered."""
        sock = self.backend_sock
        if sock is None:
            return False
        need_reply = self.session.reply_ack
        msg = wire.encode(wire.BackendRequest.CONFIG_CHANGE_MSG, backend=True,
                          flags=wire.FLAG_NEED_REPLY if need_reply else 0)
        async with self.backend_lock:
            try:
                await send_message(sock, msg)
                if need_reply:
                    with trio.fail_after(5):
                        header, payload, fds = await recv_message(sock, backend=True)
                    close_fds(fds)
                    if payload and int.from_bytes(payload[:8], "little") != 0:
                        log.warning("%s: front-end refused the config change message", self.name)
                        return False
            except (OSError, Disconnected, wire.WireError, trio.TooSlowError) as exc:
                log.warning("%s: back-end channel: config change not delivered: %s", self.name, exc)
                return False
        log.debug("%s: -> CONFIG_CHANGE_MSG", self.name)
        return True

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        s = self.session
        dev = self.device
        layout = dev.queue_layout(s.effective_features)
        return {
            "connected": True,
            "messages": self.messages,
            "offered_features": dev.feature_names(dev.offered_bits),
            "accepted_features": None if s.accepted_features is None else dev.feature_names(s.accepted_features),
            "negotiated_features": None if s.negotiated_features is None
            else dev.feature_names(s.negotiated_features),
            "protocol_features": wire.protocol_feature_names(s.acked_protocol_features),
            "status": s.status,
            "needs_reset": s.needs_reset,
            "ring_error": None if self.device_broken is None else str(self.device_broken),
            "queue_policy": layout.policy,
            "queues": [
                {"index": slot.index, "role": layout.roles.get(slot.index), "size": slot.num,
                 "running": slot.running, "enabled": slot.enabled, "buffers": slot.buffers,
                 "kicks": slot.kicks, "notifies": slot.notifies}
                for slot in self.slots
            ],
        }


def _drain_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass
    except OSError as exc:  # pragma: no cover - a pipe from an odd front-end
        if exc.errno not in (errno.EAGAIN, errno.EINVAL):
            raise
