"""Driver side of a packed virtqueue (virtio 1.x, section 2.8), in guest memory.

What Linux's drivers/virtio/virtio_ring.c does with a packed ring (and
DPDK's virtio driver, which behaves the same way for what a device sees):

* a chain takes consecutive slots from ``next_avail`` (wrapping, the avail
  wrap counter flipping), every descriptor carries its lap's AVAIL/USED
  bits and the buffer id; the head's flags are written last, which makes
  the whole chain available at once (2.8.21);
* with indirect descriptors a chain of several buffers takes one slot
  pointing at a table (2.8.19);
* buffer ids come from a LIFO free list, as Linux's free_head chain;
* a used descriptor (AVAIL == USED == the used wrap counter) gives back a
  buffer id; the driver skips the slots that buffer took.  With
  ``in_order`` a used descriptor completes every buffer up to its id, in
  the order they were added (2.8.9; the skipped ones report length 0);
* notifications follow the event suppression structures (2.8.10): kicks
  when the device's flags say ENABLE, or DESC with the device's off_wrap
  passed; the driver's own structure is DISABLE / ENABLE / DESC with
  off_wrap = the next used slot it will read.

Layout: the descriptor ring (16 bytes a slot), then the driver and the
device event suppression structures (4 bytes each).
"""

from __future__ import annotations

import collections
from typing import Any

from vuser.frontend.memory import GuestRam
from vuser.frontend.queue import DriverQueueBase, InFlight, QueueFull, Segment, UsedElem, UsedRingError
from vuser.rings.base import MAX_QUEUE_SIZE
from vuser.rings.chain_ref import DESC_SIZE
from vuser.rings.packed_ref import PDESC, WRAP_BIT, IDX_MASK, packed_base
from vuser.virtio import DescFlag, EventFlags

EVENT_SIZE = 4
FLAGS_OFF = 14
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)


