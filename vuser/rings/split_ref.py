"""Pure-Python reference of ``native/vring.c`` (virtio 1.x split ring, spec 2.7).

Same state, same results, same error codes, same bytes written to guest
memory, in the same order; ``tests/test_ring_property.py`` checks that on
thousands of hostile rings.  The semantics (zero-length descriptors,
region spanning, segment space, sticky errors) are documented once, in
``native/vring.h``; read that first.

Where C has host pointers this module has memoryviews: the three ring
areas are views of exactly the layout's size, and a region is anything
with ``gpa``, ``size`` and ``view`` (``base.RegionLike``).  Python needs no
fences: the GIL and the interpreter's own memory accesses order everything.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Sequence

from ..virtio import AvailFlag, DescFlag, UsedFlag
from .base import (
    MAX_QUEUE_SIZE,
    DirtyLogTarget,
    NO_BYTE_LIMIT,
    ChainTuple,
    PopResult,
    RegionLike,
    RingMemory,
    SegTuple,
)
from .chain_ref import DESC_SIZE, U16, U32_MAX, ChainError, NoSpace, Walk, areas_fit, indirect_table, rebind_check
from .errors import (
    ERR_AVAIL_IDX,
    ERR_CHAIN_SEGS,
    ERR_HEAD,
    ERR_INDIRECT_NESTED,
    ERR_INDIRECT_NEXT,
    ERR_INDIRECT_POS,
    ERR_LOOP,
    ERR_NEXT,
    ERR_NOT_READY,
    ERR_NUM,
    ERR_PUSH_COUNT,
    ERR_PUSH_ID,
    ERR_RING_SIZE,
)

DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

# Byte offsets in the split layout (spec 2.7): avail->ring[0] and
# used->ring[0] both sit after a 4-byte header.
RING_HDR = 4
USED_ELEM_SIZE = 8
U64_MASK = (1 << 64) - 1


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event (virtio_ring.h): does moving the index from old to
    new pass event_idx?  All 16-bit arithmetic."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def split_area_sizes(num: int) -> tuple[int, int, int]:
    """Descriptor table, avail ring (with used_event), used ring (with
    avail_event) for a queue of ``num`` entries."""
    return DESC_SIZE * num, RING_HDR + 2 + 2 * num, RING_HDR + 2 + USED_ELEM_SIZE * num


class PySplitRing:
    """The fields of ``struct vu_vring`` and the functions on it, as a
    ``vuser.rings.base.Ring``."""

    layout: ClassVar[str] = "split"
    impl: ClassVar[str] = "python"
    native: Any = None
    STATE: ClassVar[tuple[str, ...]] = (
        "last_avail_idx", "used_idx", "signalled_used", "signalled_used_valid",
        "notification", "broken", "error", "popped")

    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        return split_area_sizes(num)

    @staticmethod
    def num_ok(num: int) -> bool:
        return 1 <= num <= MAX_QUEUE_SIZE and not num & (num - 1)  # a power of 2 (2.7)

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.num = 0
        self.desc = self.avail = self.used = memoryview(b"")
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.event_idx = False
        self.notification = False
        self.broken = False
        self.error = 0
        self.popped = 0
        self.set_log(None, 0, 0)

    # ------------------------------------------------------------ set-up

    def init(self, num: int, areas: Sequence[memoryview], event_idx: bool, base: int,
             in_order: bool = False) -> int:
        desc, avail, used = areas
        if not self.num_ok(num):
            return ERR_NUM
        if not areas_fit(areas, split_area_sizes(num)):
            return ERR_RING_SIZE
        self.clear()
        self.num = num
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail_idx = base & 0xFFFF
        self.used_idx = U16.unpack_from(used, 2)[0]
        self.signalled_used = self.used_idx
        self.event_idx = bool(event_idx)
        self.notification = True
        return 0

    def set_log(self, log: DirtyLogTarget | None, used_gpa: int, desc_gpa: int) -> None:
        self._dirty_log, self._dirty_used = log, used_gpa

    def _dirty(self, off: int, length: int) -> None:
        """Mark bytes [off, off + length) of the used ring (vring.h, "Dirty logging")."""
        if self._dirty_log is not None:
            self._dirty_log.write((self._dirty_used + off) & U64_MASK, length)

    def _write_avail_event(self) -> None:
        off = RING_HDR + USED_ELEM_SIZE * self.num
        U16.pack_into(self.used, off, self.last_avail_idx)
        self._dirty(off, 2)

    def rebind(self, areas: Sequence[memoryview]) -> int:
        rc = rebind_check(self.num, areas, split_area_sizes(self.num))
        if not rc:
            self.desc, self.avail, self.used = areas
        return rc

    def base(self) -> int:
        return self.last_avail_idx

    def snapshot(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self.STATE}

    def unpop(self, n: int) -> int:
        if self.num == 0:
            return ERR_NOT_READY
        if not n or self.broken:  # a broken ring is never read again
            return 0
        self.last_avail_idx = (self.last_avail_idx - n) & 0xFFFF
        self.popped = (self.popped - n) & 0xFFFF_FFFF
        if self.event_idx and self.notification:
            self._write_avail_event()
        return 0

    # ------------------------------------------------------------ pop

    def pop(self, memory: RingMemory, max_chains: int, max_segs: int,
            max_bytes: int = NO_BYTE_LIMIT) -> PopResult:
        """Returns (rc, chains, segs) exactly as vu_vring_pop fills them."""
        regions = memory.regions
        chains: list[ChainTuple] = []
        segs: list[SegTuple] = []
        if self.num == 0:
            return ERR_NOT_READY, chains, segs
        if self.broken:
            return self.error, chains, segs
        start = self.last_avail_idx
        rc = 0
        taken = 0
        avail_idx = U16.unpack_from(self.avail, 2)[0]
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        try:
            if pending > self.num:
                raise ChainError(ERR_AVAIL_IDX)
            while pending > 0 and len(chains) < max_chains:
                slot = self.last_avail_idx & (self.num - 1)
                head = U16.unpack_from(self.avail, RING_HDR + 2 * slot)[0]
                if head >= self.num:
                    raise ChainError(ERR_HEAD)
                try:
                    chain_segs, out_len, in_len, ndescs = self._walk(regions, head, max_segs - len(segs))
                except NoSpace:
                    if not chains:
                        raise ChainError(ERR_CHAIN_SEGS) from None
                    break
                if chains and taken + out_len + in_len > max_bytes:
                    break  # over the byte budget: not consumed
                taken += out_len + in_len
                nread = sum(1 for seg in chain_segs if not seg[3])
                chains.append((len(segs), len(chain_segs), nread, out_len, in_len, head, ndescs))
                segs.extend(chain_segs)
                self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
                pending -= 1
        except ChainError as exc:
            rc = exc.code
            self.broken = True
            self.error = rc
        if self.last_avail_idx != start and self.event_idx and self.notification:
            self._write_avail_event()
        self.popped = (self.popped + len(chains)) & 0xFFFF_FFFF
        return rc, chains, segs

    def _walk(self, regions: Sequence[RegionLike], head: int,
              seg_room: int) -> tuple[list[SegTuple], int, int, int]:
        table = self.desc
        limit = self.num
        i = head
        visited = 0
        walk = Walk(seg_room)
        indirect = False
        while True:
            visited += 1
            if visited > limit:
                raise ChainError(ERR_LOOP)
            addr, length, flags, nxt = DESC.unpack_from(table, DESC_SIZE * i)

            if flags & DescFlag.INDIRECT:
                if indirect:
                    raise ChainError(ERR_INDIRECT_NESTED)
                if visited > 1:
                    raise ChainError(ERR_INDIRECT_POS)
                if flags & DescFlag.NEXT:
                    raise ChainError(ERR_INDIRECT_NEXT)
                table = indirect_table(regions, addr, length)
                limit = length // DESC_SIZE
                i = 0
                visited = 0
                indirect = True
                continue

            walk.buffer(regions, addr, length, bool(flags & DescFlag.WRITE))
            if not flags & DescFlag.NEXT:
                return walk.segs, walk.out_len, walk.in_len, walk.total
            if nxt >= limit:
                raise ChainError(ERR_NEXT)
            i = nxt

    # ------------------------------------------------------------ push / notify

    def push(self, elems: Sequence[tuple[int, int]]) -> int:
        if any(not 0 <= e[0] <= U32_MAX or not 0 <= e[1] <= U32_MAX for e in elems):
            raise ValueError(f"used elements out of range: {list(elems)!r}")
        if self.num == 0:
            return ERR_NOT_READY
        n = len(elems)
        if n > self.num:
            return ERR_PUSH_COUNT
        if any(not 0 <= e[0] < self.num for e in elems):
            return ERR_PUSH_ID
        if n == 0:
            return 0
        old = self.used_idx
        mask = self.num - 1
        for k, (head, written) in enumerate(elems):
            _USED_ELEM.pack_into(self.used, RING_HDR + USED_ELEM_SIZE * ((old + k) & mask), head, written)
        new = (old + n) & 0xFFFF
        U16.pack_into(self.used, 2, new)
        self.used_idx = new
        if self._dirty_log is not None:  # the elements (wrapping at most once), the index
            slot = old & mask
            first = min(n, self.num - slot)
            self._dirty(RING_HDR + USED_ELEM_SIZE * slot, USED_ELEM_SIZE * first)
            self._dirty(RING_HDR, USED_ELEM_SIZE * (n - first))
            self._dirty(2, 2)
        if _s16(new - self.signalled_used) < ((new - old) & 0xFFFF):
            self.signalled_used_valid = False
        return 0

    def need_notify(self) -> int:
        if self.num == 0:
            return ERR_NOT_READY
        if not self.event_idx:
            flags = U16.unpack_from(self.avail, 0)[0]
            return int(not flags & AvailFlag.NO_INTERRUPT)
        valid = self.signalled_used_valid
        old = self.signalled_used
        new = self.used_idx
        self.signalled_used_valid = True
        self.signalled_used = new
        used_event = U16.unpack_from(self.avail, RING_HDR + 2 * self.num)[0]
        return int(not valid or need_event(used_event, new, old))

    def set_notification(self, enable: bool) -> None:
        if self.num == 0:
            return
        self.notification = bool(enable)
        if self.event_idx:
            if enable:
                self._write_avail_event()
        else:
            flags = U16.unpack_from(self.used, 0)[0]
            flags = flags & ~int(UsedFlag.NO_NOTIFY) & 0xFFFF if enable else flags | UsedFlag.NO_NOTIFY
            U16.pack_into(self.used, 0, flags)
            self._dirty(0, 2)

    def avail_pending(self) -> int:
        if self.num == 0 or self.broken:
            return 0
        return int(U16.unpack_from(self.avail, 2)[0] != self.last_avail_idx)


def _s16(v: int) -> int:
    v &= 0xFFFF
    return v - 0x10000 if v & 0x8000 else v
