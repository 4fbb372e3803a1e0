"""The VirtQueue façade on well-formed rings, both implementations.

``Driver`` plays the guest's half of a split ring directly in guest memory
(like rust-vmm vm-virtio's mock.rs).
"""

from __future__ import annotations

import os
import struct

import pytest

from vuser.memory import GuestMemory, MemoryAccessError, RegionSpec
from vuser.rings import errors as ring_errors
from vuser.virtio import AvailFlag, DescFlag, UsedFlag
from vuser.virtqueue import Chain, RingError, VirtQueue, native_available

IMPLS = [pytest.param("native", marks=pytest.mark.skipif(not native_available(), reason="no vuser._native")),
         "python"]

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
R0, R1 = 0x0, 0x100000        # two 256 KiB regions with a gap between them
RSIZE = 0x40000
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000   # ring areas in region 0
BUF = 0x10000                                # buffers from here on


def memfd(size: int) -> int:
    fd = os.memfd_create("vuser-vq-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class Driver:
    """The guest side of one split ring."""

    def __init__(self, mem: GuestMemory, num: int, desc: int = DESC, avail: int = AVAIL, used: int = USED) -> None:
        self.mem, self.num = mem, num
        self.desc, self.avail, self.used = desc, avail, used
        self.avail_idx = 0
        self.next_free = 0

    def w(self, gpa: int, fmt: str, *vals: int) -> None:
        struct.pack_into(fmt, self.mem.gpa_view(gpa, struct.calcsize(fmt), writable=True), 0, *vals)

    def r(self, gpa: int, fmt: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.mem.gpa_view(gpa, struct.calcsize(fmt)))

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None) -> None:
        self.w((self.desc if table is None else table) + 16 * i, "<QIHH", addr, length, flags, nxt)

    def chain(self, bufs: list[tuple[int, int, bool]]) -> int:
        """Direct chain of (gpa, len, device-writable) buffers; returns head."""
        ids = [(self.next_free + k) % self.num for k in range(len(bufs))]
        self.next_free += len(bufs)
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.set_desc(ids[k], addr, length, (WRITE if writable else 0) | (0 if last else NEXT),
                          0 if last else ids[k + 1])
        return ids[0]

    def indirect(self, table: int, bufs: list[tuple[int, int, bool]]) -> int:
        for k, (addr, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.set_desc(k, addr, length, (WRITE if writable else 0) | (0 if last else NEXT),
                          0 if last else k + 1, table=table)
        head = self.next_free % self.num
        self.next_free += 1
        self.set_desc(head, table, 16 * len(bufs), INDIRECT)
        return head

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.w(self.avail + 4 + 2 * (self.avail_idx % self.num), "<H", h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.w(self.avail + 2, "<H", self.avail_idx)

    def used_idx(self) -> int:
        return self.r(self.used + 2, "<H")[0]

    def used_elem(self, k: int) -> tuple[int, int]:
        return self.r(self.used + 4 + 8 * (k % self.num), "<II")  # type: ignore[return-value]

    def used_flags(self) -> int:
        return self.r(self.used, "<H")[0]

    def avail_event(self) -> int:
        return self.r(self.used + 4 + 8 * self.num, "<H")[0]

    def set_avail_flags(self, flags: int) -> None:
        self.w(self.avail, "<H", flags)

    def set_used_event(self, v: int) -> None:
        self.w(self.avail + 4 + 2 * self.num, "<H", v)


@pytest.fixture
def mem():
    m = GuestMemory()
    m.add_region(memfd(RSIZE), RegionSpec(R0, RSIZE, 0x7F00_0000_0000, 0))
    m.add_region(memfd(RSIZE), RegionSpec(R1, RSIZE, 0x7F00_1000_0000, 0))
    yield m
    m.clear()


def make(mem: GuestMemory, impl: str, num: int = 16, *, event_idx: bool = False, last: int = 0,
         **kw: int) -> tuple[VirtQueue, Driver]:
    vq = VirtQueue(mem, impl=impl, **kw)
    vq.configure(num, DESC, AVAIL, USED, event_idx=event_idx, base=last)
    drv = Driver(mem, num)
    drv.avail_idx = last
    return vq, drv


def fill(mem: GuestMemory, gpa: int, data: bytes) -> None:
    mem.gpa_view(gpa, len(data), writable=True)[:] = data


@pytest.mark.parametrize("impl", IMPLS)
def test_direct_chain_roundtrip(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    fill(mem, BUF, b"hello ")
    fill(mem, R1 + 0x100, b"world")
    head = drv.chain([(BUF, 6, False), (R1 + 0x100, 5, False), (BUF + 0x1000, 64, True)])
    drv.publish(head)
    assert vq.avail_pending()
    [c] = vq.pop_all()
    assert isinstance(c, Chain) and c.head == head
    assert b"".join(bytes(v) for v in c.readable) == b"hello world"
    assert (c.out_len, c.in_len) == (11, 64)
    assert [len(v) for v in c.writable] == [64]
    assert c.readable[0].readonly and not c.writable[0].readonly
    c.writable[0][:5] = b"reply"
    assert bytes(mem.gpa_view(BUF + 0x1000, 5)) == b"reply"
    assert not vq.avail_pending() and vq.pop_all() == []
    assert drv.used_idx() == 0
    vq.push([(c.head, 5)])
    assert drv.used_idx() == 1 and drv.used_elem(0) == (head, 5)
    assert (vq.last_avail_idx, vq.used_idx) == (1, 1)
    assert not vq.broken and vq.error is None


@pytest.mark.parametrize("impl", IMPLS)
def test_indirect_chain(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    fill(mem, BUF, b"abc")
    head = drv.indirect(R1 + 0x2000, [(BUF, 3, False), (BUF + 0x100, 16, True), (R1 + 0x8000, 8, True)])
    plain = drv.chain([(BUF, 1, False)])
    drv.publish(head, plain)
    c1, c2 = vq.pop_all()
    assert c1.head == head and [bytes(v) for v in c1.readable] == [b"abc"]
    assert [len(v) for v in c1.writable] == [16, 8] and (c1.out_len, c1.in_len) == (3, 24)
    assert c2.head == plain and bytes(c2.readable[0]) == b"a"
    vq.push([(c2.head, 0), (c1.head, 24)])
    assert drv.used_idx() == 2 and [drv.used_elem(k) for k in (0, 1)] == [(plain, 0), (head, 24)]


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_length_descriptors_give_no_views(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    head = drv.chain([(BUF, 0, False), (0xDEAD_0000_0000, 0, False), (BUF, 4, True), (BUF, 0, True)])
    drv.publish(head)
    [c] = vq.pop_all()
    assert c.readable == [] and [len(v) for v in c.writable] == [4] and (c.out_len, c.in_len) == (0, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_buffer_across_adjacent_regions_is_split(impl: str) -> None:
    mem = GuestMemory()
    try:
        mem.add_region(memfd(RSIZE), RegionSpec(0, RSIZE, 0x1000_0000, 0))
        mem.add_region(memfd(RSIZE), RegionSpec(RSIZE, RSIZE, 0x5000_0000, 0))   # adjacent in gpa
        fill(mem, RSIZE - 4, b"1234")
        fill(mem, RSIZE, b"5678")
        vq, drv = make(mem, impl)
        drv.publish(drv.chain([(RSIZE - 4, 8, False)]))
        [c] = vq.pop_all()
        assert [bytes(v) for v in c.readable] == [b"1234", b"5678"] and c.out_len == 8
        # Past the end of the second region it is outside memory.
        drv.publish(drv.chain([(2 * RSIZE - 4, 8, False)]))
        assert vq.pop_all() == [] and vq.error is not None and vq.error.code == ring_errors.ERR_DESC_ADDR
        del c
    finally:
        mem.clear()


@pytest.mark.parametrize("impl", IMPLS)
def test_many_chains_one_call_and_limits(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl, num=64)
    heads = [drv.chain([(BUF + 64 * k, 32, False), (BUF + 0x8000 + 64 * k, 32, True)]) for k in range(20)]
    drv.publish(*heads)
    first = vq.pop_all(max_chains=7)
    assert [c.head for c in first] == heads[:7] and vq.last_avail_idx == 7
    rest = vq.pop_all()
    assert [c.head for c in rest] == heads[7:] and vq.last_avail_idx == 20
    vq.push([(c.head, 32) for c in first + rest])
    assert drv.used_idx() == 20


@pytest.mark.parametrize("impl", IMPLS)
def test_small_segment_space(mem: GuestMemory, impl: str) -> None:
    # Room for 5 segments: pop_all goes round again for chains that did not fit.
    vq, drv = make(mem, impl, max_segs=5)
    heads = [drv.chain([(BUF + 64 * k + j * 8, 8, False) for j in range(3)]) for k in range(4)]
    drv.publish(*heads)
    chains = vq.pop_all()
    assert [c.head for c in chains] == heads and all(len(c.readable) == 3 for c in chains)
    # A chain needing more than 5 segments can never be served.
    drv.publish(drv.chain([(BUF + 8 * j, 8, False) for j in range(6)]))
    assert vq.pop_all() == []
    assert vq.error is not None and vq.error.code == ring_errors.ERR_CHAIN_SEGS
    assert vq.last_avail_idx == 4


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_chain_keeps_good_ones_and_breaks(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    good = drv.chain([(BUF, 8, False)])
    bad = drv.chain([(BUF, 8, True), (BUF, 8, False)])  # readable after writable
    after = drv.chain([(BUF, 8, False)])
    drv.publish(good, bad, after)
    chains = vq.pop_all()
    assert [c.head for c in chains] == [good]
    assert isinstance(vq.error, RingError) and vq.broken
    assert (vq.error.code, vq.error.name) == (ring_errors.ERR_ORDER, "VU_ERR_ORDER")
    assert "readable" in str(vq.error)
    assert vq.last_avail_idx == 1 and vq.stop() == 1
    assert vq.pop_all() == []
    # The chains handed out can still be returned.
    vq2, _ = make(mem, impl, last=1)
    assert vq2.error is None


@pytest.mark.parametrize("impl", IMPLS)
def test_sticky_error_does_not_touch_memory(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    drv.publish(drv.chain([(BUF, 8, False)]))
    drv.w(AVAIL + 2, "<H", 100)  # avail idx far ahead of last_avail_idx
    assert vq.pop_all() == [] and vq.error.code == ring_errors.ERR_AVAIL_IDX  # type: ignore[union-attr]
    assert not vq.avail_pending()
    drv.w(AVAIL + 2, "<H", 1)
    assert vq.pop_all() == []  # still broken until configured again
    vq.configure(16, DESC, AVAIL, USED, event_idx=False, base=0)
    assert [c.head for c in vq.pop_all()] == [0]


@pytest.mark.parametrize("impl", IMPLS)
def test_need_notify_without_event_idx(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    drv.publish(drv.chain([(BUF, 8, True)]))
    [c] = vq.pop_all()
    vq.push([(c.head, 8)])
    assert vq.need_notify()
    drv.set_avail_flags(AvailFlag.NO_INTERRUPT)
    assert not vq.need_notify()
    drv.set_avail_flags(0)
    assert vq.need_notify()


@pytest.mark.parametrize("impl", IMPLS)
def test_need_notify_with_event_idx(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl, event_idx=True)
    drv.set_avail_flags(AvailFlag.NO_INTERRUPT)  # ignored with EVENT_IDX
    heads = [drv.chain([(BUF, 8, True)]) for _ in range(4)]
    drv.publish(*heads)
    chains = vq.pop_all()
    drv.set_used_event(5)  # "interrupt me when used idx passes 5"
    vq.push([(chains[0].head, 1)])
    assert vq.need_notify()  # the first decision always notifies
    vq.push([(chains[1].head, 1)])
    assert not vq.need_notify()  # 1 -> 2 does not pass 5
    drv.set_used_event(2)
    vq.push([(chains[2].head, 1), (chains[3].head, 1)])
    assert vq.need_notify()  # 2 -> 4 passes 2 (new - event - 1 = 1 < 2)
    assert not vq.need_notify()  # nothing new since


@pytest.mark.parametrize("impl", IMPLS)
def test_set_notification(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    vq.set_notification(False)
    assert drv.used_flags() & UsedFlag.NO_NOTIFY
    vq.set_notification(True)
    assert not drv.used_flags() & UsedFlag.NO_NOTIFY
    assert drv.avail_event() == 0

    vq, drv = make(mem, impl, event_idx=True, last=7)
    drv.w(USED, "<H", 0)
    drv.publish(drv.chain([(BUF, 8, False)]), drv.chain([(BUF, 8, False)]))
    vq.set_notification(False)
    assert len(vq.pop_all()) == 2
    assert drv.avail_event() == 0 and drv.used_flags() == 0  # disabled: nothing written
    vq.set_notification(True)
    assert drv.avail_event() == 9  # kick me when you make slot 9 available
    drv.publish(drv.chain([(BUF, 8, False)]))
    assert vq.avail_pending()
    assert len(vq.pop_all()) == 1
    assert drv.avail_event() == 10  # popping with notifications on moves it along


@pytest.mark.parametrize("impl", IMPLS)
def test_stop_returns_exact_index_across_wrap(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl, num=4, last=65534)
    drv.w(USED + 2, "<H", 65534)
    vq.configure(4, DESC, AVAIL, USED, event_idx=True, base=65534)
    assert vq.used_idx == 65534  # resumed from the used ring
    heads = [drv.chain([(BUF, 8, False)]) for _ in range(3)]
    drv.publish(*heads)
    chains = vq.pop_all()
    assert [c.head for c in chains] == heads
    vq.push([(c.head, 0) for c in chains])
    assert drv.used_idx() == 1 and vq.used_idx == 1
    assert vq.stop() == 1
    assert vq.last_avail_idx == 1 and vq.pop_all() == [] and not vq.avail_pending()
    vq.push([(0, 0)])  # stopped: a no-op
    assert drv.used_idx() == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_configure_checks(mem: GuestMemory, impl: str) -> None:
    vq = VirtQueue(mem, impl=impl)
    for num in (0, 3, 65536):
        with pytest.raises(ValueError):
            vq.configure(num, DESC, AVAIL, USED, event_idx=False, base=0)
    with pytest.raises(MemoryAccessError):
        vq.configure(256, RSIZE - 16 * 128, AVAIL, USED, event_idx=False, base=0)
    with pytest.raises(MemoryAccessError):
        vq.configure(16, DESC, AVAIL, 0x50000, event_idx=False, base=0)
    assert not vq.configured and vq.pop_all() == [] and not vq.need_notify()
    # Unaligned ring areas are accepted (every access is a memcpy).
    vq.configure(8, DESC + 1, AVAIL + 3, USED + 5, event_idx=True, base=0)
    drv = Driver(mem, 8, DESC + 1, AVAIL + 3, USED + 5)
    drv.publish(drv.chain([(BUF, 8, False)]))
    [c] = vq.pop_all()
    vq.push([(c.head, 3)])
    assert drv.used_idx() == 1 and drv.used_elem(0) == (c.head, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_push_checks(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    with pytest.raises(ValueError):
        vq.push([(16, 0)])
    with pytest.raises(ValueError):
        vq.push([(0, 1 << 32)])
    with pytest.raises(ValueError):
        vq.push([(0, -1)])
    assert drv.used_idx() == 0
    vq.push([])
    assert drv.used_idx() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_queue_follows_memory_table_replacement(mem: GuestMemory, impl: str) -> None:
    """DPDK replaces the table while running: same layout, new fds."""
    vq, drv = make(mem, impl)
    drv.publish(drv.chain([(BUF, 4, False)]))
    [c] = vq.pop_all()
    vq.push([(c.head, 0)])
    old_used = bytes(mem.gpa_view(0, RSIZE))
    fd = memfd(RSIZE)
    os.pwrite(fd, old_used, 0)
    mem.replace([(fd, RegionSpec(R0, RSIZE, 0x7F00_0000_0000, 0)),
                 (memfd(RSIZE), RegionSpec(R1, RSIZE, 0x7F00_1000_0000, 0))])
    fill(mem, BUF, b"new!")
    drv.publish(drv.chain([(BUF, 4, False)]))
    [c2] = vq.pop_all()
    assert bytes(c2.readable[0]) == b"new!" and vq.last_avail_idx == 2 and vq.used_idx == 1
    assert bytes(c.readable[0]) == b"\0" * 4  # the old chain's view still points at the old mapping
    vq.push([(c2.head, 0)])
    assert drv.used_idx() == 2
    # Rings gone from the new table: the queue stops, remembering where.
    mem.replace([(memfd(RSIZE), RegionSpec(R1, RSIZE, 0x7F00_1000_0000, 0))])
    assert vq.pop_all() == [] and not vq.configured and vq.stop() == 2


def test_raw_batch_api(mem: GuestMemory) -> None:
    if not native_available():
        pytest.skip("no vuser._native")
    from vuser._native import lib
    vq, drv = make(mem, "native")
    drv.publish(drv.chain([(BUF, 8, False), (R1, 16, True)]), drv.chain([(BUF + 8, 4, False)]))
    rc, nc, ns, chains, segs = vq.ring.pop_raw(mem, 8, 64)  # type: ignore[attr-defined]
    assert (rc, nc, ns) == (0, 2, 3)
    c0, c1 = chains[0], chains[1]
    assert (c0.head, c0.first_seg, c0.nsegs, c0.nread, c0.out_len, c0.in_len) == (0, 0, 2, 1, 8, 16)
    assert (c1.head, c1.first_seg, c1.nsegs) == (2, 2, 1)
    s = segs[1]
    assert (s.region, s.offset, s.len, s.flags) == (1, 0, 16, lib.VU_SEG_WRITE)
    assert vq.native_ring.last_avail_idx == 2
    assert VirtQueue(mem, impl="python").native_ring is None


def test_unknown_impl(mem: GuestMemory) -> None:
    with pytest.raises(ValueError):
        VirtQueue(mem, impl="rust")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("count, ok", [(1024, True), (1025, False)])
def test_chain_descriptor_cap_counts_zero_length(mem: GuestMemory, impl: str, count: int, ok: bool) -> None:
    """Zero-length descriptors make no segment, so the segment space cannot
    bound a chain of them: chains are capped at 1024 descriptors (indirect
    entries included), as QEMU does."""
    vq, drv = make(mem, impl)
    table = 0x20000
    drv.publish(drv.indirect(table, [(BUF, 0, True)] * (count - 1) + [(BUF, 8, True)]))
    chains = vq.pop_all()
    if ok:
        assert len(chains) == 1 and chains[0].in_len == 8 and vq.error is None
    else:
        assert chains == [] and vq.error is not None and vq.error.code == ring_errors.ERR_CHAIN_DESCS


@pytest.mark.parametrize("impl", IMPLS)
def test_byte_budget_takes_whole_chains(mem: GuestMemory, impl: str) -> None:
    vq, drv = make(mem, impl)
    heads = [drv.chain([(BUF + 0x1000 * k, 1000, True)]) for k in range(5)]
    drv.publish(*heads)
    # The first chain is taken whatever its size; then only what fits.
    assert [c.head for c in vq.pop_all(max_bytes=10)] == heads[:1]
    assert [c.head for c in vq.pop_all(max_bytes=2500)] == heads[1:3]
    assert [c.head for c in vq.pop_all()] == heads[3:]
