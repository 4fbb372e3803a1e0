"""The queue runtime of one connection: rings, their fds and their tasks.

Shape (style.md, "Concurrency"): one task per running queue waits on its
kick eventfd (``trio.lowlevel.wait_readable``) and runs passes; a pass
runs rounds of the ``round`` callback (the device's ``on_kick``, given by
the handler) with guest notifications off, until the ring is empty.
Stopping a ring (GET_VRING_BASE, reset, fd or memory replacement) cancels
its task and waits for it, so the returned base is exact and no task ever
waits on a closed fd.  Calls are signalled on the call eventfd.

This module knows rings, fds and tasks, not devices: what a round does and
what a guest ring error means are callbacks.

Resource handling: every fd given to a slot (kick, call, err) is owned by
that slot's ``FdSlot`` and closed when replaced or at ``release``.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import trio

from . import events as E
from .memory import GuestMemory, MemoryAccessError
from .virtqueue import RingError, VirtQueue

log = logging.getLogger(__name__)

_EVENTFD_ONE = (1).to_bytes(8, "little")
# Rounds of one pass before the task checks in with the scheduler and, if
# chains are still pending, comes back without waiting for a kick.
ROUNDS_PER_PASS = 64


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

    @property
    def running(self) -> bool:
        return self.vq is not None


RoundFn = Callable[[QueueSlot], None]
FaultFn = Callable[[QueueSlot, RingError], None]


class QueueRuntime:
    """Slots, ring set-up and queue tasks of one connection."""

    def __init__(self, memory: GuestMemory, nqueues: int, *, round: RoundFn, on_fault: FaultFn,
                 ring_impl: str = "native", name: str = "vhost-user") -> None:
        self.memory = memory
        self.slots = [QueueSlot(i) for i in range(nqueues)]
        self._round = round
        self._on_fault = on_fault
        self.ring_impl = ring_impl
        self.name = name
        self.nursery: trio.Nursery | None = None
        self.broken: RingError | None = None

    # ------------------------------------------------------------ rings

    def configure(self, slot: QueueSlot, *, event_idx: bool, base: int | None = None,
                  request: str = "SET_VRING_KICK") -> None:
        """(Re)start the slot's ring from its size and addresses.  Raises
        ValueError naming what is wrong when the ring is not in guest
        memory."""
        if slot.addr is None or slot.num == 0:
            raise ValueError(f"queue {slot.index} started without size or addresses")
        if slot.vq is None:
            slot.vq = VirtQueue(self.memory, impl=self.ring_impl)
        num = slot.num
        desc_size, driver_size, device_size = slot.vq.ring.area_sizes(num)
        try:
            desc = self.memory.uva_to_gpa(slot.addr.desc, desc_size)
            avail = self.memory.uva_to_gpa(slot.addr.avail, driver_size)
            used = self.memory.uva_to_gpa(slot.addr.used, device_size)
            last = base if base is not None else slot.vq.last_avail_idx
            slot.vq.configure(num, desc, avail, used, event_idx=event_idx, base=last)
        except (MemoryAccessError, RingError, ValueError) as exc:
            slot.vq = None
            raise ValueError(f"queue {slot.index}: ring not in guest memory: {exc}") from None

    async def stop(self, slot: QueueSlot) -> int:
        """GET_VRING_BASE: stop the ring; the exact base to resume from."""
        await self.cancel(slot)
        if slot.vq is None:
            return slot.base
        base = slot.vq.stop()
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
                        _drain_eventfd(slot.kick.fd)
                        if slot.self_wakes:  # our own wake-up, not the front-end's kick
                            slot.self_wakes -= 1
                        else:
                            slot.kicks += 1
                    else:  # front-end asked for polling
                        await trio.sleep(0.001)
                        slot.kicks += 1
                    more = self._pass(slot)
        finally:
            stopped.set()

    def _pass(self, slot: QueueSlot) -> bool:
        """Run rounds on every available chain; re-check after enabling
        notifications so a kick that raced with us is not lost.  True when
        chains are still pending after ROUNDS_PER_PASS rounds: the guest
        may have read avail_event before we moved it and will not kick for
        them, so the caller must come back without waiting for a kick."""
        vq = slot.vq
        if vq is None or not slot.enabled or self.broken is not None:
            return False
        for _ in range(ROUNDS_PER_PASS):
            before = vq.last_avail_idx
            vq.set_notification(False)
            self._round(slot)
            vq.set_notification(True)
            if self.broken is not None or vq.last_avail_idx == before or not vq.avail_pending():
                return False
        return True

    def wake(self, slot: QueueSlot) -> None:
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

    # ------------------------------------------------------------ notifications

    def notify(self, slot: QueueSlot) -> None:
        """Signal the guest if it wants an interrupt for what was pushed."""
        vq = slot.vq
        if vq is not None and vq.need_notify():
            self.signal_call(slot)

    def signal_call(self, slot: QueueSlot) -> None:
        fd = slot.call.fd
        if fd is None:
            return
        slot.notifies += 1
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # counter saturated: the guest will be interrupted anyway

    def fault(self, slot: QueueSlot, error: RingError) -> None:
        """The guest put garbage in a ring: stop processing every queue of
        the connection until the device is reset."""
        if self.broken is None:
            self.broken = error
            log.warning("%s: queue %d: guest ring error %s; device needs reset", self.name, slot.index, error)
            self._on_fault(slot, error)


def _drain_eventfd(fd: int) -> None:
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass
    except OSError as exc:  # pragma: no cover - a pipe from an odd front-end
        if exc.errno not in (errno.EAGAIN, errno.EINVAL):
            raise
