"""Hostile packed rings: the C packed ring (native/vring_packed.c) and its
pure-Python reference (vuser/rings/packed_ref.py) agree exactly, and
neither touches memory outside the guest regions.

Each example lays out 1-3 guest regions (ringworld.py: adjacent or with
gaps, sometimes ending at 2^64, the C copy fenced by PROT_NONE guard
pages), places the descriptor ring, the two event suppression structures
and up to three indirect tables at arbitrary offsets, and builds what a
driver would: chains of 1-4 consecutive slots (wrapping, with each lap's
AVAIL/USED bits) or one slot pointing at an indirect table, unique buffer
ids, readable then writable buffers, the rest of the ring looking like the
previous lap's used descriptors.  The device starts anywhere (any slot,
either wrap counter, a base with or without its used half, sometimes
beyond the ring).  Then 0-4 hostile mutations: any descriptor or table
field replaced, wrong wrap bits on a chain member, NEXT on a chain's last
descriptor (it runs into the next chain or into slots not available), a
ring of NEXT (a chain longer than the ring), INDIRECT misplaced / with NEXT
/ nested, bad table lengths and addresses, a buffer id reused or beyond
the ring, lengths summing past 2^32.  A sequence of operations (pops with
small limits and byte budgets, pushes in order or not, unpops, notify
decisions with the guest moving its event suppression structure, the
guest adding chains, in-order rings) runs on the C ring in one copy of
memory and on the reference in another; every return value, chain,
segment, the whole ring state (the id table included) and every byte of
memory must match, and only the descriptor ring and the device event
structure may have been written.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringworld import (
    HOSTILE_EXAMPLES,
    ADDRESSES,
    EDGE_ADDRESSES,
    LENGTHS,
    LOGS,
    RSIZE,
    WORLD_C,
    WORLD_R,
    LogPair,
    Placer,
    c_pop,
    facade_runs,
    load,
    random_buffer,
    region_gpas,
    resolve_address,
    state,
    world_memory,
    finish_case,
    check_generator_reaches_deep,
)
from vuser.rings import NativePackedRing, PyPackedRing
from vuser.rings.base import MAX_INDIRECT, NO_BYTE_LIMIT, PopResult, RingMemory
from vuser.rings.packed_ref import PDESC, packed_area_sizes, packed_base
from vuser.virtio import DescFlag, EventFlags

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
AVAIL, USED = int(DescFlag.AVAIL), int(DescFlag.USED)


def avail_bits(wrap: int) -> int:
    return AVAIL if wrap else USED


def used_bits(wrap: int) -> int:
    return AVAIL | USED if wrap else 0


class GuardedNativePackedRing(NativePackedRing):
    """The C ring, its pop writing into output arrays with a canary entry
    past the limits (ringworld.c_pop)."""

    def pop(self, memory: RingMemory, max_chains: int, max_segs: int,
            max_bytes: int = NO_BYTE_LIMIT) -> PopResult:
        return c_pop(self.native, memory.native, max_chains, max_segs, max_bytes)


# ---------------------------------------------------------------- generation

@dataclass
class Chain:
    slots: list[int]          # ring slots, head first
    buffer_id: int
    table: int | None         # index into the case's tables


@dataclass
class Case:
    gpas: list[int]
    num: int
    areas: list[tuple[int, int]]            # (region, offset) of descriptor ring, driver, device areas
    fill: int
    writes: list[tuple[int, int, bytes]]
    event_idx: bool
    in_order: bool
    base: int
    driver_pos: tuple[int, int]             # where the driver adds next (slot, wrap)
    mutations: list[tuple] = field(default_factory=list)
    ops: list[tuple] = field(default_factory=list)
    log: tuple | None = None                # dirty logging (ringworld.LOGS)


FIELDS = st.one_of(st.tuples(st.just(0), ADDRESSES), st.tuples(st.just(1), LENGTHS),
                   st.tuples(st.just(2), st.one_of(st.integers(0, 40), st.integers(0, 0xFFFF))),
                   st.tuples(st.just(3), st.integers(0, 0xFFFF)))
MUTATIONS = st.one_of(
    st.tuples(st.just("desc"), st.integers(0, 40), FIELDS),
    st.tuples(st.just("table"), st.integers(0, 2), st.integers(0, 7), FIELDS),
    st.tuples(st.just("wrapbit"), st.integers(0, 40), st.integers(0, 3), st.sampled_from([AVAIL, USED])),
    st.tuples(st.just("nextlast"), st.integers(0, 40)),
    st.tuples(st.just("ring_loop"), st.just(0)),
    st.tuples(st.just("indirect"), st.integers(0, 40), st.integers(0, 3)),
    st.tuples(st.just("indnext"), st.integers(0, 40)),
    st.tuples(st.just("nest"), st.integers(0, 2), st.integers(0, 7)),
    st.tuples(st.just("ind_len"), st.integers(0, 2),
              st.sampled_from([0, 8, 24, -8, 16, 16 * (MAX_INDIRECT + 1), 2**32 - 16])),
    st.tuples(st.just("ind_addr"), st.integers(0, 2), EDGE_ADDRESSES),
    st.tuples(st.just("dup_id"), st.integers(0, 40), st.integers(0, 40)),
    st.tuples(st.just("big_id"), st.integers(0, 40), st.integers(0, 0xFFFF)),
    st.tuples(st.just("huge"), st.integers(0, 40), st.integers(0, 64)),
    st.tuples(st.just("flip_write"), st.integers(0, 40), st.integers(0, 3)),
)
BYTES = st.one_of(st.just(NO_BYTE_LIMIT), st.integers(0, 600), st.sampled_from([1, 16, 4096, 2**32]))
EVENTS = st.tuples(st.integers(0, 0xFFFF), st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF)))
OPS = st.one_of(
    st.tuples(st.just("pop"), st.integers(0, 40), st.integers(0, 40), BYTES),
    st.tuples(st.just("pop"), st.integers(1, 40), st.integers(4, 64), BYTES),
    st.tuples(st.just("pop"), st.just(64), st.just(256), st.just(NO_BYTE_LIMIT)),
    st.tuples(st.just("push"), st.integers(0, 33), st.integers(0, 2**32 - 1),
              st.sampled_from(["fifo", "fifo", "reverse", "bogus", "zero", "mixed", "dup"])),
    st.tuples(st.just("unpop"), st.integers(0, 5)),
    st.tuples(st.just("notify")),
    st.tuples(st.just("notification"), st.booleans()),
    st.tuples(st.just("pending")),
    st.tuples(st.just("event"), EVENTS),
    st.tuples(st.just("guest"), st.integers(1, 3), st.integers(0, 40)),
    st.tuples(st.just("reinit")),
)


class Builder:
    """What a driver writes: chains at consecutive slots from a position."""

    def __init__(self, rnd: random.Random, gpas: list[int], num: int, placer: Placer,
                 slot: int, wrap: int) -> None:
        self.rnd, self.gpas, self.num, self.placer = rnd, gpas, num, placer
        self.slot, self.wrap = slot, wrap
        self.desc: dict[int, list[int]] = {}
        self.tables: list[tuple[int, int, list[list[int]], int]] = []   # region, offset, entries, ring slot
        self.chains: list[Chain] = []

    def buffers(self, n: int) -> list[tuple[int, int, int]]:
        split = self.rnd.randint(0, n)
        return [(*random_buffer(self.rnd, self.gpas), WRITE if k >= split else 0) for k in range(n)]

    def chain(self, nslots: int, buffer_id: int, indirect: bool) -> Chain:
        slots = []
        table = None
        if indirect:
            entries = [[a, n, self.rnd.getrandbits(16), f] for a, n, f in self.buffers(self.rnd.randint(1, 8))]
            r, off = self.placer.place(16 * len(entries))
            table = len(self.tables)
            self.tables.append((r, off, entries, self.slot))
            pieces = [(self.gpas[r] + off, 16 * len(entries), INDIRECT)]
        else:
            pieces = [(a, n, f | (NEXT if k < nslots - 1 else 0)) for k, (a, n, f) in enumerate(self.buffers(nslots))]
        for addr, length, flags in pieces:
            self.desc[self.slot] = [addr, length, buffer_id, flags | avail_bits(self.wrap)]
            slots.append(self.slot)
            self.slot += 1
            if self.slot == self.num:
                self.slot, self.wrap = 0, self.wrap ^ 1
        chain = Chain(slots, buffer_id, table)
        self.chains.append(chain)
        return chain


def slot_wrap(slot: int, pos: tuple[int, int]) -> int:
    """The wrap counter the driver writes ``slot`` with next, from ``pos``."""
    return pos[1] if slot >= pos[0] else pos[1] ^ 1


@st.composite
def ring_cases(draw: st.DrawFn, max_ops: int = 8) -> Case:
    gpas = draw(region_gpas())
    num = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 32]))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    placer = Placer(rnd, len(gpas), overlap=draw(st.integers(0, 9)) == 0)
    areas = [placer.place(size) for size in packed_area_sizes(num)]
    start = (draw(st.integers(0, num - 1)), draw(st.integers(0, 1)))
    b = Builder(rnd, gpas, num, placer, *start)
    ids = list(range(num))
    rnd.shuffle(ids)
    ready = draw(st.integers(0, num))
    left = num
    while len(b.chains) < ready and left and ids:
        indirect = rnd.random() < 0.3 and len(b.tables) < 3
        n = 1 if indirect else min(rnd.randint(1, 4), left)
        b.chain(n, ids.pop(), indirect)
        left -= 1 if indirect else n
    driver_pos = (b.slot, b.wrap)
    # The rest looks like the last lap's used descriptors (or garbage).
    desc = []
    for s in range(num):
        if s in b.desc:
            desc.append(b.desc[s])
        elif rnd.random() < 0.1:
            desc.append([rnd.getrandbits(64), rnd.getrandbits(32), rnd.getrandbits(16), rnd.getrandbits(16)])
        else:
            desc.append([rnd.getrandbits(64), rnd.getrandbits(32), rnd.getrandbits(16) % num,
                         used_bits(slot_wrap(s, driver_pos) ^ 1)])
    chains, tables = b.chains, b.tables

    mutations = draw(st.lists(MUTATIONS, max_size=4))
    for m in mutations:
        kind = m[0]
        if kind == "desc":
            f, v = m[2]
            desc[m[1] % num][f] = resolve_address(v, gpas) if f == 0 else v
        elif kind == "ring_loop":
            for s in range(num):
                desc[s][3] = NEXT | avail_bits(slot_wrap(s, start))
        elif kind in ("table", "nest", "ind_len", "ind_addr") and tables:
            _, _, entries, slot = tables[m[1] % len(tables)]
            if kind == "table":
                f, v = m[3]
                entries[m[2] % len(entries)][f] = resolve_address(v, gpas) if f == 0 else v
            elif kind == "nest":
                entries[m[2] % len(entries)][3] |= INDIRECT
            elif kind == "ind_len":
                desc[slot][1] = m[2] if m[2] >= 0 else 16 * len(entries) + m[2]
            else:
                desc[slot][0] = resolve_address(m[2], gpas)
        elif chains and kind not in ("table", "nest", "ind_len", "ind_addr"):
            c = chains[m[1] % len(chains)]
            member = c.slots[m[2] % len(c.slots)] if kind in ("wrapbit", "indirect", "flip_write") else None
            if kind == "wrapbit":
                desc[member][3] ^= m[3]
            elif kind == "nextlast":
                desc[c.slots[-1]][3] |= NEXT
            elif kind == "indirect":
                desc[member][3] |= INDIRECT
            elif kind == "indnext":
                desc[c.slots[0]][3] |= INDIRECT | NEXT
            elif kind == "dup_id":
                desc[c.slots[-1]][2] = chains[m[2] % len(chains)].buffer_id
            elif kind == "big_id":
                desc[c.slots[-1]][2] = num + m[2] % (0x10000 - num)
            elif kind == "huge":
                desc[c.slots[-1]][1] = 2**32 - 1 - m[2]
                desc[c.slots[0]][1] = max(desc[c.slots[0]][1], m[2] + 1)
            else:
                desc[member][3] ^= WRITE

    avail_half = start[0] | start[1] << 15
    used_kind = draw(st.integers(0, 9))
    if used_kind < 4:
        base = avail_half                              # DPDK: the avail half only
    elif used_kind < 8:
        base = avail_half | avail_half << 16           # QEMU after a clean stop
    elif used_kind == 8:
        base = avail_half | packed_base(0, 0, draw(st.integers(0, num - 1)), draw(st.integers(0, 1)))
    else:
        base = draw(st.integers(0, 2**32 - 1))         # anything, indexes beyond the ring included

    writes = [(r, off, b"".join(PDESC.pack(*e) for e in entries)) for r, off, entries, _ in tables]
    writes.append((areas[0][0], areas[0][1], b"".join(PDESC.pack(*d) for d in desc)))
    writes.append((areas[1][0], areas[1][1], struct.pack("<HH", *draw(EVENTS))))
    writes.append((areas[2][0], areas[2][1], struct.pack("<HH", *draw(EVENTS))))
    return Case(gpas, num, areas, draw(st.integers(0, 2**32 - 1)), writes, draw(st.booleans()),
                draw(st.booleans()), base, driver_pos, mutations, draw(st.lists(OPS, min_size=1, max_size=max_ops)),
                draw(LOGS))


# ---------------------------------------------------------------- running

def run_case(case: Case) -> dict[str, int]:
    """Returns counts: chains, segs, errors and a bit per error code seen."""
    image = load(case.gpas, case.fill, case.writes)
    n = len(case.gpas)
    mem_c, mem_r = world_memory(WORLD_C, case.gpas), world_memory(WORLD_R, case.gpas)
    num = case.num
    sizes = packed_area_sizes(num)
    (dr, do), (er, eo) = case.areas[0], case.areas[1]
    cand, ref = GuardedNativePackedRing(), PyPackedRing()
    areas_c = [WORLD_C.slots[r][off:off + size] for (r, off), size in zip(case.areas, sizes)]
    areas_r = [WORLD_R.slots[r][off:off + size] for (r, off), size in zip(case.areas, sizes)]
    rc = cand.init(num, areas_c, case.event_idx, case.base, case.in_order)
    assert rc == ref.init(num, areas_r, case.event_idx, case.base, case.in_order)
    assert state(cand) == state(ref)
    stats = {"chains": 0, "segs": 0, "errors": 0, "codes": 0}
    if rc:
        return stats
    assert cand.base() >> 16 == (case.base >> 16 or case.base & 0xFFFF)
    logs = None
    if case.log is not None:  # the front-end migrates: the same bits from both
        (xr, xo) = case.areas[2]
        logs = LogPair(case.log, case.gpas, case.gpas[xr] + xo, case.gpas[dr] + do)
        logs.attach(cand, ref)

    rnd = random.Random(case.fill)
    driver = list(case.driver_pos)
    outstanding: list[int] = []
    for op in case.ops + [("pop", 64, 256, NO_BYTE_LIMIT)]:  # always end by walking whatever is there
        kind = op[0]
        if kind == "pop":
            _, max_chains, max_segs, max_bytes = op
            c = cand.pop(mem_c, max_chains, max_segs, max_bytes)
            assert c == ref.pop(mem_r, max_chains, max_segs, max_bytes)
            rc, chains, segs = c
            if len(chains) > 1:
                assert sum(ch[3] + ch[4] for ch in chains) <= max_bytes
            for off, length, region, _flags in segs:
                assert region < n and length > 0 and off + length <= RSIZE
            for first, nsegs, nread, out_len, in_len, head, _ in chains:
                mine = segs[first:first + nsegs]
                assert head < num
                assert not any(s[3] for s in mine[:nread]) and all(s[3] for s in mine[nread:])
                assert sum(s[1] for s in mine if s[3]) == in_len
                assert sum(s[1] for s in mine if not s[3]) == out_len
            assert len({ch[5] for ch in chains} | set(outstanding)) == len(chains) + len(outstanding)
            outstanding += [ch[5] for ch in chains]
            stats["chains"] += len(chains)
            stats["segs"] += len(segs)
            stats["errors"] += rc < 0
            if rc < 0:
                stats["codes"] |= 1 << -rc
        elif kind == "push":
            _, k, written, how = op
            if how == "bogus" or not outstanding:
                elems = [((written >> j) % (num + 2), j) for j in range(k)]
            else:
                take = outstanding[:k] if how != "reverse" else list(reversed(outstanding[:k]))
                if how == "dup" and take:   # one in-flight id twice in the batch
                    take.insert(written % (len(take) + 1), take[written % len(take)])
                elems = [(h, 0 if how == "zero" or (how == "mixed" and written >> j & 1)
                          else (written + j) & 0xFFFF_FFFF) for j, h in enumerate(take)]
            rc = cand.push(elems)
            assert rc == ref.push(elems)
            if rc == 0 and how != "dup":
                for h, _ in elems:
                    outstanding.remove(h)
        elif kind == "unpop":
            rc = cand.unpop(op[1])
            assert rc == ref.unpop(op[1])
            if rc == 0 and op[1] and not cand.broken:
                del outstanding[len(outstanding) - op[1]:]
        elif kind == "notify":
            assert cand.need_notify() == ref.need_notify()
        elif kind == "notification":
            cand.set_notification(op[1])
            ref.set_notification(op[1])
        elif kind == "pending":
            assert cand.avail_pending() == ref.avail_pending()
        elif kind == "event":  # the guest moves its event suppression structure
            data = struct.pack("<HH", *op[1])
            for target in (image[er], WORLD_C.slots[er], WORLD_R.slots[er]):
                target[eo:eo + 4] = data
        elif kind == "guest":  # the guest makes another chain available
            _, nslots, buffer_id = op
            for k in range(nslots):
                addr, length = random_buffer(rnd, case.gpas)
                flags = (NEXT if k < nslots - 1 else 0) | avail_bits(driver[1])
                data = PDESC.pack(addr, length, buffer_id % (num + 1), flags)
                at = do + 16 * driver[0]
                for target in (image[dr], WORLD_C.slots[dr], WORLD_R.slots[dr]):
                    target[at:at + 16] = data
                driver[0] += 1
                if driver[0] == num:
                    driver[0], driver[1] = 0, driver[1] ^ 1
        elif kind == "reinit":  # reconnect: the same ring objects, resumed from GET_VRING_BASE
            rc = cand.init(num, areas_c, case.event_idx, cand.base(), case.in_order)
            assert rc == ref.init(num, areas_r, case.event_idx, ref.base(), case.in_order)
            outstanding = []
            if logs is not None:  # init forgets the log; the virtqueue gives it again
                logs.attach(cand, ref)
        assert state(cand) == state(ref), op
        # Guest-visible bytes after every operation, not only at the end (a
        # later pop rewrites the device event, hiding a stale one).
        assert all(bytes(WORLD_C.slots[r]) == bytes(WORLD_R.slots[r]) for r in range(n)), op
        if logs is not None:
            logs.check_same()
    # Same bytes everywhere; only the descriptor ring and the device area
    # may have changed.
    finish_case(cand, ref, logs, case.gpas, image,
                [(*case.areas[0], sizes[0]), (*case.areas[2], sizes[2])])
    return stats


@settings(max_examples=HOSTILE_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ring_cases())
def test_c_equals_reference_on_hostile_packed_rings(case: Case) -> None:
    run_case(case)


# Chain errors a packed ring can raise (the split-only ones — avail index,
# head, next — have no packed meaning; VU_ERR_CHAIN_DESCS needs more
# descriptors than these rings hold).
PACKED_CHAIN_ERRORS = (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17)


def test_generated_packed_rings_reach_deep() -> None:
    """The distributions are not all early errors: examples yield chains,
    multi-segment chains, and every kind of packed chain error."""
    check_generator_reaches_deep(run_case, ring_cases(max_ops=3), seed_value=20261202, examples=1500,
                                 errors=PACKED_CHAIN_ERRORS)


def twin_rings(num: int, wrap: int, *, event_idx: bool,
               in_order: bool = False) -> tuple[list[tuple[Any, bytearray]], tuple[Any, Any]]:
    """A packed ring of ``num`` slots at the start of region 0, in C and in
    the reference, both starting on lap ``wrap``: (ring, region) pairs and
    the two worlds' memories."""
    sizes = packed_area_sizes(num)
    offsets = (0, 16 * num, 16 * num + 4)
    rings = []
    for world, cls in ((WORLD_C, NativePackedRing), (WORLD_R, PyPackedRing)):
        s = world.slots[0]
        s[:] = bytes(RSIZE)
        ring = cls()
        assert ring.init(num, [s[o:o + n] for o, n in zip(offsets, sizes)], event_idx, wrap << 15, in_order) == 0
        rings.append((ring, s))
    return rings, (world_memory(WORLD_C, [0]), world_memory(WORLD_R, [0]))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.integers(0, 1),
       st.lists(st.tuples(st.integers(0, 80), st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 3]),
                          st.integers(0, 3)),
                min_size=1, max_size=20))
