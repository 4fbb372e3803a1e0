"""The dirty page log (vuser.dirtylog, native/log.h): C and its Python twin
set the same bits, exactly the pages written within the log's size; the
log's file is mapped, replaced and guarded like guest memory; the
virtqueue marks what a Python device wrote (the pushed length over the
chain's device-writable segments) and the used ring's bytes."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_virtqueue import AVAIL, BUF, DESC, IMPLS, R0, R1, RSIZE, USED, Driver, memfd
from vuser.dirtylog import LOG_PAGE, MAX_LOG_SIZE, BitmapLog, DirtyLog
from vuser.memory import GuestMemory, MemoryAccessError, RegionSpec
from vuser.virtqueue import VirtQueue

native = pytest.importorskip("vuser._native")
ffi, lib = native.ffi, native.lib
U64 = 1 << 64


def expected_bits(size: int, ranges: list[tuple[int, int]]) -> set[int]:
    """The spec's pages: every 4 KiB page a byte of a range lies in, below the log's end."""
    pages: set[int] = set()
    for gpa, length in ranges:
        if length:
            last = min(gpa + length - 1, U64 - 1) // LOG_PAGE
            pages.update(p for p in range(gpa // LOG_PAGE, min(last, 8 * size - 1) + 1))
    return pages


def bits(data: bytes) -> set[int]:
    return {8 * i + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


WRITES = st.lists(st.tuples(st.one_of(st.integers(0, 1 << 24), st.integers(0, U64 - 1),
                                      st.integers(U64 - (1 << 16), U64 - 1)),
                            st.one_of(st.integers(0, 3 * LOG_PAGE), st.sampled_from([0, 1, 2**32 - 1]))),
                  max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([1, 8, 100, 4096]), WRITES)
def test_c_and_python_set_the_same_bits(size: int, writes: list[tuple[int, int]]) -> None:
    bitmap = ffi.new("uint8_t[]", size)
    c = ffi.new("struct vu_log *")
    c.bitmap, c.size = bitmap, size
    ref = BitmapLog(bytearray(size))
    for gpa, length in writes:
        assert lib.vu_log_write(c, gpa, length) == 0
        ref.write(gpa, length)
    got = bytes(ffi.buffer(bitmap, size))
    assert got == bytes(ref.bitmap)
    assert bits(got) == expected_bits(size, writes)
    assert (c.updates, c.outside) == (ref.updates, ref.outside)
    assert ref.updates == sum(1 for _, n in writes if n)
    assert ref.outside == sum(1 for g, n in writes if n and min(g + n - 1, U64 - 1) // LOG_PAGE >= 8 * size)


def log_file(size: int, *, offset: int = 0, sealable: bool = True) -> int:
    fd = os.memfd_create("vuser-log-test", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, offset + size)
    return fd


def test_mapped_at_an_offset_replaced_and_cleared() -> None:
    log = DirtyLog()
    fd = log_file(64, offset=0x1800)
    log.replace(os.dup(fd), 64, 0x1800)          # not page-aligned: mapped from the page before
    assert log.mapped and log.size == 64
    log.write(0x5000, 1)
    log.write(0x7FFF, 2)                          # crosses into page 8
    assert list(log.pages()) == [0x5000, 0x7000, 0x8000]
    assert os.pread(fd, 2, 0x1800) == bytes([0xA0, 0x01])   # the front-end sees the bits
    # A later SET_LOG_BASE replaces it (memory hot-plug grows the log).
    fd2 = log_file(128)
    log.replace(os.dup(fd2), 128, 0)
    log.write(128 * 8 * LOG_PAGE - 1, 1)
    log.write(128 * 8 * LOG_PAGE, 1)              # beyond: counted, not written
    assert list(log.pages()) == [(128 * 8 - 1) * LOG_PAGE]
    assert log.outside == 1 and log.updates == 4
    log.clear()
    assert not log.mapped and list(log.pages()) == []
    log.write(0, 1)                               # no log: nothing to mark
    for f in (fd, fd2):
        os.close(f)


@pytest.mark.parametrize("size,offset,file_size,fault", [
    (4096, 0, 100, "beyond the end of its file"),
    (MAX_LOG_SIZE + 1, 0, 4096, "larger than"),
])
def test_bad_log_files_are_refused(size: int, offset: int, file_size: int, fault: str) -> None:
    log = DirtyLog()
    fd = log_file(file_size)
    with pytest.raises(MemoryAccessError, match=fault):
        log.replace(fd, size, offset)
    assert not log.mapped


def test_a_log_that_shrinks_faults_instead_of_killing() -> None:
    # A file that cannot be sealed and is truncated under the mapping: the
    # write faults (SIGBUS), the guard turns it into an error.
    mem = GuestMemory()   # installs the SIGBUS guard, gives an owner
    log = DirtyLog(mem.owner)
    fd = log_file(4096, sealable=False)
    log.replace(os.dup(fd), 4096, 0)
    os.ftruncate(fd, 0)
    with pytest.raises(MemoryAccessError, match="faulted"):
        log.write(0, 1)
    assert mem.faulted
    log.clear()
    os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_push_marks_written_bytes_and_the_used_ring(impl: str) -> None:
    mem = GuestMemory()
    mem.add_region(memfd(RSIZE), RegionSpec(R0, RSIZE, 0x7F00_0000_0000, 0))
    mem.add_region(memfd(RSIZE), RegionSpec(R1, RSIZE, 0x7F10_0000_0000, 0))
    log = DirtyLog(mem.owner)
    log.replace(log_file(64), 64, 0)
    try:
        vq = VirtQueue(mem, impl=impl)
        vq.configure(16, DESC, AVAIL, USED, event_idx=False, base=0)
        drv = Driver(mem, 16)
        # Writable pieces over four pages of two regions; a chain popped
        # before logging starts and pushed after is marked too.
        early = drv.chain([(R0 + BUF, 16, False), (R0 + BUF + 0x3000, 0x2000, True)])
        drv.publish(early)
        first = vq.pop_all()
        mem.set_dirty_log(log)
        vq.set_log(log, USED)
        late = drv.chain([(R1 + 0x8000, 0x10, True), (R1 + 0x9000, 0x1000, True), (R1 + 0xB000, 8, True)])
        drv.publish(late)
        chains = first + vq.pop_all()
        assert [c.head for c in chains] == [early, late]
        vq.push([(early, 0x1001), (late, 0x10 + 0x1000 + 4)])
        assert set(log.pages()) == {USED & ~0xFFF, R0 + BUF + 0x3000, R0 + BUF + 0x4000,
                                    R1 + 0x8000, R1 + 0x9000, R1 + 0xB000}
        # Logging off again (cancel): nothing more is marked.
        before = log.updates
        mem.set_dirty_log(None)
        vq.set_log(None)
        drv.publish(drv.chain([(R1 + 0x20000, 64, True)]))
        (c,) = vq.pop_all()
        vq.push([(c.head, 64)])
        assert log.updates == before
        vq.stop()
    finally:
        log.clear()
        mem.clear()
