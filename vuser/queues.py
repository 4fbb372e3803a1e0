"""The queue runtime of one connection: rings, their fds and their tasks.

Shape (style.md, "Concurrency"): one task per running queue waits on its
kick eventfd (``trio.lowlevel.wait_readable``) and runs passes; a pass
runs rounds of the ``round`` callback (the device's ``on_kick``, given by
the handler) with guest notifications off, until the ring is empty.

Bounded work (issue 9): a round spends at most a budget of bytes and
segments (``RoundBudget``: what a device's pops may take; a device with its
own data path bounds its C calls the same way), and the task yields to
every other task between rounds, so no guest holds the process: one
round is the longest anything waits for one queue.
Stopping a ring (GET_VRING_BASE, reset, fd or memory replacement) cancels
its task and waits for it, so the returned base is exact and no task ever
waits on a closed fd.  Calls are signalled on the call eventfd.

This module knows rings, fds and tasks, not devices: what a round does and
what a guest ring error means are callbacks.

Packed rings in C may keep their state in a ``RingStateFile`` (``vuser
run`` gives one per socket): a restarted vuser then resumes them where it
left them, since QEMU's SET_VRING_BASE after a back-end restart is stale
(see ``vuser.ringstate``).

Resource handling: every fd given to a slot (kick, call, err) is owned by
that slot's ``FdSlot`` and closed when replaced or at ``release``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import trio

from . import events as E
from .fds import drain_eventfd, signal_eventfd
from .memory import GuestMemory, MemoryAccessError
from .rings.errors import ERR_FAULT
from .ringstate import RingStateFile
from .virtqueue import RingError, VirtQueue

log = logging.getLogger(__name__)

# Rounds of one pass before the task comes back without waiting for a kick
# (chains still pending); it yields between any two rounds anyway.
ROUNDS_PER_PASS = 64
# What one round may take from the ring (vhost-net's per-run weight is
# 512 KiB or 256 packets): bytes of the chains popped, and their segments
# (or descriptors, for chains of zero-length ones).
ROUND_BYTES = 512 * 1024
ROUND_SEGMENTS = 1024


@dataclass
class RoundBudget:
    """What is left of the current round's budget (reset every round)."""

    bytes: int = ROUND_BYTES
    segments: int = ROUND_SEGMENTS

    def reset(self) -> None:
        self.bytes = ROUND_BYTES
        self.segments = ROUND_SEGMENTS

    @property
    def spent(self) -> bool:
        return self.bytes <= 0 or self.segments <= 0


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
    """One queue index of a connection: what the front-end set up for it,
    the fds it sent, the ring once started, and its counters."""

    index: int
    num: int = 0
    addr: E.VringAddr | None = None
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
    role: str | None = None  # a label the handler gives (the device layout's name)
    budget: RoundBudget = field(default_factory=RoundBudget)

    @property
    def running(self) -> bool:
        return self.vq is not None


RoundFn = Callable[[QueueSlot], None]
FaultFn = Callable[[QueueSlot, RingError], None]


