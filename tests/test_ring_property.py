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

import ctypes
import mmap
import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from vuser.rings import NativeSplitRing, PySplitRing
from vuser.rings.base import MAX_INDIRECT, NO_BYTE_LIMIT, PopResult, RingMemory
from vuser.rings.errors import ERROR_NAMES
from vuser.rings.split_ref import DESC, U16, need_event, split_area_sizes
from vuser.virtio import DescFlag

native = pytest.importorskip("vuser._native")
ffi, lib = native.ffi, native.lib

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)

PAGE = mmap.PAGESIZE
PROT_NONE = 0
SLOT_PAGES = 2
RSIZE = SLOT_PAGES * PAGE          # every region is exactly this big
NSLOTS = 3
U64 = 1 << 64
CANARY = 0xA5


def slot_offset(i: int) -> int:
    return (1 + i * (SLOT_PAGES + 1)) * PAGE   # guard, slot, guard, slot, guard, slot, guard


class World:
    """Host memory for up to NSLOTS regions, each fenced by guard pages."""

    def __init__(self, guard: bool) -> None:
        size = (1 + NSLOTS * (SLOT_PAGES + 1)) * PAGE
        self.mm = mmap.mmap(-1, size)
        self.handle = ffi.from_buffer(self.mm)
        self.base = int(ffi.cast("uintptr_t", self.handle))
        whole = memoryview(self.mm)
        self.slots = [whole[slot_offset(i):slot_offset(i) + RSIZE] for i in range(NSLOTS)]
        if guard:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            for i in range(NSLOTS + 1):
                addr = self.base + (i * (SLOT_PAGES + 1)) * PAGE
                assert libc.mprotect(addr, PAGE, PROT_NONE) == 0, ctypes.get_errno()

    def host(self, slot: int, offset: int = 0) -> object:
        return ffi.cast("uint8_t *", self.base + slot_offset(slot) + offset)


WORLD_C = World(guard=True)
WORLD_R = World(guard=False)


@dataclass
class RefRegion:
    gpa: int
    size: int
    view: memoryview


@dataclass
class WorldMemory:
    """A world's regions as a ring sees memory (``vuser.rings.base.RingMemory``)."""

    regions: list[RefRegion]
    native: object = None


def world_memory(world: World, gpas: list[int]) -> WorldMemory:
    regions = [RefRegion(gpa, RSIZE, world.slots[i]) for i, gpa in enumerate(gpas)]
    if world is not WORLD_C:
        return WorldMemory(regions)
    mem = ffi.new("struct vu_mem *")
    mem.nregions = len(gpas)
    for i, gpa in enumerate(gpas):
        mem.regions[i].gpa, mem.regions[i].size, mem.regions[i].host = gpa, RSIZE, world.host(i)
    return WorldMemory(regions, mem)


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


U16S = st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 1, 2, 7, 8, 31, 32, 33, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]))


@st.composite
def region_gpas(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(1, NSLOTS))
    gaps = [draw(st.sampled_from([0, 0, 16, PAGE, 0x10000, 0x12345000])) for _ in range(n - 1)]
    span = n * RSIZE + sum(gaps)
    top = draw(st.integers(0, 5)) == 0
    if top:
        start = U64 - span                    # the last region ends at 2^64
    else:
        start = draw(st.sampled_from([0, PAGE, 0x100000, 0xFFFF_0000, 0x1_0000_0000]))
    gpas, cur = [], start
    for i in range(n):
        gpas.append(cur)
        cur += RSIZE + (gaps[i] if i < n - 1 else 0)
    if n > 1 and not top and draw(st.integers(0, 5)) == 0:
        gpas[0] = U64 - RSIZE    # one region ends at 2^64, another starts at 0: buffers must not wrap
        gpas[1] = 0
    return gpas


# Strategies are built once (building them per example costs more than
# running the example); values that depend on the case (region addresses,
# queue size, heads) are drawn abstractly and resolved against it.
EDGE_ADDRESSES = st.one_of(
    st.tuples(st.just("end"), st.integers(0, NSLOTS - 1), st.integers(-64, 64)),
    st.tuples(st.just("before"), st.integers(0, NSLOTS - 1), st.integers(1, 64)),
    st.tuples(st.just("abs"), st.integers(0, U64 - 1)),
    st.tuples(st.just("top"), st.integers(1, 4096)),
)
ADDRESSES = st.one_of(st.tuples(st.just("in"), st.integers(0, NSLOTS - 1), st.integers(0, RSIZE - 1)),
                      EDGE_ADDRESSES)


