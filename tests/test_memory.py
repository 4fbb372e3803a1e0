"""GuestMemory over real memfds: mapping, translation, bounds, fd ownership,
hole punching."""

from __future__ import annotations

import mmap
import os

import pytest

from vuser.memory import GuestMemory, MemoryAccessError, RegionSpec

PAGE = mmap.PAGESIZE


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("vuser-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def mem():
    m = GuestMemory()
    yield m
    m.clear()


def test_map_read_write_through_the_file(mem: GuestMemory) -> None:
    fd = memfd(4 * PAGE, bytes(range(256)) * 16)
    mem.add_region(fd, RegionSpec(gpa=0x10000, size=4 * PAGE, uva=0x7F0000000000, mmap_offset=0))
    assert len(mem) == 1
    assert bytes(mem.gpa_view(0x10000 + 5, 3)) == bytes([5, 6, 7])
    mem.gpa_view(0x10000 + PAGE, 4, writable=True)[:] = b"abcd"
    assert os.pread(fd, 4, PAGE) == b"abcd"  # MAP_SHARED: the front-end sees it
    with pytest.raises(TypeError):
        mem.gpa_view(0x10000, 4)[:] = b"nope"  # read-only unless asked


def test_unaligned_mmap_offset(mem: GuestMemory) -> None:
    data = os.urandom(3 * PAGE)
    fd = memfd(3 * PAGE, data)
    off = PAGE + 100
    mem.add_region(fd, RegionSpec(gpa=0x4000, size=PAGE, uva=0x1000, mmap_offset=off))
    assert bytes(mem.gpa_view(0x4000, PAGE)) == data[off:off + PAGE]
    assert mem.regions[0].view.nbytes == PAGE


def test_translation_and_bounds(mem: GuestMemory) -> None:
    mem.add_region(memfd(2 * PAGE), RegionSpec(0x0, 2 * PAGE, 0x7000_0000, 0))
    mem.add_region(memfd(PAGE), RegionSpec(2 * PAGE, PAGE, 0x9000_0000, 0))  # adjacent in gpa
    mem.add_region(memfd(PAGE), RegionSpec(0x100000, PAGE, 0xA000_0000, 0))  # after a gap
    assert mem.uva_to_gpa(0x7000_0010, 16) == 0x10
    assert mem.uva_to_gpa(0x9000_0000, PAGE) == 2 * PAGE
    assert mem.uva_to_gpa(0xA000_0FF0, 16) == 0x100FF0
    assert mem.locate(0x100010, 8) == (2, 0x10)
    for bad_uva, length in ((0x7000_0000 - 1, 1), (0x7000_0000 + 2 * PAGE - 8, 16), (0x1234, 1)):
        with pytest.raises(MemoryAccessError):
            mem.uva_to_gpa(bad_uva, length)
    # A view never spans regions, even adjacent ones, and never leaves memory.
    with pytest.raises(MemoryAccessError):
        mem.gpa_view(2 * PAGE - 4, 8)
    with pytest.raises(MemoryAccessError):
        mem.gpa_view(3 * PAGE, 1)
    with pytest.raises(MemoryAccessError):
        mem.gpa_view(0x100000 + PAGE - 1, 2)
    with pytest.raises(MemoryAccessError):
        mem.gpa_view(-1, 1)
    assert len(mem.gpa_view(0x100000 + PAGE - 1, 1)) == 1


def test_native_table_follows_regions(mem: GuestMemory) -> None:
    if mem.native is None:
        pytest.skip("vuser._native not built")
    from vuser._native import ffi
    mem.add_region(memfd(PAGE), RegionSpec(0x1000, PAGE, 0x5000, 0))
    mem.add_region(memfd(PAGE), RegionSpec(0x8000, PAGE, 0x6000, 0))
    g = mem.generation
    mem.remove_region(RegionSpec(0x1000, PAGE, 0x5000, 0))
    assert mem.generation > g
    n = mem.native
    assert n.nregions == 1
    assert (n.regions[0].gpa, n.regions[0].size, n.regions[0].uva) == (0x8000, PAGE, 0x6000)
    assert int(ffi.cast("uintptr_t", n.regions[0].host)) == mem.regions[0].address
    assert n.regions[1].host == ffi.NULL
    mem.clear()
    assert n.nregions == 0


def test_overlap_and_limits_close_the_fd(mem: GuestMemory) -> None:
    mem.add_region(memfd(2 * PAGE), RegionSpec(0x10000, 2 * PAGE, 0, 0))
    fd = memfd(PAGE)
    with pytest.raises(MemoryAccessError, match="overlap"):
        mem.add_region(fd, RegionSpec(0x10000 + PAGE, PAGE, 0x100000, 0))
    assert is_closed(fd)
    fd = memfd(PAGE)
    with pytest.raises(MemoryAccessError):  # mapping past the end of the file
        mem.add_region(fd, RegionSpec(0x40000, PAGE, 0, PAGE))
    assert is_closed(fd)
    for spec in (RegionSpec(0x50000, 0, 0, 0), RegionSpec((1 << 64) - PAGE + 1, PAGE, 0, 0)):
        fd = memfd(PAGE)
        with pytest.raises(MemoryAccessError):
            mem.add_region(fd, spec)
        assert is_closed(fd)
    assert len(mem) == 1


def test_at_most_max_regions(mem: GuestMemory) -> None:
    fds = [memfd(PAGE) for _ in range(GuestMemory.MAX_REGIONS + 1)]
    for i, fd in enumerate(fds[:-1]):
        mem.add_region(fd, RegionSpec(i * 2 * PAGE, PAGE, 0, 0))
    with pytest.raises(MemoryAccessError):
        mem.add_region(fds[-1], RegionSpec(1 << 40, PAGE, 0, 0))
    assert is_closed(fds[-1])
    assert len(mem) == GuestMemory.MAX_REGIONS
    mem.clear()
    assert all(is_closed(fd) for fd in fds)


def test_remove_closes_fd(mem: GuestMemory) -> None:
    a, b = memfd(PAGE), memfd(PAGE)
    mem.add_region(a, RegionSpec(0x0, PAGE, 0x1000, 0))
    mem.add_region(b, RegionSpec(0x10000, PAGE, 0x2000, 0))
    with pytest.raises(MemoryAccessError):
        mem.remove_region(RegionSpec(0x0, 2 * PAGE, 0x1000, 0))
    region = mem.regions[0]
    mem.remove_region(RegionSpec(0x0, PAGE, 0x1000, 0))
    assert is_closed(a) and region.fd == -1
    assert not is_closed(b)
    assert [r.gpa for r in mem.regions] == [0x10000]


def test_replace_is_atomic(mem: GuestMemory) -> None:
    old = memfd(PAGE)
    mem.add_region(old, RegionSpec(0x0, PAGE, 0x1000, 0))
    # A bad new table (overlapping) leaves the old one and closes every new fd.
    bad = [(memfd(PAGE), RegionSpec(0x0, PAGE, 0, 0)), (memfd(PAGE), RegionSpec(0x800, PAGE, 0, 0))]
    with pytest.raises(MemoryAccessError):
        mem.replace(bad)
    assert all(is_closed(fd) for fd, _ in bad)
    assert not is_closed(old) and len(mem) == 1
    # A region failing to map: it and the ones after it are closed too.
    bad = [(memfd(PAGE), RegionSpec(0x0, PAGE, 0, 0)), (memfd(PAGE), RegionSpec(0x8000, PAGE, 0, PAGE)),
           (memfd(PAGE), RegionSpec(0x20000, PAGE, 0, 0))]
    with pytest.raises(MemoryAccessError):
        mem.replace(bad)
    assert all(is_closed(fd) for fd, _ in bad)
    assert not is_closed(old)
    new = [(memfd(PAGE), RegionSpec(0x0, PAGE, 0, 0)), (memfd(2 * PAGE), RegionSpec(0x4000, 2 * PAGE, 0, 0))]
    mem.replace(new)
    assert is_closed(old)
    assert not any(is_closed(fd) for fd, _ in new)
    assert [r.size for r in mem.regions] == [PAGE, 2 * PAGE]


def test_same_fd_twice_is_owned_twice(mem: GuestMemory) -> None:
    """Each region owns a distinct fd, so no close can hit another file."""
    fd = memfd(4 * PAGE)
    mem.replace([(fd, RegionSpec(0, PAGE, 0, 0)), (fd, RegionSpec(0x10000, PAGE, 0, 2 * PAGE))])
    a, b = mem.regions
    assert a.fd == fd and b.fd != fd and os.path.samestat(os.fstat(a.fd), os.fstat(b.fd))
    mem.remove_region(RegionSpec(0, PAGE, 0, 0))
    assert is_closed(fd) and not is_closed(b.fd)


def test_clear_then_reuse(mem: GuestMemory) -> None:
    fds = [memfd(PAGE) for _ in range(3)]
    for i, fd in enumerate(fds):
        mem.add_region(fd, RegionSpec(i * PAGE, PAGE, 0, 0))
    regions = mem.regions
    mem.clear()
    assert all(is_closed(fd) for fd in fds)
    assert all(r.fd == -1 for r in regions)
    assert len(mem) == 0 and mem.regions == ()
    with pytest.raises(MemoryAccessError):
        mem.gpa_view(0, 1)
    mem.clear()  # idempotent
    mem.add_region(memfd(PAGE), RegionSpec(0, PAGE, 0, 0))
    assert len(mem) == 1


def test_views_outlive_their_region(mem: GuestMemory) -> None:
    """A device may still hold a chain's views when the table changes: the
    mapping must stay valid (not unmapped under it) until they are gone."""
    fd = memfd(PAGE, b"x" * PAGE)
    mem.add_region(fd, RegionSpec(0, PAGE, 0, 0))
    view = mem.gpa_view(16, 16, writable=True)
    mem.clear()
    assert is_closed(fd)
    assert bytes(view) == b"x" * 16
    view[:] = b"y" * 16
    view.release()


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_discard_punches_holes(mem: GuestMemory) -> None:
    size = 64 * PAGE
    fd = memfd(size, b"\xaa" * size)
    mem.add_region(os.dup(fd), RegionSpec(0x100000, size, 0, 0))
    before = allocated(fd)
    assert before >= size
    # Inner whole pages only: [+100, +100 + 8 pages) releases 7 pages.
    assert mem.discard(0x100000 + PAGE + 100, 8 * PAGE) == 7 * PAGE
    assert allocated(fd) == before - 7 * PAGE
    assert bytes(mem.gpa_view(0x100000 + 2 * PAGE, 4)) == b"\0" * 4   # reads back zero
    assert bytes(mem.gpa_view(0x100000 + PAGE + 100, 4)) == b"\xaa" * 4  # partial page kept
    assert mem.discard(0x100000 + 20 * PAGE + 1, PAGE) == 0
    with pytest.raises(MemoryAccessError):
        mem.discard(0x100000 + size - PAGE, 2 * PAGE)
    os.close(fd)


def test_discard_unaligned_offset_and_adjacent_regions(mem: GuestMemory) -> None:
    fd_a = memfd(9 * PAGE, b"\x11" * 9 * PAGE)
    fd_b = memfd(8 * PAGE, b"\x22" * 8 * PAGE)
    # Region a starts 0x80 bytes into a file page: its gpa pages straddle file pages.
    mem.add_region(os.dup(fd_a), RegionSpec(0x0, 8 * PAGE, 0, 0x80))
    mem.add_region(os.dup(fd_b), RegionSpec(8 * PAGE, 8 * PAGE, 0, 0))
    a0, b0 = allocated(fd_a), allocated(fd_b)
    released = mem.discard(4 * PAGE, 8 * PAGE)
    # a: gpa [4P, 8P) is file [4P+0x80, 8P+0x80): whole file pages 5..7 -> 3 pages; b: 4 pages.
    assert released == 7 * PAGE
    assert allocated(fd_a) == a0 - 3 * PAGE and allocated(fd_b) == b0 - 4 * PAGE
    os.close(fd_a)
    os.close(fd_b)


def test_discard_views(mem: GuestMemory) -> None:
    size = 16 * PAGE
    fd = memfd(size, b"\x55" * size)
    mem.add_region(os.dup(fd), RegionSpec(0x200000, size, 0, 0))
    before = allocated(fd)
    views = [mem.gpa_view(0x200000 + 2 * PAGE, 4 * PAGE, writable=True), mem.gpa_view(0x200000 + 8 * PAGE, PAGE)]
    assert mem.discard_views(views) == 5 * PAGE
    assert allocated(fd) == before - 5 * PAGE
    with pytest.raises(MemoryAccessError):
        mem.discard_views([memoryview(bytearray(PAGE))])
    for v in views:
        v.release()
    os.close(fd)
