"""Pure-Python reference of ``native/vring.c`` (virtio 1.x split ring, spec 2.7).

Same state, same results, same error codes, same bytes written to guest
memory, in the same order; ``tests/test_ring_property.py`` checks that on
thousands of hostile rings.  The semantics (zero-length descriptors,
region spanning, segment space, sticky errors) are documented once, in
``native/vring.h``; read that first.

Where C has host pointers this module has memoryviews: the three ring
areas are views of exactly the layout's size, and a region is anything
with ``gpa``, ``size`` and ``view`` (a writable memoryview of ``size``
bytes), such as ``vuser.memory.Region``.  Python needs no fences: the GIL
and the interpreter's own memory accesses order everything.
"""

from __future__ import annotations

import struct
from typing import Protocol, Sequence

MAX_REGIONS = 64
MAX_QUEUE_SIZE = 32768
MAX_INDIRECT = 32768

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
SEG_WRITE = 1

# Error codes: identical to VU_ERR_* in native/vring.h.
ERR_AVAIL_IDX = -1
ERR_HEAD = -2
ERR_NEXT = -3
ERR_LOOP = -4
ERR_DESC_ADDR = -5
ERR_CHAIN_LEN = -6
ERR_INDIRECT_NEXT = -7
ERR_INDIRECT_NESTED = -8
ERR_INDIRECT_POS = -9
ERR_INDIRECT_LEN = -10
ERR_INDIRECT_ADDR = -11
ERR_ORDER = -12
ERR_CHAIN_SEGS = -13
ERR_NOT_READY = -20
ERR_NUM = -21
ERR_RING_SIZE = -22
ERR_PUSH_COUNT = -23
ERR_PUSH_ID = -24

ERROR_NAMES: dict[int, str] = {
    code: "VU_" + name for name, code in globals().items() if name.startswith("ERR_")
}

_U16 = struct.Struct("<H")
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U32_MAX = 0xFFFF_FFFF
_U64 = 1 << 64

# (head, first_seg, nsegs, nread, out_len, in_len) and (region, offset, len, flags)
ChainTuple = tuple[int, int, int, int, int, int]
SegTuple = tuple[int, int, int, int]


class RegionLike(Protocol):
    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def view(self) -> memoryview: ...


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event (virtio_ring.h): does moving the index from old to
    new pass event_idx?  All 16-bit arithmetic."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class _NoSpace(Exception):
    pass


