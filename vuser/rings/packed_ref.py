"""Pure-Python reference of ``native/vring_packed.c`` (virtio 1.x packed
ring, spec 2.8).

Same state, same results, same error codes, same bytes written to guest
memory in the same order; ``tests/test_packed_property.py`` checks that on
thousands of hostile rings.  The semantics (wrap counters, buffer ids,
indirect tables, batched used descriptors, in-order completion, event
suppression, the vhost-user base encoding) are documented once, in
``native/vring.h``; read that first.

Positions: a slot in 0..num-1 and a wrap counter that flips each time the
slot passes the end; counted modulo 2*num, position = slot + (0 if wrap
else num) (the wrap counter starts at 1).
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Sequence

from ..virtio import DescFlag, EventFlags
from .base import (
    MAX_QUEUE_SIZE,
    NO_BYTE_LIMIT,
    ChainTuple,
    DirtyLogTarget,
    PopResult,
    RegionLike,
    RingMemory,
    SegTuple,
)
from .errors import (
    ERR_BASE,
    ERR_CHAIN_SEGS,
    ERR_ID,
    ERR_ID_IN_FLIGHT,
    ERR_INDIRECT_NESTED,
    ERR_INDIRECT_NEXT,
    ERR_INDIRECT_POS,
    ERR_LOOP,
    ERR_NOT_READY,
    ERR_NUM,
    ERR_PUSH_COUNT,
    ERR_PUSH_ID,
    ERR_PUSH_ORDER,
    ERR_RING_SIZE,
    ERR_UNPOP,
    ERR_WRAP,
)
from .chain_ref import DESC_SIZE, U16, U32_MAX, ChainError, NoSpace, Walk, areas_fit, indirect_table, rebind_check

PDESC = struct.Struct("<QIHH")   # struct pvirtq_desc: addr, len, id, flags
_LEN_ID = struct.Struct("<IH")   # len, id: written together before the flags
FLAGS_OFF = 14
LEN_OFF = 8
EVENT_SIZE = 4                   # struct pvirtq_event_suppress: off_wrap, flags
EVENT_FLAGS_OFF = 2
WRAP_BIT = 15
IDX_MASK = 0x7FFF
U64_MASK = (1 << 64) - 1
EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC = int(EventFlags.ENABLE), int(EventFlags.DISABLE), int(EventFlags.DESC)
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


def packed_area_sizes(num: int) -> tuple[int, int, int]:
    """Descriptor ring, driver and device event suppression structures."""
    return DESC_SIZE * num, EVENT_SIZE, EVENT_SIZE


def packed_base(last_avail: int, avail_wrap: int, used: int, used_wrap: int) -> int:
    """GET_VRING_BASE's packed encoding (vhost-user.rst)."""
    return (last_avail | avail_wrap << WRAP_BIT) | (used | used_wrap << WRAP_BIT) << 16


def is_avail(flags: int, wrap: int) -> bool:
    return bool(flags & AVAIL) == bool(wrap) and bool(flags & USED) != bool(wrap)


def used_flags(wrap: int) -> int:
    return AVAIL | USED if wrap else 0


