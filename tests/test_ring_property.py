"""Hostile rings: the C ring code and the pure-Python reference agree
exactly, and neither touches memory outside the guest regions.

Each example lays out 1-3 guest regions (adjacent or with gaps in
guest-physical space, sometimes ending at 2^64) over random or zero
background bytes, places the three ring areas and up to three indirect
tables at arbitrary (unaligned) offsets, and builds a well-formed ring:
direct and indirect chains, readable then writable buffers, some
zero-length, some running off a region's end.  Then 0-4 hostile mutations
drawn by hypothesis: any descriptor or table field replaced (addresses
outside every region or wrapping 2^64, huge lengths, stray flags,
out-of-range next), loops, INDIRECT nested / misplaced / with NEXT, bad
indirect lengths and addresses, lengths summing past 2^32, bad heads,
avail->idx far ahead (16-bit wraparound included).  A sequence of
operations (pop with small chain/segment limits, push, need_notify,
set_notification, avail_pending, the guest adding buffers, and a final
generous pop) runs on the C ring in one copy of memory and on the
reference in another; every return value, chain, segment, the whole ring
state and every byte of memory must match.

No access outside the regions: the C copy's regions sit between PROT_NONE
guard pages (a stray read or write kills the test run with SIGSEGV), every
segment is checked against its region's bounds, the chain and segment
output arrays carry a canary entry past their limit, and every byte
outside the used ring area must be what the guest wrote.

The bulk of a ring comes from a seeded ``random.Random`` (cheap), the
layout and the mutations from hypothesis (so failures shrink to the
mutation that matters).
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringworld import (
    HOSTILE_EXAMPLES,
    ADDRESSES,
    EDGE_ADDRESSES,
    LENGTHS,
    LOGS,
    RSIZE,
    U16S,
    WORLD_C,
    WORLD_R,
    LogPair,
    Placer,
    c_pop,
    lib,
    load,
    random_buffer,
    region_gpas,
    resolve_address,
    state,
    facade_runs,
    world_memory,
    finish_case,
    check_generator_reaches_deep,
)
from vuser.rings import NativeSplitRing, PySplitRing
from vuser.rings.base import MAX_INDIRECT, NO_BYTE_LIMIT, PopResult, RingMemory
from vuser.rings.split_ref import DESC, U16, need_event, split_area_sizes
from vuser.virtio import DescFlag

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


class GuardedNativeSplitRing(NativeSplitRing):
    """The C ring, its pop writing into output arrays with a canary entry
    past ``max_chains`` / ``max_segs``: a write beyond the limits shows.
    (NativeSplitRing.pop itself is compared in the façade test below.)"""

    def pop(self, memory: RingMemory, max_chains: int, max_segs: int,
            max_bytes: int = NO_BYTE_LIMIT) -> PopResult:
        return c_pop(self.native, memory.native, max_chains, max_segs, max_bytes)


# (reference, candidate) ring classes per layout: the suite runs every
# case through the Ring interface on both and compares everything.
PAIRS = {"split": (PySplitRing, GuardedNativeSplitRing)}


# ---------------------------------------------------------------- generation

@dataclass
class Case:
    gpas: list[int]
    num: int
    areas: list[tuple[int, int]]            # (region, offset) of desc, avail, used
    fill: int                               # seed of the random background bytes (0 mod 3: zeroes)
    writes: list[tuple[int, int, bytes]]    # (region, offset, data), applied in order
    event_idx: bool
    last_avail_idx: int
    mutations: list[tuple] = field(default_factory=list)
    ops: list[tuple] = field(default_factory=list)
    log: tuple | None = None                # dirty logging (ringworld.LOGS)


FLAGS = st.one_of(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | NEXT, INDIRECT | WRITE]),
                  st.integers(0, 0xFFFF))
# (field index in a descriptor [addr, len, flags, next], hostile value)
FIELDS = st.one_of(st.tuples(st.just(0), ADDRESSES), st.tuples(st.just(1), LENGTHS),
                   st.tuples(st.just(2), FLAGS), st.tuples(st.just(3), U16S))
MUTATIONS = st.one_of(
    st.tuples(st.just("desc"), st.integers(0, 31), FIELDS),
    st.tuples(st.just("table"), st.integers(0, 2), st.integers(0, 7), FIELDS),
    st.tuples(st.just("link"), st.integers(0, 31), st.integers(0, 31)),         # loops, shared tails
    st.tuples(st.just("table_link"), st.integers(0, 2), st.integers(0, 7), st.integers(0, 8)),
    st.tuples(st.just("indirect"), st.integers(0, 31)),                         # INDIRECT anywhere
    st.tuples(st.just("flip_write"), st.integers(0, 31)),                       # order of readable/writable
    st.tuples(st.just("huge"), st.integers(0, 31), st.integers(0, 64)),         # lengths near 2^32
    st.tuples(st.just("ind_len"), st.integers(0, 2),
              st.sampled_from([0, 8, 24, -8, 16, 16 * (MAX_INDIRECT + 1), 2**32 - 16])),
    st.tuples(st.just("ind_addr"), st.integers(0, 2), EDGE_ADDRESSES),
    st.tuples(st.just("nest"), st.integers(0, 2), st.integers(0, 7)),           # INDIRECT in a table
    # Aimed at a chain the driver made: its tail loops to its head, points
    # past its table, is INDIRECT; all its lengths are huge; its head is
    # INDIRECT|NEXT.
    *[st.tuples(st.just("chain"), st.integers(0, 31),
                st.sampled_from(["loop", "beyond", "indirect", "huge", "indnext"]), st.integers(0, 64))] * 3,
    st.tuples(st.just("head"), st.integers(0, 31), U16S),
    st.tuples(st.just("avail_rel"), st.integers(0, 34)),
    st.tuples(st.just("avail_abs"), U16S),
)
BYTES = st.one_of(st.just(NO_BYTE_LIMIT), st.integers(0, 600), st.sampled_from([1, 16, 4096, 2**32]))
OPS = st.one_of(
    st.tuples(st.just("pop"), st.integers(0, 40), st.integers(0, 40), BYTES),
    st.tuples(st.just("pop"), st.integers(1, 40), st.integers(4, 64), BYTES),
    st.tuples(st.just("pop"), st.just(64), st.just(256), st.just(NO_BYTE_LIMIT)),
    st.tuples(st.just("push"), st.integers(0, 33), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("notify")),
    st.tuples(st.just("notification"), st.booleans()),
    st.tuples(st.just("pending")),
    st.tuples(st.just("guest"), st.integers(0, 2), st.one_of(st.integers(0, 31), st.integers(0, 31), U16S.map(lambda v: -1 - v))),
)


def chain_descs(rnd: random.Random, gpas: list[int], order: list[int]) -> dict[int, list[int]]:
    """Descriptors at table positions ``order`` forming one chain, readable first."""
    split = rnd.randint(0, len(order))
    out = {}
    for k, i in enumerate(order):
        addr, length = random_buffer(rnd, gpas)
        last = k == len(order) - 1
        out[i] = [addr, length, (WRITE if k >= split else 0) | (0 if last else NEXT), 0 if last else order[k + 1]]
    return out


def build_ring(rnd: random.Random, gpas: list[int], num: int,
               placer: Placer) -> tuple[list[list[int]], list[tuple[int, int, list[list[int]], int]], list[int]]:
    """A well-formed descriptor table, indirect tables (region, offset,
    entries, index of the descriptor pointing at it) and the chain heads in
    the order the driver made them."""
    desc = [[rnd.getrandbits(64), rnd.getrandbits(32), rnd.getrandbits(16), rnd.getrandbits(16)] for _ in range(num)]
    free = list(range(num))
    rnd.shuffle(free)
    tables: list[tuple[int, int, list[list[int]], int]] = []
    heads = []
    while free:
        if rnd.random() < 0.3 and len(tables) < 3:
            head = free.pop()
            entries = rnd.randint(1, 8)
            rest = list(range(1, entries))
            rnd.shuffle(rest)
            chain = chain_descs(rnd, gpas, [0] + rest)   # the device starts at entry 0
            r, off = placer.place(16 * entries)
            tables.append((r, off, [chain[k] for k in range(entries)], head))
            desc[head] = [gpas[r] + off, 16 * entries, INDIRECT, 0]
        else:
            n = min(rnd.randint(1, 4), len(free))
            order = [free.pop() for _ in range(n)]
            head = order[0]
            for i, d in chain_descs(rnd, gpas, order).items():
                desc[i] = d
        heads.append(head)
    return desc, tables, heads


def pack_descs(descs: list[list[int]]) -> bytes:
    return b"".join(DESC.pack(*d) for d in descs)


def mutate(desc: list[list[int]], tables: list, gpas: list[int], m: tuple) -> None:
    num = len(desc)
    kind = m[0]
    if kind == "desc":
        f, v = m[2]
        desc[m[1] % num][f] = resolve_address(v, gpas) if f == 0 else v
    elif kind == "link":
        d = desc[m[1] % num]
        d[2] |= NEXT
        d[3] = m[2] % num
    elif kind == "indirect":
        desc[m[1] % num][2] |= INDIRECT
    elif kind == "flip_write":
        desc[m[1] % num][2] ^= WRITE
    elif kind == "huge":
        desc[m[1] % num][1] = 2**32 - 1 - m[2]
        if tables:
            entries = tables[m[1] % len(tables)][2]
            entries[m[1] % len(entries)][1] = 2**32 - 1 - m[2]
    elif kind in ("ind_len", "ind_addr", "nest") and tables:
        _, _, entries, head = tables[m[1] % len(tables)]
        if kind == "ind_len":
            desc[head][1] = m[2] if m[2] >= 0 else 16 * len(entries) + m[2]
        elif kind == "ind_addr":
            desc[head][0] = resolve_address(m[2], gpas)
        else:
            entries[m[2] % len(entries)][2] |= INDIRECT
    elif kind in ("table", "table_link") and tables:
        entries = tables[m[1] % len(tables)][2]
        d = entries[m[2] % len(entries)]
        if kind == "table":
            f, v = m[3]
            d[f] = resolve_address(v, gpas) if f == 0 else v
        else:
            d[2] |= NEXT
            d[3] = m[3] % (len(entries) + 1)


def chain_mutation(desc: list[list[int]], tables: list, head: int, action: str, x: int) -> None:
    table = next((t[2] for t in tables if t[3] == head), None)
    if action == "indnext":
        desc[head][2] = INDIRECT | NEXT
        return
    entries, i = (desc, head) if table is None else (table, 0)
    members = [i]
    for _ in range(len(entries)):
        if not entries[i][2] & NEXT or entries[i][3] >= len(entries):
            break
        i = entries[i][3]
        members.append(i)
    tail = entries[i]
    if action == "loop":
        tail[2] |= NEXT
        tail[3] = members[0]
    elif action == "beyond":
        tail[2] |= NEXT
        tail[3] = len(entries) + x % 8
    elif action == "indirect":
        tail[2] |= INDIRECT
    else:  # earlier buffers are valid, the tail makes the total pass 2^32 - 1
        tail[1] = 2**32 - 1 - x
        if len(members) > 1:
            entries[members[0]][1] = max(entries[members[0]][1], x + 1)


@st.composite
def ring_cases(draw: st.DrawFn, max_ops: int = 8) -> Case:
    gpas = draw(region_gpas())
    n = len(gpas)
    num = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    placer = Placer(rnd, n, overlap=draw(st.integers(0, 9)) == 0)
    areas = [placer.place(size) for size in split_area_sizes(num)]
    desc, tables, heads = build_ring(rnd, gpas, num, placer)
    last = draw(U16S)
    ready = min(draw(st.one_of(st.just(num), st.integers(0, num))), len(heads))
    avail_heads = [heads[k % len(heads)] for k in range(num)]
    avail_idx = (last + ready) & 0xFFFF

    mutations = draw(st.lists(MUTATIONS, max_size=4))
    for m in mutations:
        if m[0] == "head":
            avail_heads[m[1] % num] = m[2]
        elif m[0] == "chain":
            chain_mutation(desc, tables, heads[m[1] % len(heads)], m[2], m[3])
        elif m[0] == "avail_rel":
            avail_idx = (last + m[1]) & 0xFFFF
        elif m[0] == "avail_abs":
            avail_idx = m[1]
        else:
            mutate(desc, tables, gpas, m)

    writes = [(r, off, pack_descs(entries)) for r, off, entries, _ in tables]
    writes.append((areas[0][0], areas[0][1], pack_descs(desc)))
    avail = struct.pack(f"<HH{num}HH", draw(st.integers(0, 3)), avail_idx, *avail_heads, draw(U16S))
    writes.append((areas[1][0], areas[1][1], avail))
    writes.append((areas[2][0], areas[2][1], struct.pack("<HH", draw(st.integers(0, 3)), draw(U16S))))
    ops = [op if op[0] != "guest" else ("guest", op[1], heads[op[2] % len(heads)] if op[2] >= 0 else -1 - op[2])
           for op in draw(st.lists(OPS, min_size=1, max_size=max_ops))]
    return Case(gpas, num, areas, draw(st.integers(0, 2**32 - 1)), writes, draw(st.booleans()), last,
                mutations, ops, draw(LOGS))


# ---------------------------------------------------------------- running

def run_case(case: Case, layout: str = "split") -> dict[str, int]:
    """Returns counts: chains, segs, errors and a bit per error code seen."""
    image = load(case.gpas, case.fill, case.writes)
    n = len(case.gpas)
    ref_cls, cand_cls = PAIRS[layout]
    mem_c, mem_r = world_memory(WORLD_C, case.gpas), world_memory(WORLD_R, case.gpas)
    num = case.num
    sizes = ref_cls.area_sizes(num)
    (ar, ao), (ur, uo) = case.areas[1], case.areas[2]

    cand, ref = cand_cls(), ref_cls()
    areas_c = [WORLD_C.slots[r][off:off + size] for (r, off), size in zip(case.areas, sizes)]
    areas_r = [WORLD_R.slots[r][off:off + size] for (r, off), size in zip(case.areas, sizes)]
    assert cand.init(num, areas_c, case.event_idx, case.last_avail_idx) == \
        ref.init(num, areas_r, case.event_idx, case.last_avail_idx) == 0
    assert state(cand) == state(ref)
    logs = None
    if case.log is not None:  # the front-end migrates: the same bits from both
        logs = LogPair(case.log, case.gpas, case.gpas[ur] + uo, case.gpas[case.areas[0][0]] + case.areas[0][1])
        logs.attach(cand, ref)

    stats = {"chains": 0, "segs": 0, "errors": 0, "codes": 0}
    outstanding: list[int] = []
    for op in case.ops + [("pop", 64, 256, NO_BYTE_LIMIT)]:  # always end by walking whatever is there
        kind = op[0]
        if kind == "pop":
            _, max_chains, max_segs, max_bytes = op
            before = cand.base()
            c = cand.pop(mem_c, max_chains, max_segs, max_bytes)
            assert c == ref.pop(mem_r, max_chains, max_segs, max_bytes)
            rc, chains, segs = c
            if len(chains) > 1:  # the byte budget: only the first chain may exceed it
                assert sum(ch[3] + ch[4] for ch in chains) <= max_bytes
            for off, length, region, _flags in segs:
                assert region < n and length > 0 and off + length <= RSIZE
            for first, nsegs, nread, out_len, in_len, _head, _ in chains:
                mine = segs[first:first + nsegs]
                assert not any(s[3] for s in mine[:nread]) and all(s[3] for s in mine[nread:])
                assert sum(s[1] for s in mine if s[3]) == in_len
                assert sum(s[1] for s in mine if not s[3]) == out_len
                flags = [s[3] for s in mine]
                assert flags == sorted(flags)       # readable segments first
            assert (cand.base() - before) & 0xFFFF == len(chains)
            outstanding += [ch[5] for ch in chains]
            stats["chains"] += len(chains)
            stats["segs"] += len(segs)
            stats["errors"] += rc < 0
            if rc < 0:
                stats["codes"] |= 1 << -rc
        elif kind == "push":
            _, k, written = op
            if outstanding:
                elems = [(h, (written + j) & 0xFFFF_FFFF) for j, h in enumerate(outstanding[:k])]
                del outstanding[:k]
            else:
                elems = [((written >> j) % (num + 1), j) for j in range(k)]
            old_used = cand.used_idx
            rc = cand.push(elems)
            assert rc == ref.push(elems)
            if rc == 0 and elems:  # the used index advances by exactly the chains completed
                assert cand.used_idx == (old_used + len(elems)) & 0xFFFF
                assert U16.unpack_from(WORLD_C.slots[ur], uo + 2)[0] == cand.used_idx
        elif kind == "notify":
            assert cand.need_notify() == ref.need_notify()
        elif kind == "notification":
            cand.set_notification(op[1])
            ref.set_notification(op[1])
        elif kind == "pending":
            assert cand.avail_pending() == ref.avail_pending()
        elif kind == "guest":  # the guest makes more (or garbage) available
            _, delta, head = op
            idx = (U16.unpack_from(image[ar], ao + 2)[0] + delta) & 0xFFFF
            slot = ao + 4 + 2 * ((idx - 1) % num)
            for target in (image[ar], WORLD_C.slots[ar], WORLD_R.slots[ar]):
                U16.pack_into(target, slot, head)
                U16.pack_into(target, ao + 2, idx)
        assert state(cand) == state(ref), op
        if logs is not None:
            logs.check_same()
    # Same bytes everywhere; and only the used ring area may have changed.
    finish_case(cand, ref, logs, case.gpas, image, [(ur, uo, sizes[2])])
    return stats


@settings(max_examples=HOSTILE_EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ring_cases())
@pytest.mark.parametrize("layout", sorted(PAIRS))
def test_c_equals_reference_on_hostile_rings(layout: str, case: Case) -> None:
    run_case(case, layout)


def test_generated_rings_reach_deep() -> None:
    """The distributions are not all early errors: examples yield chains,
    multi-segment chains, and every kind of chain error."""
    check_generator_reaches_deep(run_case, ring_cases(max_ops=3), seed_value=20261124, examples=1200,
                                 errors=range(1, 14))


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_need_event_arithmetic(event: int, new: int, old: int) -> None:
    # "event in [old, new)" modulo 2^16 is what vring_need_event means.
    expected = (event - old) % 65536 < (new - old) % 65536
    assert bool(lib.vu_need_event(event, new, old)) == need_event(event, new, old) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.lists(st.tuples(st.integers(0, 40), st.integers(0, 0xFFFF)), min_size=1, max_size=20))
def test_need_notify_with_event_idx_tracks_signalled_used(used0: int, last: int,
                                                          steps: list[tuple[int, int]]) -> None:
    """Pushes of random batch sizes, the guest moving used_event at random:
    C and reference decide identically, including across index wraparound
    and after signalled_used falls 2^15 behind."""
    num = 32
    slot = WORLD_C.slots[0]
    rslot = WORLD_R.slots[0]
    for s in (slot, rslot):
        s[:] = bytes(RSIZE)
        U16.pack_into(s, 1024 + 2, used0)
    sizes = split_area_sizes(num)
    cand, ref = NativeSplitRing(), PySplitRing()
    offsets = (0, 512, 1024)
    assert cand.init(num, [slot[o:o + n] for o, n in zip(offsets, sizes)], True, last) == 0
    assert ref.init(num, [rslot[o:o + n] for o, n in zip(offsets, sizes)], True, last) == 0
    for count, used_event in steps:
        for s in (slot, rslot):
            U16.pack_into(s, 512 + 4 + 2 * num, used_event)
        for _ in range(count // num):
            elems = [(0, 0)] * num
            assert cand.push(elems) == ref.push(elems) == 0
        elems = [(1, 0)] * (count % num)
        assert cand.push(elems) == ref.push(elems) == 0
        assert cand.need_notify() == ref.need_notify()
        assert state(cand) == state(ref)
    cand.clear()
    assert bytes(slot) == bytes(rslot)


# ---------------------------------------------------------------- the façade

@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ring_cases(max_ops=6), st.sampled_from([None, 4, 9, 64]))
def test_facade_native_equals_python(case: Case, max_segs: int | None) -> None:
    """VirtQueue(impl="native") and VirtQueue(impl="python") over real
    memfd GuestMemory: same chains (same bytes), same errors, same memory."""
    runs = facade_runs(case.gpas, case.fill, case.writes, case.areas, case.num, case.ops, layout="split",
                       max_segs=max_segs, event_idx=case.event_idx, base=case.last_avail_idx)
    assert runs[0] == runs[1]