class _ChainError(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _find_region(regions: Sequence[RegionLike], gpa: int) -> int:
    for i, r in enumerate(regions[:MAX_REGIONS]):
        if 0 <= gpa - r.gpa < r.size:
            return i
    return -1


class RefVring:
    """The fields of ``struct vu_vring`` and the functions on it."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
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

    # ------------------------------------------------------------ set-up

    def init(self, num: int, desc: memoryview, avail: memoryview, used: memoryview,
             event_idx: bool, last_avail_idx: int) -> int:
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            return ERR_NUM
        if len(desc) < 16 * num or len(avail) < 6 + 2 * num or len(used) < 6 + 8 * num:
            return ERR_RING_SIZE
        self._reset()
        self.num = num
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = _U16.unpack_from(used, 2)[0]
        self.signalled_used = self.used_idx
        self.event_idx = bool(event_idx)
        self.notification = True
        return 0

    # ------------------------------------------------------------ pop

    def pop(self, regions: Sequence[RegionLike], max_chains: int,
            max_segs: int) -> tuple[int, list[ChainTuple], list[SegTuple]]:
        """Returns (rc, chains, segs) exactly as vu_vring_pop fills them."""
        chains: list[ChainTuple] = []
        segs: list[SegTuple] = []
        if self.num == 0:
            return ERR_NOT_READY, chains, segs
        if self.broken:
            return self.error, chains, segs
        start = self.last_avail_idx
        rc = 0
        avail_idx = _U16.unpack_from(self.avail, 2)[0]
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        try:
            if pending > self.num:
                raise _ChainError(ERR_AVAIL_IDX)
            while pending > 0 and len(chains) < max_chains:
                slot = self.last_avail_idx & (self.num - 1)
                head = _U16.unpack_from(self.avail, 4 + 2 * slot)[0]
                if head >= self.num:
                    raise _ChainError(ERR_HEAD)
                try:
                    chain_segs, out_len, in_len = self._walk(regions, head, max_segs - len(segs))
                except _NoSpace:
                    if not chains:
                        raise _ChainError(ERR_CHAIN_SEGS) from None
                    break
                nread = sum(1 for seg in chain_segs if not seg[3])
                chains.append((head, len(segs), len(chain_segs), nread, out_len, in_len))
                segs.extend(chain_segs)
                self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
                pending -= 1
        except _ChainError as exc:
            rc = exc.code
            self.broken = True
            self.error = rc
        if self.last_avail_idx != start and self.event_idx and self.notification:
            _U16.pack_into(self.used, 4 + 8 * self.num, self.last_avail_idx)
        return rc, chains, segs

    def _walk(self, regions: Sequence[RegionLike], head: int,
              seg_room: int) -> tuple[list[SegTuple], int, int]:
        table = self.desc
        limit = self.num
        i = head
        visited = 0
        segs: list[SegTuple] = []
        out_len = in_len = 0
        indirect = seen_write = False
        while True:
            visited += 1
            if visited > limit:
                raise _ChainError(ERR_LOOP)
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * i)

            if flags & DESC_F_INDIRECT:
                if indirect:
                    raise _ChainError(ERR_INDIRECT_NESTED)
                if visited > 1:
                    raise _ChainError(ERR_INDIRECT_POS)
                if flags & DESC_F_NEXT:
                    raise _ChainError(ERR_INDIRECT_NEXT)
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                    raise _ChainError(ERR_INDIRECT_LEN)
                r = _find_region(regions, addr)
                if r < 0 or regions[r].size - (addr - regions[r].gpa) < length:
                    raise _ChainError(ERR_INDIRECT_ADDR)
                off = addr - regions[r].gpa
                table = regions[r].view[off:off + length]
                limit = length // 16
                i = 0
                visited = 0
                indirect = True
                continue

            if flags & DESC_F_WRITE:
                seen_write = True
                in_len += length
            else:
                if seen_write:
                    raise _ChainError(ERR_ORDER)
                out_len += length
            if out_len + in_len > _U32_MAX:
                raise _ChainError(ERR_CHAIN_LEN)

            if length:
                if addr + length > _U64:
                    raise _ChainError(ERR_DESC_ADDR)
                gpa, rem = addr, length
                seg_flags = SEG_WRITE if flags & DESC_F_WRITE else 0
                while rem:
                    r = _find_region(regions, gpa)
                    if r < 0:
                        raise _ChainError(ERR_DESC_ADDR)
                    off = gpa - regions[r].gpa
                    piece = min(regions[r].size - off, rem)
                    if len(segs) >= seg_room:
                        raise _NoSpace
                    segs.append((r, off, piece, seg_flags))
                    gpa += piece
                    rem -= piece

            if not flags & DESC_F_NEXT:
                return segs, out_len, in_len
            if nxt >= limit:
                raise _ChainError(ERR_NEXT)
            i = nxt

    # ------------------------------------------------------------ push / notify

    def push(self, elems: Sequence[tuple[int, int]]) -> int:
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
            _USED_ELEM.pack_into(self.used, 4 + 8 * ((old + k) & mask), head, written)
        new = (old + n) & 0xFFFF
        _U16.pack_into(self.used, 2, new)
        self.used_idx = new
        if _s16(new - self.signalled_used) < ((new - old) & 0xFFFF):
            self.signalled_used_valid = False
        return 0

    def need_notify(self) -> int:
        if self.num == 0:
            return ERR_NOT_READY
        if not self.event_idx:
            flags = _U16.unpack_from(self.avail, 0)[0]
            return int(not flags & AVAIL_F_NO_INTERRUPT)
        valid = self.signalled_used_valid
        old = self.signalled_used
        new = self.used_idx
        self.signalled_used_valid = True
        self.signalled_used = new
        used_event = _U16.unpack_from(self.avail, 4 + 2 * self.num)[0]
        return int(not valid or need_event(used_event, new, old))

    def set_notification(self, enable: bool) -> None:
        if self.num == 0:
            return
        self.notification = bool(enable)
        if self.event_idx:
            if enable:
                _U16.pack_into(self.used, 4 + 8 * self.num, self.last_avail_idx)
        else:
            flags = _U16.unpack_from(self.used, 0)[0]
            flags = flags & ~USED_F_NO_NOTIFY & 0xFFFF if enable else flags | USED_F_NO_NOTIFY
            _U16.pack_into(self.used, 0, flags)

    def avail_pending(self) -> int:
        if self.num == 0 or self.broken:
            return 0
        return int(_U16.unpack_from(self.avail, 2)[0] != self.last_avail_idx)


def _s16(v: int) -> int:
    v &= 0xFFFF
    return v - 0x10000 if v & 0x8000 else v