def resolve_address(spec: tuple, gpas: list[int]) -> int:
    kind = spec[0]
    if kind == "abs":
        return spec[1]
    if kind == "top":
        return U64 - spec[1]
    gpa = gpas[spec[1] % len(gpas)]
    if kind == "in":
        return gpa + spec[2]
    if kind == "end":
        return (gpa + RSIZE + spec[2]) % U64
    return (gpa - spec[2]) % U64


LENGTHS = st.one_of(st.integers(0, 64), st.integers(0, RSIZE + 64),
                    st.sampled_from([0, 8, 16 * 8, 16 * (MAX_INDIRECT + 1), RSIZE, 2 * RSIZE,
                                     2**31, 2**32 - 16, 2**32 - 1]))
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


def random_buffer(rnd: random.Random, gpas: list[int]) -> tuple[int, int]:
    r = rnd.randrange(len(gpas))
    length = rnd.choice([0, 1, 16, rnd.randint(1, 64), rnd.randint(1, 512)])
    if length and rnd.random() < 0.02:       # runs off the region's end (into a neighbour?)
        off = RSIZE - rnd.randint(1, length)
    else:
        off = rnd.randint(0, RSIZE - length)
    return (gpas[r] + off) % U64, length


def chain_descs(rnd: random.Random, gpas: list[int], order: list[int]) -> dict[int, list[int]]:
    """Descriptors at table positions ``order`` forming one chain, readable first."""
    split = rnd.randint(0, len(order))
    out = {}
    for k, i in enumerate(order):
        addr, length = random_buffer(rnd, gpas)
        last = k == len(order) - 1
        out[i] = [addr, length, (WRITE if k >= split else 0) | (0 if last else NEXT), 0 if last else order[k + 1]]
    return out


class Placer:
    """Random (unaligned) spots for ring structures that do not overlap
    each other, unless the case asks for overlaps."""

    def __init__(self, rnd: random.Random, nregions: int, overlap: bool) -> None:
        self.rnd, self.nregions, self.overlap = rnd, nregions, overlap
        self.taken: list[tuple[int, int, int]] = []

    def place(self, size: int) -> tuple[int, int]:
        for _ in range(50):
            r, off = self.rnd.randrange(self.nregions), self.rnd.randint(0, RSIZE - size)
            if self.overlap or all(r != tr or off + size <= to or to + ts <= off for tr, to, ts in self.taken):
                break
        self.taken.append((r, off, size))
        return r, off


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
                mutations, ops)


# ---------------------------------------------------------------- running

def load(case: Case) -> list[bytearray]:
    """Write the case into both worlds; returns the expected memory image."""
    rnd = random.Random(case.fill)
    image = [bytearray(rnd.randbytes(RSIZE) if case.fill % 3 else RSIZE) for _ in case.gpas]
    for r, off, data in case.writes:
        image[r][off:off + len(data)] = data
    for r, img in enumerate(image):
        WORLD_C.slots[r][:] = img
        WORLD_R.slots[r][:] = img
    return image


def state(ring: object) -> tuple[object, ...]:
    return (ring.num, tuple(sorted(ring.snapshot().items())))  # type: ignore[attr-defined]


def c_pop(vr: object, mem: object, max_chains: int, max_segs: int, max_bytes: int) -> PopResult:
    chains = ffi.new("struct vu_chain[]", max_chains + 1)
    segs = ffi.new("struct vu_seg[]", max_segs + 1)
    ffi.memmove(ffi.addressof(chains, max_chains), bytes([CANARY]) * ffi.sizeof("struct vu_chain"),
                ffi.sizeof("struct vu_chain"))
    ffi.memmove(ffi.addressof(segs, max_segs), bytes([CANARY]) * ffi.sizeof("struct vu_seg"),
                ffi.sizeof("struct vu_seg"))
    counts = ffi.new("uint32_t[2]")
    rc = lib.vu_vring_pop(vr, mem, chains, max_chains, segs, max_segs, max_bytes, counts, counts + 1)
    nc, ns = counts[0], counts[1]
    assert nc <= max_chains and ns <= max_segs
    assert bytes(ffi.buffer(ffi.addressof(chains, max_chains), ffi.sizeof("struct vu_chain"))) == \
        bytes([CANARY]) * ffi.sizeof("struct vu_chain")
    assert bytes(ffi.buffer(ffi.addressof(segs, max_segs), ffi.sizeof("struct vu_seg"))) == \
        bytes([CANARY]) * ffi.sizeof("struct vu_seg")
    return (rc,
            [(c.first_seg, c.nsegs, c.nread, c.out_len, c.in_len, c.head, c.ndescs) for c in chains[0:nc]],
            [(s.offset, s.len, s.region, s.flags) for s in segs[0:ns]])


