"""Guest memory: the regions of a vhost-user memory table, mapped once.

Each region arrives as an fd plus (guest-physical address, size, front-end
virtual address, mmap offset).  ``GuestMemory`` maps ``[mmap_offset,
mmap_offset + size)`` of each fd shared and read-write, translates
guest-physical and front-end-virtual addresses, hands out bounds-checked
memoryviews, punches holes for the balloon, and keeps ``native`` (a cffi
``struct vu_mem *``) in step with ``regions`` for the C ring code.

Resource handling
    Every fd passed in is owned from then on: kept open while its region
    exists (for hole punching), closed when the region is removed, replaced
    or cleared, and closed at once when the call that brought it fails.
    A closed region's fd attribute becomes -1.  A mapping is unmapped when
    its region goes, unless memoryviews into it (chains a device still
    holds, a ring's areas) are alive: then it lingers, still valid, until
    the last of them is dropped, so no view ever points at unmapped memory.

Error handling
    Anything wrong with a table or an address raises ``MemoryAccessError``;
    the caller decides whether that closes the connection (a bad table) or
    is the guest's fault (a bad address in a ring).

Memory that cannot disappear (issue 9): each region's fd must be a
regular file opened read-write that holds the whole region
(``fds.require_memory_file``).  A memfd that allows it is sealed against
shrinking on receipt (F_SEAL_SHRINK; QEMU's are sealed already), so the
front-end can no longer truncate it under a mapping.  Files that cannot be
sealed are accepted: hugetlbfs and tmpfs files (DPDK, memory-backend-file
on /dev/shm) silently, any other filesystem with a warning.  An access
past a truncated end is caught by the SIGBUS guard of the C paths and the
guarded copies (``native/guard.c``, ``GuestMemory.read``/``write``) and
fails that connection, not the process.  (The pure-Python ring reads ring
memory unguarded: ``--ring python`` on unsealable memory is warned about.)
"""

from __future__ import annotations

import bisect
import fcntl
import itertools
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import cffi

from .fds import HUGETLBFS_MAGIC, TMPFS_MAGIC, FdKindError, fs_type, require_memory_file
from .rings.base import DirtyLogTarget

try:
    from vuser._native import ffi as _ffi, lib as _lib
except ImportError:  # the pure-Python ring still works
    _ffi = _lib = None

# For addresses of buffers only; works without the compiled extension.
_addr_ffi = _ffi if _ffi is not None else cffi.FFI()

_U64 = 1 << 64
# Guard owners (native/guard.h): one per memory table, so a fault names
# the connection whose front-end took memory away.
_OWNERS = itertools.count(1)

log = logging.getLogger(__name__)


class MemoryAccessError(Exception):
    """A memory table or an address that does not fit guest memory."""


@dataclass(frozen=True)
class RegionSpec:
    gpa: int          # guest-physical address of the first byte
    size: int
    uva: int          # the front-end's virtual address of the first byte
    mmap_offset: int  # where the region starts in its fd


