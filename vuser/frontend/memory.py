"""Guest memory for the front-end harness: memfd-backed regions shaped like QEMU's.

A real front-end hands the back-end a memory table: per region its
guest-physical address, its size, the address of the region in the
*front-end's* virtual address space (``userspace_addr``, which is what
SET_VRING_ADDR uses) and an fd plus ``mmap_offset`` into that fd.  The
harness reproduces the shapes that catch back-end bugs:

* several regions with gaps between their guest-physical ranges (QEMU's q35
  puts a hole at 0xa0000-0xc0000, so a 512 MiB guest has two regions);
* one memfd shared by all regions, each region at a different, non-zero
  ``mmap_offset`` (QEMU with ``memory-backend-memfd``), or one memfd per
  region with a leading pad so its ``mmap_offset`` is not 0 either;
* fake front-end virtual addresses that differ from the guest-physical ones
  and from region to region (a back-end mixing them up reads garbage or
  faults), or ``identity=True`` where they are equal (DPDK's virtio_user).

The harness itself maps every memfd so the driver side can write rings and
buffers.  Nothing here keeps a memoryview on a mapping: reads copy, writes
assign, so ``close()`` can always unmap.

Resource handling: ``GuestRam`` owns its fds and mappings; ``close()``
(or leaving its ``with`` block) closes them and sets the fds to -1.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from vuser.dirtylog import LOG_PAGE

PAGE_SIZE = mmap.PAGESIZE

# q35's low-memory hole: RAM below 0xa0000, VGA/ROM window up to 0xc0000.
Q35_LOW_END = 0xA0000
Q35_HOLE_END = 0xC0000
# Regions beyond the second one start above 4 GiB, one every 4 GiB, so
# every region is separated from the next by a gap.
HIGH_REGION_BASE = 1 << 32
HIGH_REGION_STRIDE = 1 << 32
# Fake front-end virtual addresses: a QEMU-looking user-space address, a
# different base per fd (separate mode) so regions never look contiguous.
UVA_BASE = 0x7F3A_4000_0000
UVA_STRIDE = 0x10_0000_0000


class GuestRamError(Exception):
    """An address or range that no region covers (or that crosses a gap)."""


@dataclass(frozen=True)
class RamRegionSpec:
    """Requested shape of one region; ``mmap_offset`` None picks one."""

    gpa: int
    size: int
    mmap_offset: int | None = None


@dataclass
class RamRegion:
    """One guest memory region as the memory table describes it."""

    index: int
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int
    _map: mmap.mmap = field(repr=False)
    _map_base: int = field(repr=False)  # offset of the region inside _map

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def table_entry(self) -> dict[str, int]:
        """The region as a VhostUserMemoryRegion (wire.MemoryRegion) dict."""
        return {
            "guest_phys_addr": self.gpa,
            "memory_size": self.size,
            "userspace_addr": self.uva,
            "mmap_offset": self.mmap_offset,
        }


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def default_layout(size: int, regions: int = 2) -> list[RamRegionSpec]:
    """QEMU-q35-like region layout for ``size`` bytes of RAM.

    One region: [0, size).  Two: [0, 0xa0000) and [0xc0000, size) with
    file offsets equal to the guest-physical addresses (QEMU's RAM block
    keeps the hole in the file).  More: the RAM above the hole is split into
    page-aligned pieces, the first at 0xc0000, the others above 4 GiB,
    4 GiB apart; file offsets stay consecutive.
    """
    if regions < 1:
        raise ValueError("at least one region")
    if regions == 1:
        return [RamRegionSpec(0, size, 0)]
    if size < Q35_HOLE_END + (regions - 1) * PAGE_SIZE:
        raise ValueError(f"{size} bytes is too small for {regions} regions")
    specs = [RamRegionSpec(0, Q35_LOW_END, 0)]
    rest = size - Q35_HOLE_END
    if regions == 2:
        specs.append(RamRegionSpec(Q35_HOLE_END, rest, Q35_HOLE_END))
        return specs
    chunk = (rest // (regions - 1)) & ~(PAGE_SIZE - 1)
    offset = Q35_HOLE_END
    specs.append(RamRegionSpec(Q35_HOLE_END, chunk, offset))
    offset += chunk
    for k in range(2, regions):
        length = chunk if k < regions - 1 else size - offset
        specs.append(RamRegionSpec(HIGH_REGION_BASE + (k - 2) * HIGH_REGION_STRIDE, length, offset))
        offset += length
    return specs


class _Allocator:
    """First-fit allocator over one region's guest-physical range."""

    def __init__(self, start: int, end: int) -> None:
        self.free: list[tuple[int, int]] = [(start, end)]

    def alloc(self, size: int, align: int) -> int | None:
        for i, (lo, hi) in enumerate(self.free):
            base = _align_up(lo, align)
            if base + size <= hi:
                pieces = [(lo, base)] if base > lo else []
                if base + size < hi:
                    pieces.append((base + size, hi))
                self.free[i:i + 1] = pieces
                return base
        return None

    def release(self, start: int, size: int) -> None:
        self.free.append((start, start + size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in self.free:
            if merged and merged[-1][1] >= lo:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self.free = merged


class GuestRam:
    """memfd-backed guest RAM split into regions; see the module docstring."""

    def __init__(self) -> None:
        self.regions: list[RamRegion] = []
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        self._allocators: dict[int, _Allocator] = {}
        self._allocations: dict[int, tuple[int, int]] = {}  # gpa -> (region index, size)
        self._next_region = 0
        self._rr = 0
        self.identity = False
        self.sealable = True
        self.closed = False
        # Pages the driver side wrote while tracking (``track_writes``).
        self.written: set[int] | None = None

    # ---------------------------------------------------------- creation

    @classmethod
    def create(cls, size: int, *, regions: int = 2, layout: Sequence[RamRegionSpec] | None = None,
               separate_fds: bool = False, identity: bool = False, gpa_base: int = 0,
               sealable: bool = True, name: str = "vuser-guest-ram") -> GuestRam:
        """Create guest RAM of ``size`` bytes (ignored when ``layout`` is given).

        ``separate_fds``: one memfd per region, each with ``index`` leading
        pages so ``mmap_offset`` is non-zero from the second region on.
        ``identity``: front-end virtual address == guest-physical address
        (DPDK's virtio_user); otherwise QEMU-like distinct addresses.
        ``gpa_base`` shifts the default layout (DPDK's addresses start at
        its base-virtaddr, not at 0).  ``sealable``: memfds that allow
        seals, as QEMU makes them (False: like a tmpfs or hugetlbfs file,
        which a back-end cannot seal against shrinking).
        """
        if layout is not None:
            specs = list(layout)
        else:
            specs = [RamRegionSpec(s.gpa + gpa_base, s.size, s.mmap_offset)
                     for s in default_layout(size, regions)]
        _check_specs(specs)
        mem = cls()
        mem.identity = identity
        mem.sealable = sealable
        try:
            if separate_fds:
                for spec in specs:
                    mem._add_separate(spec, name)
            else:
                mem._add_shared(specs, name)
        except BaseException:
            mem.close()
            raise
        return mem

    def _add_shared(self, specs: Sequence[RamRegionSpec], name: str) -> None:
        offsets = []
        pos = 0
        for spec in specs:
            off = spec.mmap_offset if spec.mmap_offset is not None else _align_up(pos, PAGE_SIZE)
            offsets.append(off)
            pos = off + spec.size
        file_size = _align_up(max(o + s.size for o, s in zip(offsets, specs)), PAGE_SIZE)
        fd = self._new_memfd(name, file_size)
        mm = mmap.mmap(fd, file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._maps.append(mm)
        for spec, off in zip(specs, offsets):
            uva = spec.gpa if self.identity else UVA_BASE + off
            self._append(spec.gpa, spec.size, uva, off, fd, mm, off)

    def _add_separate(self, spec: RamRegionSpec, name: str) -> RamRegion:
        index = self._next_region
        pad = spec.mmap_offset if spec.mmap_offset is not None else index * PAGE_SIZE
        file_size = _align_up(pad + spec.size, PAGE_SIZE)
        fd = self._new_memfd(f"{name}-{index}", file_size)
        mm = mmap.mmap(fd, file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._maps.append(mm)
        uva = spec.gpa if self.identity else UVA_BASE + index * UVA_STRIDE + pad
        return self._append(spec.gpa, spec.size, uva, pad, fd, mm, pad)

    def _new_memfd(self, name: str, size: int) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if self.sealable else 0))
        self._fds.append(fd)
        os.ftruncate(fd, size)
        return fd

    def _append(self, gpa: int, size: int, uva: int, mmap_offset: int, fd: int,
                mm: mmap.mmap, map_base: int) -> RamRegion:
        region = RamRegion(self._next_region, gpa, size, uva, mmap_offset, fd, mm, map_base)
        self._next_region += 1
        self.regions.append(region)
        self._allocators[region.index] = _Allocator(gpa, gpa + size)
        return region

    def add_region(self, size: int, gpa: int | None = None) -> RamRegion:
        """Hot-add a region with its own memfd (for ADD_MEM_REG and for
        DPDK-style growing tables).  By default it goes 4 GiB above the
        highest region, so a gap separates it from the others."""
        if gpa is None:
            top = max((r.gpa_end for r in self.regions), default=0)
            gpa = _align_up(top + 1, HIGH_REGION_STRIDE) if top else 0
        spec = RamRegionSpec(gpa, _align_up(size, PAGE_SIZE))
        _check_specs([*(RamRegionSpec(r.gpa, r.size, 0) for r in self.regions), spec])
        return self._add_separate(spec, "vuser-guest-ram-hot")

    def remove_region(self, index: int) -> RamRegion:
        """Forget a region (its allocations too).  Its fd and mapping stay
        open until ``close()``, so a REM_MEM_REG can still name it."""
        region = self.region(index)
        self.regions.remove(region)
        del self._allocators[index]
        for gpa in [g for g, (ri, _) in self._allocations.items() if ri == index]:
            del self._allocations[gpa]
        return region

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for mm in self._maps:
            mm.close()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._maps.clear()
        self._fds.clear()
        for r in self.regions:
            r.fd = -1

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------- lookup

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def region(self, index: int) -> RamRegion:
        for r in self.regions:
            if r.index == index:
                return r
        raise GuestRamError(f"no region with index {index}")

    def table(self) -> list[dict[str, int]]:
        """The memory table entries in region order (wire.MemoryRegion dicts)."""
        return [r.table_entry() for r in self.regions]

    def fds(self) -> list[int]:
        """One fd per region, in table order (the same fd repeats when the
        regions share a memfd, exactly as QEMU sends them)."""
        return [r.fd for r in self.regions]

    def region_of(self, gpa: int, length: int = 1) -> RamRegion:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa_end:
                return r
        raise GuestRamError(f"guest-physical range {gpa:#x}+{length:#x} is not inside one region")

    def gpa_to_uva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uva + (gpa - r.gpa)

    def uva_to_gpa(self, uva: int) -> int:
        for r in self.regions:
            if r.uva <= uva < r.uva + r.size:
                return r.gpa + (uva - r.uva)
        raise GuestRamError(f"front-end virtual address {uva:#x} is not in any region")

    def _locate(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        if self.closed:
            raise GuestRamError("guest memory is closed")
        r = self.region_of(gpa, max(length, 1))
        return r._map, r._map_base + (gpa - r.gpa)

    # ---------------------------------------------------------- access

    def track_writes(self, on: bool = True) -> set[int]:
        """Record the guest-physical pages (dirty log pages, 4 KiB, by
        number) the driver side writes from now
        on (``on=False``: stop) -- what a hypervisor's own dirty tracking
        sees of the guest's CPUs during a migration.  Returns the set that
        fills up (``written``)."""
        self.written = set() if on else None
        return self.written if self.written is not None else set()

    def _wrote(self, gpa: int, length: int) -> None:
        if self.written is not None and length:
            self.written.update(range(gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE + 1))

    def read(self, gpa: int, length: int) -> bytes:
        mm, off = self._locate(gpa, length)
        return mm[off:off + length]

    def write(self, gpa: int, data: bytes) -> None:
        mm, off = self._locate(gpa, len(data))
        mm[off:off + len(data)] = data
        self._wrote(gpa, len(data))

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    def pack(self, fmt: str, gpa: int, *values: int) -> None:
        size = struct.calcsize(fmt)
        mm, off = self._locate(gpa, size)
        struct.pack_into(fmt, mm, off, *values)
        self._wrote(gpa, size)

    def unpack(self, fmt: str, gpa: int) -> tuple[Any, ...]:
        mm, off = self._locate(gpa, struct.calcsize(fmt))
        return struct.unpack_from(fmt, mm, off)

    # ---------------------------------------------------------- allocation

    def alloc(self, size: int, align: int = 8, *, region: int | None = None) -> int:
        """Allocate ``size`` bytes of guest memory inside one region; returns
        the guest-physical address.  Without ``region`` the regions are
        tried round-robin so consecutive buffers land in different regions."""
        size = max(size, 1)
        if region is not None:
            order = [region]
        else:
            idx = [r.index for r in self.regions]
            start = self._rr % len(idx) if idx else 0
            order = idx[start:] + idx[:start]
            self._rr += 1
        for ri in order:
            alloc = self._allocators.get(ri)
            if alloc is None:
                raise GuestRamError(f"no region with index {ri}")
            gpa = alloc.alloc(size, align)
            if gpa is not None:
                self._allocations[gpa] = (ri, size)
                return gpa
        raise GuestRamError(f"out of guest memory: no region has {size} free bytes")

    def free(self, gpa: int) -> None:
        try:
            ri, size = self._allocations.pop(gpa)
        except KeyError:
            raise GuestRamError(f"{gpa:#x} was not allocated") from None
        self._allocators[ri].release(gpa, size)

    def largest_region(self) -> int:
        return max(self.regions, key=lambda r: r.size).index


def _check_specs(specs: Sequence[RamRegionSpec]) -> None:
    if not specs:
        raise ValueError("no regions")
    ordered = sorted(specs, key=lambda s: s.gpa)
    for spec in ordered:
        if spec.size <= 0:
            raise ValueError(f"region at {spec.gpa:#x} has size {spec.size}")
        if spec.mmap_offset is not None and spec.mmap_offset % PAGE_SIZE:
            raise ValueError(f"mmap_offset {spec.mmap_offset:#x} is not page-aligned")
    for a, b in zip(ordered, ordered[1:]):
        if a.gpa + a.size > b.gpa:
            raise ValueError(f"regions at {a.gpa:#x} and {b.gpa:#x} overlap")