class PyPackedRing:
    """The packed fields of ``struct vu_vring`` and the vring_packed.c
    functions on them, as a ``vuser.rings.base.Ring``."""

    layout: ClassVar[str] = "packed"
    impl: ClassVar[str] = "python"
    native: Any = None
    STATE: ClassVar[tuple[str, ...]] = (
        "last_avail_idx", "used_idx", "avail_wrap", "used_wrap", "signalled_used_valid", "notification",
        "broken", "error", "log_start", "log_end", "inflight", "unsignalled", "event_written", "popped")

    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        return packed_area_sizes(num)

    @staticmethod
    def num_ok(num: int) -> bool:
        return 1 <= num <= MAX_QUEUE_SIZE  # no power of 2 needed (2.6)

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.num = 0
        self.desc = self.driver = self.device = memoryview(b"")
        self.ids: list[int] = []
        self.last_avail_idx = self.used_idx = 0
        self.avail_wrap = self.used_wrap = 0
        self.signalled_used_valid = False
        self.event_idx = self.in_order = False
        self.notification = False
        self.broken = False
        self.error = 0
        self.log_start = self.log_end = self.inflight = self.unsignalled = 0
        self.event_written = 0
        self.popped = 0
        self.set_log(None, 0, 0)

    # ------------------------------------------------------------ set-up

    def init(self, num: int, areas: Sequence[memoryview], event_idx: bool, base: int,
             in_order: bool = False) -> int:
        if not self.num_ok(num):
            return ERR_NUM
        if not areas_fit(areas, packed_area_sizes(num)):
            return ERR_RING_SIZE
        avail, used = base & 0xFFFF, base >> 16 & 0xFFFF
        if used == 0:  # only the avail half was sent (vring.h)
            used = avail
        self.clear()
        if (avail & IDX_MASK) >= num or (used & IDX_MASK) >= num:
            return ERR_BASE
        self.num = num
        self.desc, self.driver, self.device = areas
        self.event_idx, self.in_order = bool(event_idx), bool(in_order)
        self.notification = True
        self.last_avail_idx, self.avail_wrap = avail & IDX_MASK, avail >> WRAP_BIT
        self.used_idx, self.used_wrap = used & IDX_MASK, used >> WRAP_BIT
        self.ids = [0] * (2 * num)
        return 0

    def rebind(self, areas: Sequence[memoryview]) -> int:
        rc = rebind_check(self.num, areas, packed_area_sizes(self.num))
        if not rc:
            self.desc, self.driver, self.device = areas
        return rc

    def base(self) -> int:
        return packed_base(self.last_avail_idx, self.avail_wrap, self.used_idx, self.used_wrap)

    def snapshot(self) -> dict[str, int]:
        state = {k: int(getattr(self, k)) for k in self.STATE}
        state.update((f"ids[{i}]", v) for i, v in enumerate(self.ids))
        return state

    # ------------------------------------------------------------ helpers

    def _advance(self, slot: int, wrap: int, n: int) -> tuple[int, int]:
        slot += n
        if slot >= self.num:
            slot -= self.num
            wrap ^= 1
        return slot, wrap

    def _log(self, k: int) -> int:
        return self.num + k % self.num

    def set_log(self, log: DirtyLogTarget | None, used_gpa: int, desc_gpa: int) -> None:
        self._dirty_log, self._dirty_used, self._dirty_desc = log, used_gpa, desc_gpa

    def _dirty(self, base: int, off: int, length: int) -> None:
        """Mark [off, off + length) of the area at ``base`` (vring.h, "Dirty logging")."""
        if self._dirty_log is not None:
            self._dirty_log.write((base + off) & U64_MASK, length)

    def _write_event(self) -> None:
        self.event_written = self.last_avail_idx | self.avail_wrap << WRAP_BIT
        U16.pack_into(self.device, 0, self.event_written)
        self._dirty(self._dirty_used, 0, 2)

    def _write_event_flags(self, flags: int) -> None:
        U16.pack_into(self.device, EVENT_FLAGS_OFF, flags)
        self._dirty(self._dirty_used, EVENT_FLAGS_OFF, 2)

    def _flags_at(self, slot: int) -> int:
        return int(U16.unpack_from(self.desc, DESC_SIZE * slot + FLAGS_OFF)[0])

    # ------------------------------------------------------------ pop

    def pop(self, memory: RingMemory, max_chains: int, max_segs: int,
            max_bytes: int = NO_BYTE_LIMIT) -> PopResult:
        regions = memory.regions
        chains: list[ChainTuple] = []
        segs: list[SegTuple] = []
        if self.num == 0:
            return ERR_NOT_READY, chains, segs
        if self.broken:
            return self.error, chains, segs
        rc = 0
        taken = 0
        try:
            while len(chains) < max_chains:
                if not is_avail(self._flags_at(self.last_avail_idx), self.avail_wrap):
                    break
                try:
                    chain_segs, out_len, in_len, ndescs, bid, slots = self._walk(regions, max_segs - len(segs))
                except NoSpace:
                    if not chains:
                        raise ChainError(ERR_CHAIN_SEGS) from None
                    break
                if max_bytes != NO_BYTE_LIMIT:
                    if chains and taken + out_len + in_len > max_bytes:
                        break  # over the byte budget: not consumed
                    taken += out_len + in_len
                self.ids[bid] = slots
                self.ids[self._log(self.log_end)] = bid
                self.log_end = (self.log_end + 1) % self.num
                self.inflight += 1
                self.last_avail_idx, self.avail_wrap = self._advance(self.last_avail_idx, self.avail_wrap, slots)
                nread = sum(1 for seg in chain_segs if not seg[3])
                chains.append((len(segs), len(chain_segs), nread, out_len, in_len, bid, ndescs))
                segs.extend(chain_segs)
        except ChainError as exc:
            rc = exc.code
            self.broken = True
            self.error = rc
        if chains and self.event_idx and self.notification:
            self._write_event()
        self.popped = (self.popped + len(chains)) & 0xFFFF_FFFF
        return rc, chains, segs

    def _walk(self, regions: Sequence[RegionLike],
              seg_room: int) -> tuple[list[SegTuple], int, int, int, int, int]:
        """(segments, out_len, in_len, ndescs, buffer id, slots taken)."""
        i, wrap, n = self.last_avail_idx, self.avail_wrap, 0
        walk = Walk(seg_room)
        while True:
            n += 1
            if n > self.num:
                raise ChainError(ERR_LOOP)
            addr, length, bid, flags = PDESC.unpack_from(self.desc, DESC_SIZE * i)
            if n > 1 and not is_avail(flags, wrap):
                raise ChainError(ERR_WRAP)
            if flags & INDIRECT:
                if n > 1:
                    raise ChainError(ERR_INDIRECT_POS)
                if flags & NEXT:
                    raise ChainError(ERR_INDIRECT_NEXT)
                table = indirect_table(regions, addr, length)
                for k in range(len(table) // DESC_SIZE):
                    t_addr, t_len, _, t_flags = PDESC.unpack_from(table, DESC_SIZE * k)
                    if t_flags & INDIRECT:
                        raise ChainError(ERR_INDIRECT_NESTED)
                    walk.buffer(regions, t_addr, t_len, bool(t_flags & WRITE))
                break
            walk.buffer(regions, addr, length, bool(flags & WRITE))
            if not flags & NEXT:
                break
            i += 1
            if i == self.num:
                i, wrap = 0, wrap ^ 1
        # The buffer id is the last descriptor's (2.8.6).
        if bid >= self.num:
            raise ChainError(ERR_ID)
        if self.ids[bid]:
            raise ChainError(ERR_ID_IN_FLIGHT)
        return walk.segs, walk.out_len, walk.in_len, walk.total, bid, n

    # ------------------------------------------------------------ push / notify

    def _check_push(self, elems: Sequence[tuple[int, int]]) -> int:
        if self.in_order:  # the oldest in pop order: distinct by construction
            for k, (bid, _) in enumerate(elems):
                if bid >= self.num or not self.ids[bid]:
                    return ERR_PUSH_ID
                if k >= self.inflight or self.ids[self._log(self.log_start + k)] != bid:
                    return ERR_PUSH_ORDER
            return 0
        seen: set[int] = set()
        for bid, _ in elems:
            if bid >= self.num or not self.ids[bid] or bid in seen:
                return ERR_PUSH_ID
            seen.add(bid)
        return 0

    def _dirty_span(self, start: int, total: int) -> None:
        """The slots a push moved over, from the first used descriptor's
        len: one range, or two when they wrap (vring_packed.c)."""
        first = min(self.num - start, total)
        self._dirty(self._dirty_desc, DESC_SIZE * start + LEN_OFF, DESC_SIZE * first - LEN_OFF)
        if total > first:
            self._dirty(self._dirty_desc, 0, DESC_SIZE * (total - first))

    def _coalesced(self, elems: Sequence[tuple[int, int]], k: int) -> bool:
        return self.in_order and k + 1 < len(elems) and elems[k][1] == 0 and elems[k + 1][1] == 0

    def push(self, elems: Sequence[tuple[int, int]]) -> int:
        if any(not 0 <= e[0] <= U32_MAX or not 0 <= e[1] <= U32_MAX for e in elems):
            raise ValueError(f"used elements out of range: {list(elems)!r}")
        if self.num == 0:
            return ERR_NOT_READY
        n = len(elems)
        if n > self.num:
            return ERR_PUSH_COUNT
        rc = self._check_push(elems)
        if rc or n == 0:
            return rc
        # Each used descriptor where its run of buffers starts: id, length,
        # flags; the first one's flags last (vring_packed.c).
        pos = at = self.used_idx
        wrap = at_wrap = self.used_wrap
        first: tuple[int, int] | None = None
        total = 0
        for k, (bid, written) in enumerate(elems):
            slots = self.ids[bid]
            self.ids[bid] = 0
            total += slots
            pos, wrap = self._advance(pos, wrap, slots)
            if self._coalesced(elems, k):
                continue
            _LEN_ID.pack_into(self.desc, DESC_SIZE * at + LEN_OFF, written, bid)
            flags = used_flags(at_wrap) | (WRITE if written else 0)
            if first is None:
                first = (at, flags)
            else:
                U16.pack_into(self.desc, DESC_SIZE * at + FLAGS_OFF, flags)
            at, at_wrap = pos, wrap
        assert first is not None
        U16.pack_into(self.desc, DESC_SIZE * first[0] + FLAGS_OFF, first[1])
        self._dirty_span(self.used_idx, total)
        self.used_idx, self.used_wrap = pos, wrap
        self.unsignalled = min(self.unsignalled + total, self.num)
        self.inflight -= n
        if self.in_order:
            self.log_start = (self.log_start + n) % self.num
        return 0

    def need_notify(self) -> int:
        if self.num == 0:
            return ERR_NOT_READY
        span, valid = self.unsignalled, self.signalled_used_valid
        self.unsignalled = 0
        self.signalled_used_valid = True
        flags = U16.unpack_from(self.driver, EVENT_FLAGS_OFF)[0]
        if flags == EVENT_DISABLE:
            return 0
        if flags != EVENT_DESC or not self.event_idx or not valid:
            return 1
        if span == 0:
            return 0
        if span >= self.num:  # a whole lap: the event was passed
            return 1
        off_wrap = U16.unpack_from(self.driver, 0)[0]
        twice = 2 * self.num
        now = self.used_idx + (0 if self.used_wrap else self.num)
        event = ((off_wrap & IDX_MASK) + (0 if off_wrap >> WRAP_BIT else self.num)) % twice
        return int((now + twice - event - 1) % twice < span)

    def set_notification(self, enable: bool) -> None:
        if self.num == 0:
            return
        self.notification = bool(enable)
        if not enable:
            self._write_event_flags(EVENT_DISABLE)
        elif self.event_idx:
            self._write_event()
            self._write_event_flags(EVENT_DESC)
        else:
            self._write_event_flags(EVENT_ENABLE)

    def avail_pending(self) -> int:
        if self.num == 0 or self.broken:
            return 0
        return int(is_avail(self._flags_at(self.last_avail_idx), self.avail_wrap))

    def unpop(self, n: int) -> int:
        if self.num == 0:
            return ERR_NOT_READY
        if not n or self.broken:  # a broken ring is never read again
            return 0
        if n > self.inflight:
            return ERR_UNPOP
        last = [self.ids[self._log(self.log_end + self.num - 1 - k)] for k in range(n)]
        if len(set(last)) != n or not all(self.ids[bid] for bid in last):
            return ERR_UNPOP
        for bid in last:
            self.log_end = (self.log_end + self.num - 1) % self.num
            slots = self.ids[bid]
            self.ids[bid] = 0
            self.last_avail_idx, self.avail_wrap = self._advance(self.last_avail_idx, self.avail_wrap,
                                                                 self.num - slots)
            self.avail_wrap ^= 1
            self.inflight -= 1
        self.popped = (self.popped - n) & 0xFFFF_FFFF
        if self.event_idx and self.notification:
            self._write_event()
        return 0
