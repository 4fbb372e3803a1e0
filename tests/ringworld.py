"""The memory world of the ring property tests (test_ring_property.py,
test_packed_property.py): up to NSLOTS guest regions, the C copy fenced by
PROT_NONE guard pages, and the generators of region layouts, addresses and
lengths both layouts draw from.

No access outside the regions: the C copy's regions sit between PROT_NONE
guard pages (a stray read or write kills the test run with SIGSEGV), and
``c_pop`` gives the C pop output arrays with a canary entry past their
limits.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from dataclasses import dataclass

import pytest
from typing import Any, Callable, Iterable

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from vuser.dirtylog import LOG_PAGE, BitmapLog
from vuser.rings.errors import ERROR_NAMES
from vuser.rings.base import MAX_INDIRECT, NO_BYTE_LIMIT, PopResult

# Hostile rings per property test: 3000 in CI; more by hand, e.g.
# VUSER_RING_EXAMPLES=30000 python -m pytest tests/test_packed_property.py
HOSTILE_EXAMPLES = int(os.environ.get("VUSER_RING_EXAMPLES", "3000"))

native = pytest.importorskip("vuser._native")
ffi, lib = native.ffi, native.lib

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


def load(gpas: list[int], fill: int, writes: list[tuple[int, int, bytes]]) -> list[bytearray]:
    """Write a case into both worlds: background bytes from ``fill`` (0 mod
    3: zeroes), then ``writes`` (region, offset, data) in order.  Returns
    the expected memory image."""
    rnd = random.Random(fill)
    image = [bytearray(rnd.randbytes(RSIZE) if fill % 3 else RSIZE) for _ in gpas]
    for r, off, data in writes:
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
def random_buffer(rnd: random.Random, gpas: list[int]) -> tuple[int, int]:
    r = rnd.randrange(len(gpas))
    length = rnd.choice([0, 1, 16, rnd.randint(1, 64), rnd.randint(1, 512)])
    if length and rnd.random() < 0.02:       # runs off the region's end (into a neighbour?)
        off = RSIZE - rnd.randint(1, length)
    else:
        off = rnd.randint(0, RSIZE - length)
    return (gpas[r] + off) % U64, length


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




def facade_runs(gpas: list[int], fill: int, writes: list[tuple[int, int, bytes]],
                areas: list[tuple[int, int]], num: int, ops: list[tuple], *, layout: str,
                max_segs: int | None, **configure: object) -> list[object]:
    """Run ``ops`` through VirtQueue(impl="native") and VirtQueue(impl="python")
    over real memfd GuestMemory holding the case: the traces (chains with
    their bytes, errors, indexes, notify decisions) and the final memory
    of each, to be compared."""

    from vuser.memory import GuestMemory, RegionSpec
    from vuser.virtqueue import VirtQueue

    image = load(gpas, fill, writes)
    runs: list[object] = []
    for impl in ("native", "python"):
        mem = GuestMemory()
        try:
            for i, gpa in enumerate(gpas):
                fd = os.memfd_create("vuser-prop", os.MFD_CLOEXEC)
                os.pwrite(fd, bytes(image[i]), 0)
                mem.add_region(fd, RegionSpec(gpa, RSIZE, 0x7F00_0000_0000 + i * 0x100_0000, 0))
            vq = VirtQueue(mem, impl=impl, layout=layout, max_segs=max_segs)
            ring = [gpas[r] + off for r, off in areas]
            trace: list[object] = []
            try:
                vq.configure(num, *ring, **configure)  # type: ignore[arg-type]
            except ValueError as exc:
                trace.append(str(exc))
            outstanding: list[int] = []
            for op in ops + [("pop", 64, 256, NO_BYTE_LIMIT)]:
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
    return runs


# ---------------------------------------------------------------- dirty logging

# (bitmap bytes, log at the areas' own addresses?, used log address, desc
# log address): the log covers a few pages, or every region but those
# near 2^64; the log addresses are the areas' (what QEMU sends) or any.
LOG_SIZES = [1, 64, (1 << 17) + 64]
LOGS = st.one_of(st.none(), st.tuples(st.sampled_from(LOG_SIZES), st.booleans(), ADDRESSES, ADDRESSES))


class CLog:
    """A ``struct vu_log`` over its own bitmap, as a ring's dirty log target."""

    def __init__(self, size: int) -> None:
        self.bitmap = ffi.new("uint8_t[]", size)
        self.native = ffi.new("struct vu_log *")
        self.native.bitmap, self.native.size = self.bitmap, size
        self.size = size

    def write(self, gpa: int, length: int) -> None:
        assert lib.vu_log_write(self.native, gpa, length) == 0


