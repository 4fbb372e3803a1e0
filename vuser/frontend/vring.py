"""Driver side of a split virtqueue (virtio 1.x, section 2.7), in guest memory.

This is what a guest driver does with a ring, following Linux's
drivers/virtio/virtio_ring.c: chains are built from a LIFO free list of
descriptors (so a long-running queue hands the device non-contiguous,
reused chains), the avail index is published after every add, a kick is
sent only when the device asks for one (VIRTIO_F_EVENT_IDX: ``avail_event``
in the used ring; otherwise UsedFlag.NO_NOTIFY), and ``used_event`` is
kept up to date while callbacks are enabled.

Layout (contiguous, like Linux's ``vring_init``)::

    desc[num]      16 bytes each: addr u64, len u32, flags u16, next u16
    avail          flags u16, idx u16, ring[num] u16, used_event u16
    (pad to ``align``)
    used           flags u16, idx u16, ring[num] {id u32, len u32}, avail_event u16

All fields are little-endian (VERSION_1; legacy x86 guests agree).  Ordering
between the ring writes and the index store needs no barrier here: CPython
stores to the shared mapping in program order and x86/arm64 back-ends read
the index with acquire semantics.

What does not depend on the layout (buffers, eventfds, waiting) is
``queue.DriverQueueBase``; the packed ring's driver side is packed.py.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from vuser.frontend.memory import GuestRam
from vuser.frontend.queue import (
    DriverQueueBase,
    InFlight,
    QueueFull,
    QueueStats,
    QueueTimeout,
    Segment,
    UsedElem,
    UsedRingError,
)
from vuser.rings.base import MAX_QUEUE_SIZE
from vuser.rings.chain_ref import DESC_SIZE
from vuser.rings.split_ref import USED_ELEM_SIZE
from vuser.rings.split_ref import need_event as vring_need_event
from vuser.virtio import AvailFlag, DescFlag, UsedFlag
# Linux's legacy PCI alignment; modern transports accept smaller ones.
LEGACY_ALIGN = 4096


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


@dataclass(frozen=True)
class SplitLayout:
    """Byte offsets of a split ring of ``num`` entries (virtio 2.7, Linux vring_init)."""

    num: int
    align: int = LEGACY_ALIGN

    desc_offset = 0

    @property
    def desc_size(self) -> int:
        return DESC_SIZE * self.num

    @property
    def avail_offset(self) -> int:
        return self.desc_size

    @property
    def avail_size(self) -> int:
        return 6 + 2 * self.num  # flags, idx, ring[num], used_event

    @property
    def used_offset(self) -> int:
        return _align_up(self.avail_offset + self.avail_size, self.align)

    @property
    def used_size(self) -> int:
        return 6 + USED_ELEM_SIZE * self.num  # flags, idx, ring[num], avail_event

    @property
    def size(self) -> int:
        return self.used_offset + self.used_size

    # offsets inside the avail / used structures
    AVAIL_FLAGS = 0
    AVAIL_IDX = 2
    USED_FLAGS = 0
    USED_IDX = 2

    @staticmethod
    def avail_entry(i: int) -> int:
        return 4 + 2 * i

    @property
    def used_event(self) -> int:
        return 4 + 2 * self.num

    @staticmethod
    def used_entry(i: int) -> int:
        return 4 + USED_ELEM_SIZE * i

    @property
    def avail_event(self) -> int:
        return 4 + USED_ELEM_SIZE * self.num


class DriverQueue(DriverQueueBase):
    """The driver's half of one split virtqueue; see the module docstring.

    ``event_idx`` and ``indirect`` say whether the driver uses those
    features (normally: whether they were negotiated; the harness allows
    turning them on regardless, as QEMU 7.2's vhost-user-rng does).
    """

    ring_layout = "split"

    def __init__(self, memory: GuestRam, index: int, num: int, *, align: int = LEGACY_ALIGN,
                 region: int | None = None, event_idx: bool = False, indirect: bool = False,
                 callbacks: bool = True, check_size: bool = True) -> None:
        if check_size and not (1 <= num <= MAX_QUEUE_SIZE and num & (num - 1) == 0):
            raise ValueError(f"queue size {num} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
        super().__init__(memory, index, num, event_idx=event_idx, indirect=indirect)
        self.layout = SplitLayout(num, align)
        self.base = memory.alloc(self.layout.size, max(align, DESC_SIZE),
                                 region=memory.largest_region() if region is None else region)
        memory.fill(self.base, self.layout.size)
        self.desc_gpa = self.base + self.layout.desc_offset
        self.avail_gpa = self.base + self.layout.avail_offset
        self.used_gpa = self.base + self.layout.used_offset
        self.avail_idx = 0        # shadow of avail->idx
        self.last_used_idx = 0    # next used entry to read
        self.num_added = 0        # added since the last kick decision
        self.avail_flags = 0 if callbacks else int(AvailFlag.NO_INTERRUPT)
        self._free: collections.deque[int] = collections.deque(range(num))
        if not callbacks and not event_idx:
            self._write_avail_flags()

    # ---------------------------------------------------------- addresses

    @property
    def num_free(self) -> int:
        return len(self._free)

    def addresses(self) -> tuple[int, int, int]:
        """(desc, avail, used) guest-physical addresses."""
        return self.desc_gpa, self.avail_gpa, self.used_gpa

    def describe(self) -> str:
        return f"avail idx {self.avail_idx}, used idx {self.read_used_idx()}"

    # ---------------------------------------------------------- raw ring access

    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int = 0) -> None:
        self.memory.pack("<QIHH", self.desc_gpa + DESC_SIZE * (i % self.num), addr, length, flags, next_)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        addr, length, flags, nxt = self.memory.unpack("<QIHH", self.desc_gpa + DESC_SIZE * i)
        return addr, length, flags, nxt

    def push_avail(self, head: int, *, publish: bool = True) -> None:
        """Put ``head`` in the next avail slot (raw: no bookkeeping of the chain)."""
        slot = self.avail_idx % self.num
        self.memory.pack("<H", self.avail_gpa + self.layout.avail_entry(slot), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.num_added += 1
        if publish:
            self.publish()

    def publish(self) -> None:
        """Store the shadow avail index into avail->idx."""
        self.memory.pack("<H", self.avail_gpa + SplitLayout.AVAIL_IDX, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write any avail->idx (hostile tests: jumps larger than the ring)."""
        self.avail_idx = value & 0xFFFF
        self.publish()

    def read_used_idx(self) -> int:
        return int(self.memory.unpack("<H", self.used_gpa + SplitLayout.USED_IDX)[0])

    def read_used_flags(self) -> int:
        return int(self.memory.unpack("<H", self.used_gpa + SplitLayout.USED_FLAGS)[0])

    def read_avail_event(self) -> int:
        return int(self.memory.unpack("<H", self.used_gpa + self.layout.avail_event)[0])

    def read_used_event(self) -> int:
        return int(self.memory.unpack("<H", self.avail_gpa + self.layout.used_event)[0])

    def _write_used_event(self, value: int) -> None:
        self.memory.pack("<H", self.avail_gpa + self.layout.used_event, value & 0xFFFF)

    def set_used_event(self, value: int) -> None:
        """With EVENT_IDX: ask for a call when the used index passes
        ``value`` (2.7.10) and stop ``get_used`` from moving it (callbacks
        stay off until ``enable_callbacks``)."""
        self.avail_flags |= int(AvailFlag.NO_INTERRUPT)
        self._write_used_event(value)

    def resume_at(self, index: int) -> None:
        """Put an idle ring at avail and used index ``index``, as a ring
        that has already carried that many chains (the SET_VRING_BASE to
        send is then ``index``; index wrap tests start near 0xFFFF)."""
        if self._in_flight:
            raise ValueError(f"queue {self.index}: {len(self._in_flight)} chains in flight")
        self.avail_idx = self.last_used_idx = index & 0xFFFF
        self.publish()
        self.memory.pack("<H", self.used_gpa + SplitLayout.USED_IDX, self.avail_idx)
        if self.event_idx:
            self._write_used_event(self.avail_idx)

    def _write_avail_flags(self) -> None:
        self.memory.pack("<H", self.avail_gpa + SplitLayout.AVAIL_FLAGS, self.avail_flags)

    # ---------------------------------------------------------- adding buffers

    def _add(self, segments: list[Segment], indirect: bool, token: Any, publish: bool,
             owned: bool) -> int:
        table: int | None = None
        if indirect:
            if not self._free:
                raise QueueFull(f"queue {self.index}: no free descriptor for an indirect table")
            table = self.memory.alloc(DESC_SIZE * len(segments), DESC_SIZE)
            for i, seg in enumerate(segments):
                last = i == len(segments) - 1
                flags = (DescFlag.WRITE if seg.writable else 0) | (0 if last else DescFlag.NEXT)
                self.memory.pack("<QIHH", table + DESC_SIZE * i, seg.gpa, seg.length, flags,
                                 0 if last else i + 1)
            head = self._free.popleft()
            self.write_desc(head, table, DESC_SIZE * len(segments), DescFlag.INDIRECT)
            descs = [head]
        else:
            if len(segments) > len(self._free):
                raise QueueFull(f"queue {self.index}: {len(segments)} descriptors needed, "
                                f"{len(self._free)} free")
            descs = [self._free.popleft() for _ in segments]
            for i, seg in enumerate(segments):
                last = i == len(segments) - 1
                flags = (DescFlag.WRITE if seg.writable else 0) | (0 if last else DescFlag.NEXT)
                self.write_desc(descs[i], seg.gpa, seg.length, flags, 0 if last else descs[i + 1])
            head = descs[0]
        self._in_flight[head] = InFlight(head, descs, segments, table, owned, token)
        self.stats.added += 1
        self.push_avail(head, publish=publish)
        return head

    # ---------------------------------------------------------- notifications

    def kick_prepare(self) -> bool:
        """Linux virtqueue_kick_prepare_split: does the device want a kick?"""
        new = self.avail_idx
        old = (new - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            return vring_need_event(self.read_avail_event(), new, old)
        return not self.read_used_flags() & UsedFlag.NO_NOTIFY

    def disable_callbacks(self) -> None:
        """Linux virtqueue_disable_cb_split."""
        if not self.avail_flags & AvailFlag.NO_INTERRUPT:
            self.avail_flags |= int(AvailFlag.NO_INTERRUPT)
            if self.event_idx:
                # Linux writes 0 here too ("a hack"): far from last_used in
                # most states, so the device rarely signals.
                self._write_used_event(0)
            else:
                self._write_avail_flags()

    def enable_callbacks(self) -> bool:
        """Linux virtqueue_enable_cb: re-enable and return True when nothing
        is pending (False: used entries arrived meanwhile, poll again)."""
        if self.avail_flags & AvailFlag.NO_INTERRUPT:
            self.avail_flags &= ~int(AvailFlag.NO_INTERRUPT)
            if not self.event_idx:
                self._write_avail_flags()
        self._write_used_event(self.last_used_idx)
        return self.read_used_idx() == self.last_used_idx

    # ---------------------------------------------------------- completions

    def get_used(self) -> list[UsedElem]:
        """Collect every new used element (Linux virtqueue_get_buf), freeing
        descriptors and harness-allocated buffers.  Raises UsedRingError on
        an impossible used ring (ids not in flight, lengths too long, an
        index that moved by more than the queue size)."""
        used_idx = self.read_used_idx()
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending > self.num:
            raise UsedRingError(f"queue {self.index}: used idx moved from {self.last_used_idx} "
                                f"to {used_idx}, more than the queue size {self.num}")
        out: list[UsedElem] = []
        for _ in range(pending):
            slot = self.last_used_idx % self.num
            head, length = self.memory.unpack("<II", self.used_gpa + self.layout.used_entry(slot))
            chain = self._in_flight.pop(head, None) if head < self.num else None
            if chain is None:
                raise UsedRingError(f"queue {self.index}: used id {head} at used idx "
                                    f"{self.last_used_idx} is not the head of a chain in flight")
            try:
                out.append(self._completed(chain, length))
            except UsedRingError:
                self._in_flight[head] = chain
                raise
            self._detach(chain)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if out and not self.avail_flags & AvailFlag.NO_INTERRUPT and self.event_idx:
            self._write_used_event(self.last_used_idx)
        self.stats.completed += len(out)
        return out

    def _detach(self, chain: InFlight) -> None:
        # Linux detach_buf_split puts the freed chain at the head of the
        # free list, so the next chain reuses these descriptors first.
        self._free.extendleft(reversed(chain.descs))
        self._free_buffers(chain)


__all__ = [
    "DESC_SIZE", "DriverQueue", "QueueFull", "QueueStats", "QueueTimeout", "Segment",
    "SplitLayout", "UsedElem", "UsedRingError", "vring_need_event",
]