def test_need_notify_follows_the_driver_event(num: int, wrap: int, steps: list[tuple[int, int, int, int]]) -> None:
    """One-slot chains popped and pushed in batches of random sizes while
    the guest moves its event (off_wrap and flags) at random: C and
    reference decide identically, and with EVENT_IDX a DESC event is
    signalled exactly when the used index passed it."""
    rings, (mem_c, mem_r) = twin_rings(num, wrap, event_idx=True)
    pos, pwrap = 0, wrap          # the driver's next avail slot
    used, uwrap = 0, wrap         # the device's used index, as the test tracks it
    since, pushed = 0, 0          # position at the last decision, slots pushed since
    for count, off_wrap, flags, decide in steps:
        count %= num + 1
        for _ in range(count):
            for _, s in rings:
                PDESC.pack_into(s, 16 * pos, 0x100, 8, pos, avail_bits(pwrap) | WRITE)
            pos += 1
            if pos == num:
                pos, pwrap = 0, pwrap ^ 1
        got = [ring.pop(mem, 64, 64) for (ring, _), mem in zip(rings, (mem_c, mem_r))]
        assert got[0] == got[1]
        ids = [(c[5], 8) for c in got[0][1]]
        for (ring, s) in rings:
            struct.pack_into("<HH", s, 16 * num, off_wrap, flags)
            assert ring.push(ids) == 0
        if not pushed:
            since = used + (0 if uwrap else num)
        pushed += len(ids)
        used += len(ids)
        if used >= num:
            used, uwrap = used - num, uwrap ^ 1
        assert state(rings[0][0]) == state(rings[1][0])
        if not decide:                            # no decision this time: the span grows
            continue
        span, pushed = pushed, 0
        valid = rings[1][0].signalled_used_valid   # the first decision always signals
        decisions = [ring.need_notify() for ring, _ in rings]
        assert decisions[0] == decisions[1]
        assert state(rings[0][0]) == state(rings[1][0])
        if flags == EventFlags.DESC and span and span < num:
            twice = 2 * num
            event = ((off_wrap & 0x7FFF) + (0 if off_wrap >> 15 else num)) % twice
            passed = (event - since) % twice < span
            assert decisions[0] == int(passed or not valid)
    rings[0][0].clear()
    assert bytes(WORLD_C.slots[0]) == bytes(WORLD_R.slots[0])