class LogPair:
    """One dirty log configuration, for the C ring and for the reference:
    they must end up with the same bits and the same counters."""

    def __init__(self, spec: tuple, gpas: list[int], used_gpa: int, desc_gpa: int) -> None:
        size, own, used_spec, desc_spec = spec
        self.c, self.ref = CLog(size), BitmapLog(bytearray(size))
        self.own = own
        self.used = used_gpa if own else resolve_address(used_spec, gpas)
        self.desc = desc_gpa if own else resolve_address(desc_spec, gpas)

    def attach(self, cand: object, ref: object) -> None:
        cand.set_log(self.c, self.used, self.desc)  # type: ignore[attr-defined]
        ref.set_log(self.ref, self.used, self.desc)  # type: ignore[attr-defined]

    def check_same(self) -> None:
        assert bytes(ffi.buffer(self.c.bitmap, self.c.size)) == bytes(self.ref.bitmap)
        assert (self.c.native.updates, self.c.native.outside) == (self.ref.updates, self.ref.outside)

    def check_covers(self, gpas: list[int], image: list[bytearray]) -> None:
        """With the areas' own log addresses, every byte the ring changed
        lies in a page whose bit is set (pages the log covers)."""
        if not self.own:
            return
        bits = bytes(self.ref.bitmap)
        for r, gpa in enumerate(gpas):
            now = bytes(WORLD_R.slots[r])
            if now == image[r]:
                continue
            for off in (i for i in range(RSIZE) if now[i] != image[r][i]):
                page = (gpa + off) // LOG_PAGE
                if page < 8 * len(bits):
                    assert bits[page >> 3] >> (page & 7) & 1, f"page {page:#x} written, not logged"


def finish_case(cand: object, ref: object, logs: LogPair | None, gpas: list[int], image: list[bytearray],
                changeable: list[tuple[int, int, int]]) -> None:
    """The end of a property case: both rings cleared, the log covers what
    changed, and the regions are byte-equal in both worlds and to the image
    they started from except in ``changeable`` (region, offset, size)."""
    cand.clear()  # type: ignore[attr-defined]
    ref.clear()  # type: ignore[attr-defined]
    if logs is not None:
        logs.check_covers(gpas, image)
    for r in range(len(gpas)):
        got = bytes(WORLD_C.slots[r])
        assert got == bytes(WORLD_R.slots[r])
        expected = bytearray(image[r])
        for region, offset, size in changeable:
            if region == r:
                expected[offset:offset + size] = got[offset:offset + size]
        assert got == bytes(expected)


def check_generator_reaches_deep(run_case: Callable[[Any], dict[str, int]], cases: st.SearchStrategy[Any], *,
                                 seed_value: int, examples: int, errors: Iterable[int]) -> None:
    """The generated cases are not all early errors: over ``examples``
    deterministic draws (``seed_value``: this checks the distributions, not
    the code) they yield chains, multi-segment chains, and every chain
    error in ``errors`` (bit numbers of ``run_case``'s ``codes``)."""
    totals = {"chains": 0, "segs": 0, "codes": 0}

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases)
    def probe(case: Any) -> None:
        stats = run_case(case)
        for k in ("chains", "segs"):
            totals[k] += stats[k]
        totals["codes"] |= stats["codes"]

    probe()
    assert totals["chains"] > 200 and totals["segs"] > totals["chains"]
    missing = [ERROR_NAMES[-b] for b in errors if not totals["codes"] & (1 << b)]
    assert not missing, missing