def run_case(case: Case, layout: str = "split") -> dict[str, int]:
    """Returns counts: chains, segs, errors and a bit per error code seen."""
    image = load(case)
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
    cand.clear()
    ref.clear()

    # Same bytes everywhere; and only the used ring area may have changed.
    for r in range(n):
        got = bytes(WORLD_C.slots[r])
        assert got == bytes(WORLD_R.slots[r])
        expected = bytearray(image[r])
        if r == ur:
            expected[uo:uo + sizes[2]] = got[uo:uo + sizes[2]]
        assert got == bytes(expected)
    return stats


@settings(max_examples=3000, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ring_cases())
@pytest.mark.parametrize("layout", sorted(PAIRS))
def test_c_equals_reference_on_hostile_rings(layout: str, case: Case) -> None:
    run_case(case, layout)


def test_generated_rings_reach_deep() -> None:
    """The distributions are not all early errors: examples yield chains,
    multi-segment chains, and every kind of chain error."""
    totals = {"chains": 0, "segs": 0, "codes": 0}

    @seed(20261123)  # deterministic: this checks the distributions, not the code
    @settings(max_examples=1200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ring_cases(max_ops=3))
    def probe(case: Case) -> None:
        stats = run_case(case)
        totals["chains"] += stats["chains"]
        totals["segs"] += stats["segs"]
        totals["codes"] |= stats["codes"]

    probe()
    assert totals["chains"] > 200 and totals["segs"] > totals["chains"]
    missing = [ERROR_NAMES[-b] for b in range(1, 14) if not totals["codes"] & (1 << b)]
    assert not missing, missing


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
    import os

    from vuser.memory import GuestMemory, RegionSpec
    from vuser.virtqueue import VirtQueue

    image = load(case)
    runs = []
    for impl in ("native", "python"):
        mem = GuestMemory()
        try:
            for i, gpa in enumerate(case.gpas):
                fd = os.memfd_create("vuser-prop", os.MFD_CLOEXEC)
                os.pwrite(fd, bytes(image[i]), 0)
                mem.add_region(fd, RegionSpec(gpa, RSIZE, 0x7F00_0000_0000 + i * 0x100_0000, 0))
            vq = VirtQueue(mem, impl=impl, max_segs=max_segs)
            ring = [case.gpas[r] + off for r, off in case.areas]
            vq.configure(case.num, *ring, event_idx=case.event_idx, base=case.last_avail_idx)
            trace: list[object] = []
            outstanding: list[int] = []
            for op in case.ops + [("pop", 64, 256, NO_BYTE_LIMIT)]:
                if op[0] == "pop":
                    chains = vq.pop_all(max(op[1], 1), op[3])
                    trace.append([(c.head, [bytes(v) for v in c.readable], [bytes(v) for v in c.writable],
                                   c.out_len, c.in_len) for c in chains])
                    trace.append(vq.error.code if vq.error else 0)
                    assert all(v.readonly for c in chains for v in c.readable)
                    outstanding += [c.head for c in chains]
                elif op[0] == "push":
                    k = op[1]
                    vq.push([(h, op[2] & 0xFFFF) for h in outstanding[:k]])
                    del outstanding[:k]
                elif op[0] == "notify":
                    trace.append(vq.need_notify())
                elif op[0] == "notification":
                    vq.set_notification(op[1])
                elif op[0] == "pending":
                    trace.append(vq.avail_pending())
                trace.append((vq.last_avail_idx, vq.used_idx, vq.broken))
            trace.append(vq.stop())
            runs.append((trace, [bytes(r.view) for r in mem.regions]))
        finally:
            mem.clear()
    assert runs[0] == runs[1]