class QueueRuntime:
    """Slots, ring set-up and queue tasks of one connection."""

    def __init__(self, memory: GuestMemory, nqueues: int, *, round: RoundFn, on_fault: FaultFn,
                 ring_impl: str = "native", name: str = "vhost-user",
                 ring_state: RingStateFile | None = None) -> None:
        self.memory = memory
        self.ring_state = ring_state if ring_impl == "native" else None
        self.slots = [QueueSlot(i) for i in range(nqueues)]
        self._round = round
        self._on_fault = on_fault
        self.ring_impl = ring_impl
        self.name = name
        self.nursery: trio.Nursery | None = None
        self.broken: RingError | None = None
        self.closing = False

    # ------------------------------------------------------------ rings

    def configure(self, slot: QueueSlot, *, event_idx: bool, base: int | None = None,
                  packed: bool = False, in_order: bool = False) -> None:
        """(Re)start the slot's ring from its size and addresses, in the
        layout the features chose.  Without ``base``, a running ring of the
        same shape only moves (its addresses translated again after a
        memory-table change or SET_VRING_ADDR), keeping every state field.
        Raises ValueError naming what is wrong when the ring is not in guest
        memory."""
        if slot.addr is None or slot.num == 0:
            raise ValueError(f"queue {slot.index} started without size or addresses")
        layout = "packed" if packed else "split"
        state = self.ring_state if packed and self.ring_state is not None and self.ring_state.usable else None
        if slot.vq is None or slot.vq.layout != layout:
            slot.vq = VirtQueue(self.memory, impl=self.ring_impl, layout=layout,
                                ring_memory=None if state is None else state.ring_memory(slot.index))
        vq, num = slot.vq, slot.num
        desc_size, driver_size, device_size = vq.ring.area_sizes(num)
        try:
            desc = self.memory.uva_to_gpa(slot.addr.desc, desc_size)
            driver = self.memory.uva_to_gpa(slot.addr.avail, driver_size)
            device = self.memory.uva_to_gpa(slot.addr.used, device_size)
            if base is None and vq.shaped(num, event_idx, in_order):
                vq.relocate(desc, driver, device)
                return
            last = base if base is not None else vq.last_avail_idx
            if state is not None and base is not None:
                last = state.resume(slot.index, num, (desc, driver, device), base,
                                    lambda: self._event_area(device)) or base
            vq.configure(num, desc, driver, device, event_idx=event_idx, base=last, in_order=in_order)
            if state is not None and base is not None:
                state.started(slot.index, num, (desc, driver, device), base)
        except MemoryAccessError as exc:
            slot.vq = None
            raise ValueError(f"queue {slot.index}: ring not in guest memory: {exc}") from None
        except (RingError, ValueError) as exc:
            slot.vq = None
            raise ValueError(f"queue {slot.index}: {exc}") from None

    def _event_area(self, gpa: int) -> tuple[int, int]:
        """(off_wrap, flags) of a packed ring's event suppression
        structure (guest memory, read guarded)."""
        data = self.memory.read(self.memory.gpa_view(gpa, 4))
        return int.from_bytes(data[:2], "little"), int.from_bytes(data[2:], "little")

    def forget_ring_state(self, slot: QueueSlot | None = None) -> None:
        """The front-end learned the rings' state (GET_VRING_BASE) or reset
        the device: the state file must not be believed for them again."""
        if self.ring_state is not None:
            self.ring_state.stopped(None if slot is None else slot.index)

    async def stop(self, slot: QueueSlot) -> int:
        """GET_VRING_BASE: stop the ring; the exact base to resume from."""
        await self.cancel(slot)
        if slot.vq is None:
            return slot.base
        base = slot.vq.stop()
        self.forget_ring_state(slot)
        log.info("%s: queue %d (%s) stopped at avail index %d after %d buffers", self.name, slot.index,
                 slot.role, base, slot.buffers)
        slot.base = base
        slot.vq = None
        return base

    def release(self) -> None:
        """Disconnect: drop the rings, close every fd."""
        for slot in self.slots:
            slot.vq = None
            for holder in (slot.kick, slot.call, slot.err):
                holder.close()

    # ------------------------------------------------------------ tasks

    def spawn(self, slot: QueueSlot) -> None:
        assert self.nursery is not None
        slot.scope = trio.CancelScope()
        slot.stopped = trio.Event()
        self.nursery.start_soon(self._queue_task, slot, slot.scope, slot.stopped)

    async def cancel(self, slot: QueueSlot) -> None:
        """Stop the slot's task and wait until it has (the ring is then
        untouched until the next spawn)."""
        if slot.scope is not None and slot.stopped is not None:
            slot.scope.cancel()
            await slot.stopped.wait()
        slot.scope = slot.stopped = None

    async def _queue_task(self, slot: QueueSlot, scope: trio.CancelScope, stopped: trio.Event) -> None:
        try:
            with scope:
                # First pass without waiting: buffers made available while
                # the ring was stopped or its memory was being replaced may
                # never be kicked again.
                more = True
                while True:
                    if more:  # chains left after a full pass: no kick may come for them
                        await trio.lowlevel.checkpoint()
                    elif slot.kick.fd is not None:
                        await trio.lowlevel.wait_readable(slot.kick.fd)
                        drain_eventfd(slot.kick.fd)
                        if slot.self_wakes:  # our own wake-up, not the front-end's kick
                            slot.self_wakes -= 1
                        else:
                            slot.kicks += 1
                    else:  # front-end asked for polling
                        await trio.sleep(0.001)
                        slot.kicks += 1
                    more = await self._pass(slot)
        except MemoryAccessError as exc:
            # The front-end took guest memory away under a mapping (a
            # SIGBUS the guard caught): its connection ends.
            self.close(f"queue {slot.index} ({slot.role}): {exc}")
        except Exception as exc:
            # The device failed on this queue (a bug, or a guest found a
            # way to make it raise): this connection ends, nothing else.
            log.exception("%s: queue %d (%s) failed", self.name, slot.index, slot.role)
            self.close(f"queue {slot.index} ({slot.role}): {type(exc).__name__}: {exc}")
        finally:
            stopped.set()

    async def _pass(self, slot: QueueSlot) -> bool:
        """Run rounds on every available chain, yielding between rounds;
        re-check after enabling notifications so a kick that raced with us
        is not lost.  True when chains are still pending after
        ROUNDS_PER_PASS rounds: the guest may have read avail_event before
        we moved it and will not kick for them, so the caller must come
        back without waiting for a kick."""
        for n in range(ROUNDS_PER_PASS):
            if n:
                await trio.lowlevel.checkpoint()  # every other task runs between two rounds
            vq = slot.vq
            if vq is None or not slot.enabled or self.broken is not None:
                return False
            before = vq.popped  # (not the ring position: it repeats after whole laps)
            waiting = vq.avail_pending()
            vq.set_notification(False)
            slot.budget.reset()
            self._round(slot)
            vq.set_notification(True)
            if self.broken is not None or not vq.avail_pending():
                return False
            # Chains pending now.  If some were pending before the round and
            # it took none, the device leaves this queue alone (net receive
            # queues are filled from the other side): stop.  Otherwise they
            # came while notifications were off -- a packed ring's driver
            # does not kick while the device says DISABLE -- so go again.
            if waiting and vq.popped == before:
                return False
        return True

    def wake(self, slot: QueueSlot) -> None:
        """Make the queue task run a pass now: all processing happens in that
        task, so its 'chains still pending' loop covers every path.  Writing
        the kick eventfd is what a front-end kick does anyway."""
        fd = slot.kick.fd
        if fd is not None and signal_eventfd(fd):  # False: a wake-up is pending anyway
            slot.self_wakes += 1
        # Polling queues run a pass every millisecond regardless.

    # ------------------------------------------------------------ notifications

    def notify(self, slot: QueueSlot) -> None:
        """Signal the guest if it wants an interrupt for what was pushed."""
        vq = slot.vq
        if vq is not None and vq.need_notify():
            self.signal_call(slot)

    def signal_call(self, slot: QueueSlot) -> None:
        fd = slot.call.fd
        if fd is not None and signal_eventfd(fd):  # False: the guest is being interrupted anyway
            slot.notifies += 1

    def close(self, why: str) -> None:
        """End the connection (one log line, however many queues notice):
        what the front-end did cannot be recovered from, such as guest
        memory taken away."""
        if self.closing:
            return
        self.closing = True
        log.error("%s: closing connection: %s", self.name, why)
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    def fault(self, slot: QueueSlot, error: RingError) -> None:
        """The guest put garbage in a ring: stop processing every queue of
        the connection until the device is reset.  A ring that faulted
        (SIGBUS: the front-end shrank guest memory) ends the connection."""
        if error.code == ERR_FAULT:
            self.close(f"queue {slot.index} ({slot.role}): {error}")
            return
        if self.broken is None:
            self.broken = error
            log.warning("%s: queue %d: guest ring error %s; device needs reset", self.name, slot.index, error)
            self._on_fault(slot, error)
