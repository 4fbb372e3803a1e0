"""Device data checks: what each device type must do with the bytes —
rng fills buffers with entropy, net carries frames both ways and supplies
nothing on a disabled receive ring, balloon gives inflated pages back to
the host (the probe sees them leave its memfd), blk reads, fs answers FUSE."""

from __future__ import annotations

import errno
import os
import struct

import trio

from vuser.frontend import Driver, UsedElem
from vuser.frontend.memory import RamRegion
from vuser.frontend.queue import DriverQueueBase
from vuser.frontend.netdriver import BCAST, NetGuest, eth
from vuser.probe.context import CheckSpec, Probe
from vuser.probe.work import (
    FUSE_ATTR_MODE,
    FUSE_ATTR_OUT_SIZE,
    FUSE_GETATTR,
    FUSE_INIT_OUT_SIZE,
    FUSE_ROOT_ID,
    PAGE_SIZE,
    PROBE_MAC,
    S_IFDIR,
    S_IFMT,
    BlkHeader,
    Fail,
    FsWork,
    FuseGetattrIn,
    FuseOutHeader,
    Skip,
    fuse_reply,
    fuse_request,
    serve,
)
from vuser.virtio import BLK_S_OK, BLK_SECTOR_SIZE, BlkRequest

RNG_SIZES = (1, 16, 64, 512, 4096)
FRAMES = 8
INFLATE_PAGES = 16


async def rng_bytes(p: Probe) -> str:
    async with p.session() as fe:
        drv, _ = await p.start(fe)
        q = drv.queue(0)
        for size in RNG_SIZES:
            q.add_inbuf(size, token=size)
        q.kick()
        used = await q.wait_used(len(RNG_SIZES), timeout=p.timeout)
        await fe.stop()
    seen: set[bytes] = set()
    for elem in used:
        if not 0 < elem.length <= elem.token:
            raise Fail(f"a {elem.token}-byte buffer came back with {elem.length} bytes")
        if elem.length >= 16:
            if not elem.data.strip(b"\0"):
                raise Fail(f"a {elem.token}-byte buffer came back all zero")
            if elem.data in seen:
                raise Fail(f"two buffers came back with the same {elem.length} bytes")
            seen.add(elem.data)
    return "buffers of " + ", ".join(f"{u.token}->{u.length}" for u in used) + " bytes, non-zero and distinct"


# ---------------------------------------------------------------- net


def _frame(i: int) -> bytes:
    return eth(BCAST, PROBE_MAC, f"vuser probe frame {i:03d}".encode().ljust(46, b"."))


async def _collect(q: DriverQueueBase, hdr_len: int, count: int, wait: float) -> list[bytes]:
    """Frames (without the virtio-net header) arriving on receive queue
    ``q`` within ``wait`` s, up to ``count``; each fits one buffer."""
    frames: list[bytes] = []
    with trio.move_on_after(wait):
        while len(frames) < count:
            frames += [u.data[hdr_len:] for u in q.get_used()]
            if len(frames) < count:
                await q.wait_call(0.05)
    return frames


def _strangers(sent: set[bytes], got: list[bytes]) -> list[bytes]:
    """Received frames that are none of the frames sent (compared from the
    ethertype on: a reflecting back-end may swap the MAC addresses)."""
    size = len(next(iter(sent)))
    mine = {f[12:size] for f in sent}
    return [f for f in got if f[12:size] not in mine]


async def net_frames(p: Probe) -> str:
    """Frames sent on transmit queue 1 are taken; a back-end that sends
    frames back (testpmd's io forwarding, ``vuser run net --reflect``) must
    deliver them intact on receive queue 0."""
    async with p.session() as fe:
        drv, _ = await p.start(fe)
        guest = NetGuest(drv)
        guest.fill_rx(count=32)
        sent = {_frame(i) for i in range(FRAMES)}
        for frame in sorted(sent):
            guest.send(frame)
        tx = await drv.queue(1).wait_used(FRAMES, timeout=p.timeout)
        back = await _collect(drv.queue(0), guest.hdr_len, FRAMES, p.timeout / 2)
        await fe.stop()
    if len(tx) != FRAMES:
        raise Fail(f"{len(tx)} of {FRAMES} transmit chains completed")
    if not back:
        return (f"{FRAMES} frames taken on transmit; none came back (not a reflecting set-up: the receive "
                f"side was not checked)")
    wrong = _strangers(sent, back)
    if wrong:
        raise Fail(f"{len(wrong)} received frames are none of the frames sent (first: {wrong[0][:32].hex()})")
    return f"{FRAMES} frames taken on transmit, {len(back)} came back intact on receive"


async def net_rx_disabled(p: Probe) -> str:
    """With the receive ring disabled the back-end must not supply new
    packets; once enabled again it does."""
    async with p.session() as fe:
        if not fe.offers_protocol_features:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered (rings cannot be disabled)")
        drv, _ = await p.start(fe)
        guest = NetGuest(drv)
        guest.fill_rx(count=32)
        guest.send(_frame(0))
        rx = drv.queue(0)
        if not await _collect(rx, guest.hdr_len, 1, p.timeout / 2):
            raise Skip("no frame comes back (not a reflecting set-up)")
        await fe.set_vring_enable(0, False)
        for i in range(4):
            guest.send(_frame(i))
        during = await _collect(rx, guest.hdr_len, 4, p.quiet)
        await fe.set_vring_enable(0, True)
        guest.send(_frame(9))
        rx.kick(force=True)
        after = await _collect(rx, guest.hdr_len, 1, p.timeout / 2)
        await fe.stop()
    if during:
        raise Fail(f"{len(during)} frames supplied on the disabled receive ring")
    if not after:
        raise Fail("no frame supplied once the receive ring was enabled again")
    return "nothing supplied on the disabled receive ring; frames again once enabled"