# ---------------------------------------------------------------- the façade

@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ring_cases(max_ops=6), st.sampled_from([None, 4, 9, 64]))
def test_facade_native_equals_python_packed(case: Case, max_segs: int | None) -> None:
    """VirtQueue(layout="packed") in C and in Python over real memfd
    GuestMemory: same chains (same bytes), same errors, same memory."""
    runs = facade_runs(case.gpas, case.fill, case.writes, case.areas, case.num, case.ops, layout="packed",
                       max_segs=max_segs, event_idx=case.event_idx, base=case.base,
                       in_order=case.in_order)
    assert runs[0] == runs[1]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 16), st.integers(0, 1), st.booleans(),
       st.lists(st.tuples(st.integers(1, 3), st.integers(0, 8),
                          st.lists(st.sampled_from([0, 0, 1, 0xFFFF_FFFF]), max_size=8)),
                min_size=1, max_size=12))
def test_in_order_batches_mix_zero_and_nonzero(num: int, wrap: int, event_idx: bool,
                                               steps: list[tuple[int, int, list[int]]]) -> None:
    """VIRTIO_F_IN_ORDER: chains of 1-3 slots completed oldest first in
    batches mixing zero and non-zero lengths (the hostile generator almost
    never gets two in-flight buffers into one in-order batch): C and
    reference coalesce identically and write the same used descriptors."""
    rings, (mem_c, mem_r) = twin_rings(num, wrap, event_idx=event_idx, in_order=True)
    pos, pwrap = 0, wrap
    outstanding: list[tuple[int, int]] = []          # (id, slots), oldest first
    for nslots, nchains, lengths in steps:
        for _ in range(nchains):
            if sum(k for _, k in outstanding) + nslots > num:
                break
            bid = min(set(range(num)) - {b for b, _ in outstanding})
            for k in range(nslots):
                for _, s in rings:
                    PDESC.pack_into(s, 16 * pos, 0x100, 8, bid,
                                    (NEXT if k < nslots - 1 else 0) | WRITE | avail_bits(pwrap))
                pos += 1
                if pos == num:
                    pos, pwrap = 0, pwrap ^ 1
            outstanding.append((bid, nslots))
        got = [ring.pop(mem, 64, 64) for (ring, _), mem in zip(rings, (mem_c, mem_r))]
        assert got[0] == got[1] and got[0][0] == 0
        elems = [(b, n) for (b, _), n in zip(outstanding, lengths)]
        rcs = [ring.push(elems) for ring, _ in rings]
        assert rcs[0] == rcs[1] == 0
        del outstanding[:len(elems)]
        assert state(rings[0][0]) == state(rings[1][0])
        assert bytes(WORLD_C.slots[0]) == bytes(WORLD_R.slots[0])
    rings[0][0].clear()