def avail_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor made available in the lap ``wrap``."""
    return AVAIL if wrap else USED


class PackedDriverQueue(DriverQueueBase):
    """The driver's half of one packed virtqueue; see the module docstring."""

    ring_layout = "packed"

    def __init__(self, memory: GuestRam, index: int, num: int, *, region: int | None = None,
                 event_idx: bool = False, indirect: bool = False, in_order: bool = False,
                 callbacks: bool = True, check_size: bool = True, **_: Any) -> None:
        if check_size and not 1 <= num <= MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {num} is not in 1..{MAX_QUEUE_SIZE}")
        super().__init__(memory, index, num, event_idx=event_idx, indirect=indirect)
        self.in_order = in_order
        size = DESC_SIZE * num + 2 * EVENT_SIZE
        self.base = memory.alloc(size, DESC_SIZE,
                                 region=memory.largest_region() if region is None else region)
        memory.fill(self.base, size)
        self.desc_gpa = self.base
        self.driver_gpa = self.base + DESC_SIZE * num
        self.device_gpa = self.driver_gpa + EVENT_SIZE
        self.next_avail, self.avail_wrap = 0, 1
        self.last_used, self.used_wrap = 0, 1
        self.num_added = 0
        self._free_slots = num
        self._ids: collections.deque[int] = collections.deque(range(num))
        self._order: collections.deque[int] = collections.deque()   # ids in the order added
        self.callbacks = callbacks
        self._head_flags: tuple[int, int] | None = None
        self._write_driver_event()

    # ---------------------------------------------------------- addresses and state

    @property
    def num_free(self) -> int:
        return self._free_slots

    def addresses(self) -> tuple[int, int, int]:
        """(descriptor ring, driver event, device event) guest-physical addresses."""
        return self.desc_gpa, self.driver_gpa, self.device_gpa

    def describe(self) -> str:
        return (f"next avail {self.next_avail} wrap {self.avail_wrap}, "
                f"last used {self.last_used} wrap {self.used_wrap}")

    def initial_base(self, avail_half_only: bool = False) -> int:
        """SET_VRING_BASE's value for this ring as it stands (QEMU sends
        both halves; DPDK's virtio_user only the avail half)."""
        base = packed_base(self.next_avail, self.avail_wrap, self.last_used, self.used_wrap)
        return base & 0xFFFF if avail_half_only else base

    # ---------------------------------------------------------- raw ring access

    def write_desc(self, slot: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        self.memory.pack("<QIHH", self.desc_gpa + DESC_SIZE * (slot % self.num), addr, length, buffer_id, flags)

    def add_raw(self, descs: list[tuple[int, int, int, int]], *, lap_bits: bool = True) -> None:
        """Write ``descs`` (addr, len, buffer id, flags) at the next slots
        as a driver would (each with its lap's AVAIL/USED bits when
        ``lap_bits``, the first one's flags last) without recording a
        chain: hostile rings for tests and the fuzzer."""
        slots, head_flags = self._write_chain(descs, lap_bits=lap_bits)
        if slots:
            self.memory.pack("<H", self.desc_gpa + DESC_SIZE * slots[0] + FLAGS_OFF, head_flags)

    def _write_chain(self, descs: list[tuple[int, int, int, int]], *,
                     lap_bits: bool = True) -> tuple[list[int], int]:
        """Write ``descs`` at the next slots, all but the head's flags (the
        write that makes the chain available, 2.8.21, left to the caller),
        and move past them; the slots taken and the head's flags."""
        slot, wrap = self.next_avail, self.avail_wrap
        slots: list[int] = []
        head_flags = 0
        for addr, length, buffer_id, flags in descs:
            if lap_bits:
                flags |= avail_flags(wrap)
            if not slots:
                head_flags = flags
                self.memory.pack("<QIH", self.desc_gpa + DESC_SIZE * slot, addr, length, buffer_id)
            else:
                self.write_desc(slot, addr, length, buffer_id, flags)
            slots.append(slot)
            slot += 1
            if slot == self.num:
                slot, wrap = 0, wrap ^ 1
        self.next_avail, self.avail_wrap = slot, wrap
        return slots, head_flags

    def read_desc(self, slot: int) -> tuple[int, int, int, int]:
        addr, length, buffer_id, flags = self.memory.unpack("<QIHH", self.desc_gpa + DESC_SIZE * slot)
        return addr, length, buffer_id, flags

    def read_device_event(self) -> tuple[int, int]:
        off_wrap, flags = self.memory.unpack("<HH", self.device_gpa)
        return int(off_wrap), int(flags)

    def _write_driver_event(self) -> None:
        if not self.callbacks:
            flags = EventFlags.DISABLE
        elif self.event_idx:
            self.memory.pack("<H", self.driver_gpa, self.last_used | self.used_wrap << WRAP_BIT)
            flags = EventFlags.DESC
        else:
            flags = EventFlags.ENABLE
        self.memory.pack("<H", self.driver_gpa + 2, int(flags))

    # ---------------------------------------------------------- adding buffers

    def _add(self, segments: list[Segment], indirect: bool, token: Any, publish: bool, owned: bool) -> int:
        slots = 1 if indirect else len(segments)
        if slots > self._free_slots or not self._ids:
            raise QueueFull(f"queue {self.index}: {slots} descriptors needed, {self._free_slots} free")
        buffer_id = self._ids.popleft()
        table: int | None = None
        if indirect:
            table = self.memory.alloc(DESC_SIZE * len(segments), DESC_SIZE)
            for i, seg in enumerate(segments):
                self.memory.pack("<QIHH", table + DESC_SIZE * i, seg.gpa, seg.length, 0,
                                 DescFlag.WRITE if seg.writable else 0)
            pieces = [(table, DESC_SIZE * len(segments), int(DescFlag.INDIRECT))]
        else:
            pieces = [(seg.gpa, seg.length, (DescFlag.WRITE if seg.writable else 0)
                       | (DescFlag.NEXT if i < len(segments) - 1 else 0)) for i, seg in enumerate(segments)]
        descs, head_flags = self._write_chain([(addr, length, buffer_id, flags) for addr, length, flags in pieces])
        self._free_slots -= len(descs)
        self._in_flight[buffer_id] = InFlight(buffer_id, descs, segments, table, owned, token)
        self._order.append(buffer_id)
        self.stats.added += 1
        self.num_added += len(descs)
        # The head's flags last: that makes the chain available (2.8.21).
        self._head_flags = (descs[0], head_flags)
        if publish:
            self.publish()
        return buffer_id

    def publish(self) -> None:
        """Write the last added chain's head flags (making it available)."""
        if self._head_flags is None:
            return
        head, flags = self._head_flags
        self.memory.pack("<H", self.desc_gpa + DESC_SIZE * head + FLAGS_OFF, flags)

    # ---------------------------------------------------------- notifications

    def kick_prepare(self) -> bool:
        """Linux virtqueue_kick_prepare_packed: does the device want a kick?"""
        added, self.num_added = self.num_added, 0
        off_wrap, flags = self.read_device_event()
        if flags != EventFlags.DESC or not self.event_idx:
            return flags != EventFlags.DISABLE
        if not added:
            return False
        # Positions modulo 2*num (slot + num in laps whose wrap counter is 0):
        # did the slots just made available cover the device's event slot?
        twice = 2 * self.num
        new = self.next_avail + (0 if self.avail_wrap else self.num)
        event = ((off_wrap & IDX_MASK) + (0 if off_wrap >> WRAP_BIT else self.num)) % twice
        return (new - event - 1) % twice < min(added, twice)

    def disable_callbacks(self) -> None:
        self.callbacks = False
        self._write_driver_event()

    def enable_callbacks(self) -> bool:
        """Re-enable callbacks; True when nothing is pending (False: used
        descriptors arrived meanwhile, poll again)."""
        self.callbacks = True
        self._write_driver_event()
        return not self._used_ready()

    # ---------------------------------------------------------- completions

    def _used_ready(self) -> bool:
        flags = int(self.memory.unpack("<H", self.desc_gpa + DESC_SIZE * self.last_used + FLAGS_OFF)[0])
        return bool(flags & AVAIL) == bool(self.used_wrap) and bool(flags & USED) == bool(self.used_wrap)

    def get_used(self) -> list[UsedElem]:
        """Collect every new used descriptor (Linux virtqueue_get_buf_ctx_packed).
        Raises UsedRingError on an impossible one (an id not in flight, a
        length beyond the buffer's writable bytes).  The length of a used
        descriptor without WRITE counts as 0 (2.8.5)."""
        out: list[UsedElem] = []
        while self._in_flight and self._used_ready():
            _, length, buffer_id, flags = PDESC.unpack(self.memory.read(self.desc_gpa + DESC_SIZE * self.last_used,
                                                                        DESC_SIZE))
            if not flags & DescFlag.WRITE:
                # 2.8.5: Element Length is reserved in a used descriptor
                # without WRITE and ignored by drivers (DPDK's net_vhost
                # leaves a transmit chain's length there).
                length = 0
            if buffer_id not in self._in_flight:
                raise UsedRingError(f"queue {self.index}: used id {buffer_id} at slot {self.last_used} "
                                    f"is not a buffer in flight")
            if self.in_order:
                while self._order[0] != buffer_id:  # skipped: completed before it (2.8.9)
                    out.append(self._complete(self._order[0], 0))
            out.append(self._complete(buffer_id, length))
        if out and self.callbacks and self.event_idx:
            self._write_driver_event()
        self.stats.completed += len(out)
        return out

    def _complete(self, buffer_id: int, length: int) -> UsedElem:
        chain = self._in_flight[buffer_id]
        elem = self._completed(chain, length)
        del self._in_flight[buffer_id]
        self._order.remove(buffer_id)
        self._ids.appendleft(buffer_id)
        self._free_slots += len(chain.descs)
        self.last_used += len(chain.descs)
        if self.last_used >= self.num:
            self.last_used -= self.num
            self.used_wrap ^= 1
        self._free_buffers(chain)
        return elem


__all__ = ["PackedDriverQueue", "avail_flags"]