# ---------------------------------------------------------------- balloon


def released(region: RamRegion, gpa: int, size: int) -> bool:
    """Is the range a hole in the region's memfd (its pages freed)?"""
    start = region.mmap_offset + (gpa - region.gpa)
    try:
        data = os.lseek(region.fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:   # no data at or after start
            return True
        raise
    return data >= start + size


async def balloon_inflate(p: Probe) -> str:
    """PFNs on inflateq: the back-end gives the pages back to the host; the
    probe sees them become a hole in its memfd (and read zero)."""
    async with p.session() as fe:
        drv, _ = await p.start(fe)
        size = INFLATE_PAGES * PAGE_SIZE
        gpa = fe.memory.alloc(size, PAGE_SIZE, region=fe.memory.regions[0].index)
        fe.memory.fill(gpa, size, 0xA5)
        region = fe.memory.region_of(gpa)
        if released(region, gpa, size):
            raise Fail("the probe's own pages are not in its memfd (cannot observe)")
        pfns = b"".join(struct.pack("<I", gpa // PAGE_SIZE + i) for i in range(INFLATE_PAGES))
        inflate = drv.queue(0)
        inflate.add_outbuf(pfns)
        inflate.kick()
        await inflate.wait_used(1, timeout=p.timeout)
        hole = released(region, gpa, size)
        zero = fe.memory.read(gpa, size) == bytes(size)
        deflate = drv.queue(1)
        deflate.add_outbuf(pfns)
        deflate.kick()
        await deflate.wait_used(1, timeout=p.timeout)
        await fe.stop()
    if not hole:
        raise Fail(f"{INFLATE_PAGES} inflated pages are still allocated in the memfd"
                   + (" (they read zero: zeroed, not released)" if zero else ""))
    return f"{INFLATE_PAGES} inflated pages released from the memfd (a hole, reading zero); deflated again"


# ---------------------------------------------------------------- blk and fs


async def blk_read(p: Probe) -> str:
    async with p.session() as fe:
        drv, _ = await p.start(fe)
        q = drv.queue(0)
        header = BlkHeader.build({"type": BlkRequest.IN, "ioprio": 0, "sector": 0})
        for _ in range(2):
            q.add_chain(out=[header], in_=[1024] * 4 + [1])
        q.kick()
        used = await q.wait_used(2, timeout=p.timeout)
        await fe.stop()
    expected = 8 * BLK_SECTOR_SIZE + 1
    for elem in used:
        if elem.length != expected or elem.data[-1] != BLK_S_OK:
            raise Fail(f"read of sectors 0-7: used len {elem.length} (expected {expected}), "
                       f"status {elem.data[-1:].hex()}")
    if used[0].data != used[1].data:
        raise Fail("two reads of sectors 0-7 returned different data")
    return "sectors 0-7 read over 4 descriptors twice: status OK, same data"


async def _fuse(drv: Driver, request: bytes, reply_size: int, timeout: float) -> UsedElem:
    q = drv.queue(1)
    q.add_chain(out=[request], in_=[reply_size])
    q.kick()
    (elem,) = await q.wait_used(1, timeout=timeout)
    return elem


async def fs_fuse(p: Probe) -> str:
    async with p.session() as fe:
        drv, work = await p.start(fe)
        assert isinstance(work, FsWork)
        await serve(drv.queue(1), work, 1, timeout=p.timeout)
        body = FuseGetattrIn.build({"getattr_flags": 0, "dummy": 0, "fh": 0})
        elem = await _fuse(drv, fuse_request(FUSE_GETATTR, 7, FUSE_ROOT_ID, body),
                           FuseOutHeader.sizeof() + FUSE_ATTR_OUT_SIZE, p.timeout)
        await fe.stop()
    length, error, _ = fuse_reply(elem.data)
    if error:
        raise Fail(f"GETATTR of the root answered error {error}")
    mode = struct.unpack_from("<I", elem.data, FUSE_ATTR_MODE)[0]
    if mode & S_IFMT != S_IFDIR:
        raise Fail(f"GETATTR of the root: mode {mode:#o} is not a directory")
    return f"FUSE_INIT answered ({FUSE_INIT_OUT_SIZE}-byte reply), GETATTR of the root: a directory, mode {mode:#o}"


CHECKS = (
    CheckSpec("data/rng-bytes", "virtio 5.4.6", rng_bytes, ("rng",)),
    CheckSpec("data/net-frames", "virtio 5.1.6", net_frames, ("net",)),
    CheckSpec("vring-enable/net-rx-disabled", "vhost-user.rst 'Ring states' (no new RX packets while disabled)",
              net_rx_disabled, ("net",)),
    CheckSpec("data/balloon-inflate", "virtio 5.5.6; design.md (MADV_REMOVE on the shared memfd)",
              balloon_inflate, ("balloon",)),
    CheckSpec("data/blk-read", "virtio 5.2.6", blk_read, ("blk",)),
    CheckSpec("data/fs-fuse", "virtio 5.11.6", fs_fuse, ("fs",)),
)

__all__ = ["CHECKS", "released"]