class Region:
    """One mapped region: ``view`` is guest-physical ``[gpa, gpa + size)``."""

    def __init__(self, fd: int, spec: RegionSpec, owner: int = 0) -> None:
        """Maps the region or closes ``fd`` and raises MemoryAccessError.
        ``owner``: the guard owner its mapping is registered under."""
        self.fd = fd
        self.spec = spec
        self.host: Any = None
        self._guard = -1
        try:
            _check_spec(spec)
            require_memory_file(fd, spec.size, spec.mmap_offset)
            self.sealed = _seal_shrink(fd)
            self.fs_type = fs_type(fd)
            self.page_size = _page_size(fd)
            self._delta = spec.mmap_offset % self.page_size
            self._mmap = mmap.mmap(fd, self._delta + spec.size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=spec.mmap_offset - self._delta)
        except (OSError, ValueError, OverflowError, MemoryAccessError, FdKindError) as exc:
            self._close_fd()
            raise MemoryAccessError(f"cannot map region {_describe(spec)}: {exc}") from None
        whole = memoryview(self._mmap)
        self.view = whole[self._delta:self._delta + spec.size]
        whole.release()
        self.readonly = self.view.toreadonly()
        if _ffi is not None:
            self.host = _ffi.from_buffer("uint8_t[]", self.view)
        self.address = _address(self.view)
        if _lib is not None and owner:
            # The whole mapping, from its page-aligned start.
            self._guard = int(_lib.vu_guard_add(self.address - self._delta, self._delta + spec.size, owner))
            if self._guard < 0:
                log.warning("region %s: guard table full; a truncation of it would end the process",
                            _describe(spec))

    @property
    def gpa(self) -> int:
        return self.spec.gpa

    @property
    def size(self) -> int:
        return self.spec.size

    @property
    def uva(self) -> int:
        return self.spec.uva

    @property
    def end(self) -> int:
        return self.spec.gpa + self.spec.size

    def __repr__(self) -> str:
        return f"Region({_describe(self.spec)}, fd={self.fd})"

    def close(self) -> None:
        if self._guard >= 0:
            _lib.vu_guard_remove(self._guard)
            self._guard = -1
        if self.host is not None and _ffi is not None:
            _ffi.release(self.host)
            self.host = None
        if hasattr(self, "_mmap"):
            self.readonly.release()
            self.view.release()
            try:
                self._mmap.close()
            except BufferError:
                pass  # views into it are alive; unmapped when the last one goes
        self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _discard(self, offset: int, length: int) -> int:
        """MADV_REMOVE the whole pages inside [offset, offset + length) of
        the region; returns the bytes released."""
        start = self._delta + offset
        stop = start + length
        start = -(-start // self.page_size) * self.page_size
        stop = stop // self.page_size * self.page_size
        if stop <= start:
            return 0
        try:
            self._mmap.madvise(mmap.MADV_REMOVE, start, stop - start)
        except OSError as exc:
            raise MemoryAccessError(f"cannot discard in region {_describe(self.spec)}: {exc}") from None
        return stop - start


class GuestMemory:
    """The mapped memory table; see the module docstring."""

    MAX_REGIONS = 64

    def __init__(self) -> None:
        self._regions: tuple[Region, ...] = ()
        self._by_gpa: list[Region] = []
        self._starts: list[int] = []
        self.owner = next(_OWNERS)
        if _lib is not None:
            # (Re)install: a handler someone set after ours would take our faults.
            _lib.vu_guard_install()
        # Bumped on every change: rings re-resolve their pointers when it moves.
        self.generation = 0
        self.native: Any = _ffi.new("struct vu_mem *") if _ffi is not None else None
        # Where writes to this memory are marked while the front-end
        # migrates the guest (vuser.dirtylog); None: logging is off.
        self.dirty_log: DirtyLogTarget | None = None

    def set_dirty_log(self, log: DirtyLogTarget | None) -> None:
        """Data paths mark their writes in ``log`` from now on (C ones
        through ``native.dirty``); None: logging off."""
        self.dirty_log = log
        if self.native is not None:
            self.native.dirty = log.native if log is not None and log.native is not None else _ffi.NULL

    # ------------------------------------------------------------ the table

    @property
    def regions(self) -> tuple[Region, ...]:
        return self._regions

    def __len__(self) -> int:
        return len(self._regions)

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def add_region(self, fd: int, spec: RegionSpec) -> None:
        """ADD_MEM_REG: map one more region (takes ownership of ``fd``)."""
        region = Region(self._own(fd, ()), spec, self.owner)
        try:
            self._install(self._regions + (region,))
        except MemoryAccessError:
            region.close()
            raise

    def remove_region(self, spec: RegionSpec) -> None:
        """REM_MEM_REG: the region with this gpa and size (uva and offset
        are not compared: front-ends differ in what they send back)."""
        for region in self._regions:
            if region.gpa == spec.gpa and region.size == spec.size:
                self._install(tuple(r for r in self._regions if r is not region))
                region.close()
                return
        raise MemoryAccessError(f"no region {_describe(spec)} to remove")

    def replace(self, fds_and_specs: Iterable[tuple[int, RegionSpec]]) -> None:
        """SET_MEM_TABLE: map the whole new table, then drop the old one.
        On failure the old table stays and every fd passed is closed."""
        items = list(fds_and_specs)
        new: list[Region] = []
        try:
            for fd, spec in items:
                new.append(Region(self._own(fd, new), spec, self.owner))  # closes its fd on failure
            old = self._regions
            self._install(tuple(new))
        except BaseException:
            for region in new:
                region.close()
            for fd, _ in items[len(new) + 1:]:
                _close_quietly(fd)
            raise
        for region in old:
            region.close()

    def _own(self, fd: int, pending: Sequence[Region]) -> int:
        """An fd number already held by a region (a caller passing the same
        fd twice) is duplicated, so each region closes only its own."""
        held = {r.fd for r in self._regions} | {r.fd for r in pending}
        if fd not in held:
            return fd
        try:
            return os.dup(fd)
        except OSError as exc:
            raise MemoryAccessError(f"cannot duplicate fd {fd}: {exc}") from None

    def clear(self) -> None:
        """Unmap everything and close every fd (disconnect, reset)."""
        old = self._regions
        self._install(())
        for region in old:
            region.close()

    close = clear

    def _install(self, regions: tuple[Region, ...]) -> None:
        if len(regions) > self.MAX_REGIONS:
            raise MemoryAccessError(f"{len(regions)} regions, at most {self.MAX_REGIONS}")
        ordered = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(ordered, ordered[1:]):
            if a.end > b.gpa:
                raise MemoryAccessError(f"regions overlap: {_describe(a.spec)} and {_describe(b.spec)}")
        for r in regions:
            if r not in self._regions and not r.sealed and r.fs_type not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
                # tmpfs and hugetlbfs files cannot be sealed, and that is
                # normal (DPDK, memory-backend-file on /dev/shm); a file on
                # any other filesystem is unusual: say so, and go on (the
                # SIGBUS guard covers a truncation of it).
                log.warning("region %s: its file (filesystem %#x) cannot be sealed against shrinking; "
                            "a truncation would be caught by the SIGBUS guard", _describe(r.spec), r.fs_type)
        previous = len(self._regions)
        self._regions = regions
        self._by_gpa = ordered
        self._starts = [r.gpa for r in ordered]
        self.generation += 1
        if self.native is not None:
            n = self.native
            n.nregions = 0
            for i, r in enumerate(regions):
                e = n.regions[i]
                e.gpa, e.size, e.uva, e.host = r.gpa, r.size, r.uva, r.host
            for i in range(len(regions), previous):
                e = n.regions[i]
                e.gpa = e.size = e.uva = 0
                e.host = _ffi.NULL
            n.nregions = len(regions)

    # ------------------------------------------------------------ addresses

    def locate(self, gpa: int, length: int) -> tuple[int, int]:
        """(region index, offset in it) of ``[gpa, gpa + length)``, which
        must lie in one region."""
        for i, r in enumerate(self._regions):
            off = gpa - r.gpa
            if 0 <= off < r.size and length <= r.size - off and length >= 0:
                return i, off
        raise MemoryAccessError(f"guest range {gpa:#x}+{length:#x} is not inside one region")

    def gpa_view(self, gpa: int, length: int, *, writable: bool = False) -> memoryview:
        """A view of guest-physical ``[gpa, gpa + length)`` (no copy)."""
        i, off = self.locate(gpa, length)
        r = self._regions[i]
        return (r.view if writable else r.readonly)[off:off + length]

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Front-end virtual address (SET_VRING_ADDR) to guest-physical;
        ``[uva, uva + length)`` must lie in one region."""
        for r in self._regions:
            off = uva - r.uva
            if 0 <= off < r.size and 0 <= length <= r.size - off:
                return r.gpa + off
        raise MemoryAccessError(f"front-end range {uva:#x}+{length:#x} is not inside one region")

    # ------------------------------------------------------------ balloon

    def discard(self, gpa: int, length: int) -> int:
        """Give the whole pages inside ``[gpa, gpa + length)`` back to the
        host (MADV_REMOVE: punches a hole in the shared memfd / shmem file;
        the guest reads zeroes there afterwards).  The range may cross from
        one region into an adjacent one but must lie in guest memory.
        Returns the bytes released."""
        if length < 0:
            raise MemoryAccessError(f"negative length {length}")
        pieces: list[tuple[Region, int, int]] = []
        cur, end = gpa, gpa + length
        while cur < end:
            r = self._region_at(cur)
            if r is None:
                raise MemoryAccessError(f"guest range {gpa:#x}+{length:#x} is not in guest memory")
            stop = min(end, r.end)
            pieces.append((r, cur - r.gpa, stop - cur))
            cur = stop
        return sum(r._discard(off, n) for r, off, n in pieces)

    def discard_views(self, views: Sequence[memoryview]) -> int:
        """``discard`` for views handed out by this memory (a chain's
        buffers, e.g. free page reports).  Returns the bytes released."""
        released = 0
        for v in views:
            if not v.nbytes:
                continue
            addr = _address(v)
            for r in self._regions:
                off = addr - r.address
                if 0 <= off and off + v.nbytes <= r.size:
                    released += r._discard(off, v.nbytes)
                    break
            else:
                raise MemoryAccessError("view is not inside guest memory")
        return released

    def ram_pieces(self, gpa: int, length: int) -> Iterator[tuple[int, int]]:
        """The parts of guest-physical ``[gpa, gpa + length)`` that are in
        guest memory, as (gpa, length), in address order."""
        end = gpa + length
        i = max(bisect.bisect_right(self._starts, gpa) - 1, 0)
        for r in self._by_gpa[i:]:
            if r.gpa >= end:
                break
            lo, hi = max(gpa, r.gpa), min(end, r.end)
            if hi > lo:
                yield lo, hi - lo

    # ------------------------------------------------------------ guarded access

    @property
    def faulted(self) -> bool:
        """Did an access to this memory fault (SIGBUS: the front-end shrank
        a region's file under its mapping)?"""
        return _lib is not None and bool(_lib.vu_guard_owner_faulted(self.owner))

    def write(self, view: memoryview, data: bytes | memoryview) -> None:
        """Copy ``data`` into ``view`` (a view handed out by this memory)
        under the SIGBUS guard: MemoryAccessError if the region shrank."""
        if len(data) > len(view):
            raise ValueError(f"{len(data)} bytes do not fit a {len(view)}-byte buffer")
        if not len(data):
            return
        if _lib is None:
            view[:len(data)] = data
            return
        _guarded_copy(view, data)

    def read(self, view: memoryview) -> bytes:
        """The bytes of ``view`` (a view handed out by this memory), read
        under the SIGBUS guard: MemoryAccessError if the region shrank."""
        return guarded_read(view)

    def _region_at(self, gpa: int) -> Region | None:
        for r in self._regions:
            if 0 <= gpa - r.gpa < r.size:
                return r
        return None


def _check_spec(spec: RegionSpec) -> None:
    if spec.size <= 0:
        raise MemoryAccessError("size 0")
    if spec.gpa < 0 or spec.gpa + spec.size > _U64:
        raise MemoryAccessError("guest-physical range wraps 2^64")
    if spec.uva < 0 or spec.uva + spec.size > _U64:
        raise MemoryAccessError("front-end virtual range wraps 2^64")
    if spec.mmap_offset < 0:
        raise MemoryAccessError("negative mmap offset")


def _seal_shrink(fd: int) -> bool:
    """Seal a memfd against shrinking (grow stays allowed); True if the
    file cannot shrink now.  False for files that cannot be sealed."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd (tmpfs or hugetlbfs file, plain file)
        return False
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:  # created without MFD_ALLOW_SEALING, or F_SEAL_SEAL set
        return False
    return True


def _page_size(fd: int) -> int:
    """The fd's page size: hugetlbfs reports its huge page size here."""
    try:
        bsize = os.fstatvfs(fd).f_bsize
    except OSError:
        return mmap.PAGESIZE
    if bsize > mmap.PAGESIZE and bsize % mmap.PAGESIZE == 0 and bsize <= 1 << 30:
        return bsize
    return mmap.PAGESIZE


def _address(view: memoryview) -> int:
    buf = _addr_ffi.from_buffer(view)
    try:
        return int(_addr_ffi.cast("uintptr_t", buf))
    finally:
        _addr_ffi.release(buf)


def _describe(spec: RegionSpec) -> str:
    return f"gpa {spec.gpa:#x} size {spec.size:#x} uva {spec.uva:#x} offset {spec.mmap_offset:#x}"


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def guarded_read(view: memoryview) -> bytes:
    """The bytes of ``view`` (of a mapping a ``Region`` guards), copied
    under the SIGBUS guard: MemoryAccessError if its file shrank."""
    if _lib is None or not len(view):
        return bytes(view)
    out = bytearray(len(view))
    _guarded_copy(out, view)
    return bytes(out)


def _guarded_copy(dst: memoryview | bytearray, src: bytes | bytearray | memoryview) -> None:
    """len(src) bytes from src to dst with the SIGBUS guard armed (native.guard)."""
    assert _lib is not None
    d = _ffi.from_buffer(dst, require_writable=True)
    s = _ffi.from_buffer(src)
    try:
        rc = _lib.vu_guard_copy(d, s, len(src))
    finally:
        _ffi.release(d)
        _ffi.release(s)
    if rc:
        raise MemoryAccessError("guest memory faulted: the front-end shrank a region under its mapping")
