"""Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 2.8) end to end through
the front-end harness: every device, both ring implementations, the QEMU
and DPDK personalities (QEMU's ``packed=on``, DPDK's ``packed_vq=1``).

What is shown: rng chains of every shape served on packed rings of sizes
that are not powers of 2, across many laps of the wrap counters; the
GET_VRING_BASE encoding of vhost-user.rst (both halves, exact) and a
restart from it; DPDK's avail-only SET_VRING_BASE; memory-table
replacement with buffers in flight; balloon inflate releasing memfd pages
and a stats buffer held across rounds; net frames between a packed guest
and a split one, mergeable buffers, in-order completion (used descriptors
coalesced); hostile packed rings mark the device as needing reset and
leave other connections alone.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio

from conftest import (
    F_EVENT_IDX,
    PERSONALITY_NAMES,
    RING_IMPLS,
    STATUS_NEEDS_RESET,
    BalloonDevice,
    RngDevice,
    check_rng_data,
    probe_and_serve,
    served,
    submit_mixed,
    wait_until,
)
from vuser.frontend import Driver, Frontend
from vuser.frontend.netdriver import BCAST, eth
from vuser.frontend.netdriver import net_frontend
from vuser.frontend.netdriver import net_probe
from vuser.frontend.packed import PackedDriverQueue, avail_flags
from vuser.rings.packed_ref import packed_base
from vuser.virtio import DescFlag, Transport

F_RING_PACKED, F_IN_ORDER = int(Transport.RING_PACKED), int(Transport.IN_ORDER)
PACKED_NAME = "VIRTIO_F_RING_PACKED"
BALLOON_CONFIG_SIZE = 16
PAGE = 4096
MiB = 1 << 20


def packed_queue(drv: Driver, index: int) -> PackedDriverQueue:
    q = drv.queue(index)
    assert isinstance(q, PackedDriverQueue), type(q)
    return q


def expected_base(q: PackedDriverQueue) -> int:
    """What the device must answer to GET_VRING_BASE once every chain it
    took came back: both halves at the driver's next avail position."""
    return packed_base(q.next_avail, q.avail_wrap, q.next_avail, q.avail_wrap)


# ------------------------------------------------------------------ rng


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("personality", PERSONALITY_NAMES)
async def test_rng_on_packed_rings(tmp_path: Path, personality: str, event_idx: bool, ring_impl: str) -> None:
    """Chains of every shape on a 7-slot ring (not a power of 2) for many
    laps; the stop returns the exact packed base, a restart resumes."""
    with trio.fail_after(60):
        dev = RngDevice()
        async with served(dev, tmp_path / "rng.sock", ring_impl=ring_impl) as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality=personality, packed=True) as fe:
                drv = Driver(fe, decline=[] if event_idx else [F_EVENT_IDX], queue_size=7)
                await drv.probe()
                assert PACKED_NAME in runner.status()["negotiated_features"]
                q = packed_queue(drv, 0)
                for batch in range(12):
                    added = []
                    for size in (1, 64, 4097):
                        added.append((q.add_inbuf(size + batch), size + batch))
                    added.append((q.add_chain(in_=[32, 100], indirect=False), 132))
                    added.append((q.add_chain(in_=[16, 16, 16], indirect=True), 48))
                    q.kick()
                    check_rng_data(added, await q.wait_used(len(added), timeout=10))
                assert q.stats.added == 60  # 60 chains of 1 to 3 slots on 7 slots: many laps
                base = (await fe.stop())[0]
                assert base == expected_base(q), (hex(base), q.describe())
                await fe.start(drv.queues, features=drv.features)
                added = [(q.add_inbuf(128), 128), (q.add_chain(in_=[8, 8], indirect=True), 16)]
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                assert (await fe.stop())[0] == expected_base(q)


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
async def test_rng_packed_base_excludes_unconsumed_chains(tmp_path: Path, ring_impl: str) -> None:
    """Chains made available but never kicked are not consumed: the base
    stops before them (both halves), and after a restart they are served."""
    with trio.fail_after(60):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl):
            async with Frontend.connect(str(tmp_path / "rng.sock"), packed=True) as fe:
                drv = Driver(fe, queue_size=64)
                await drv.probe()
                q = packed_queue(drv, 0)
                first = submit_mixed(q)
                q.kick()
                check_rng_data(first, await q.wait_used(len(first), timeout=10))
                consumed = expected_base(q)
                pending = submit_mixed(q)
                await trio.sleep(0.05)
                assert q.get_used() == []
                assert (await fe.stop())[0] == consumed
                await fe.start(drv.queues, features=drv.features)
                check_rng_data(pending, await q.wait_used(len(pending), timeout=10))
                assert (await fe.stop())[0] == expected_base(q)


async def test_dpdk_sends_only_the_avail_half(tmp_path: Path) -> None:
    """DPDK's virtio_user sends SET_VRING_BASE with bit 15 only on a fresh
    packed ring; vuser reads the used half as equal to the avail half."""
    async with served(RngDevice(), tmp_path / "rng.sock"):
        async with Frontend.connect(str(tmp_path / "rng.sock"), personality="dpdk", packed=True) as fe:
            drv = Driver(fe)
            await drv.probe()
            bases = [e.fields.num for e in fe.trace if e.request == "SET_VRING_BASE"]
            assert bases == [0x8000]
            q = packed_queue(drv, 0)
            added = submit_mixed(q)
            q.kick()
            check_rng_data(added, await q.wait_used(len(added), timeout=10))


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
async def test_memory_table_replaced_with_buffers_in_flight(tmp_path: Path, ring_impl: str) -> None:
    """DPDK replaces the memory table while running: the packed ring keeps
    its wrap counters and its record of buffers in flight."""
    with trio.fail_after(60):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl) as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality="dpdk", packed=True) as fe:
                drv = Driver(fe, queue_size=16)
                await drv.probe()
                q = packed_queue(drv, 0)
                for _ in range(3):
                    added = [(q.add_inbuf(100 + k), 100 + k) for k in range(4)]
                    added.append((q.add_chain(in_=[64, 64], indirect=True), 128))
                    q.kick()
                    check_rng_data(added, await q.wait_used(len(added), timeout=10))
                    await fe.replace_mem_table(add_region_size=2 * MiB)
                assert runner.status()["ring_error"] is None
                assert (await fe.stop())[0] == expected_base(q)


# ------------------------------------------------------------------ balloon


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
async def test_balloon_inflates_on_packed_rings(tmp_path: Path, ring_impl: str) -> None:
    """Inflate releases the pages from the memfd, deflate takes them back,
    the stats buffer is held and returned (QEMU 11's generic device)."""
    dev = BalloonDevice(stats_interval=0.05)
    with trio.fail_after(60):
        async with served(dev, tmp_path / "b.sock", ring_impl=ring_impl):
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE,
                                        packed=True, memory_mb=64) as fe:
                drv = Driver(fe, queues=[0, 1, 2], queue_size=5)
                await drv.probe()
                inflate, deflate, stats = (packed_queue(drv, i) for i in range(3))
                region = fe.memory.regions[0]
                first = region.gpa // PAGE + 256
                pfns = list(range(first, first + 512))
                for k in range(0, len(pfns), 128):  # 4 buffers of 128 PFNs on a 5-slot ring
                    fe.memory.write(pfns[k] * PAGE, b"\xff" * PAGE * 128)
                    inflate.add_outbuf(struct.pack("<128I", *pfns[k:k + 128]))
                inflate.kick()
                assert len(await inflate.wait_used(4, timeout=10)) == 4
                assert dev.status()["inflated_pages"] == 512
                assert dev.bytes_released == 512 * PAGE
                assert fe.memory.read(first * PAGE, 16) == bytes(16)   # MADV_REMOVE: zero again
                deflate.add_outbuf(struct.pack("<64I", *pfns[:64]))
                deflate.kick()
                assert len(await deflate.wait_used(1, timeout=10)) == 1
                assert dev.status()["inflated_pages"] == 448
                for _ in range(3):
                    stats.add_outbuf(struct.pack("<HQ", 4, 1234) * 2)
                    stats.kick()
                    await wait_until(lambda: bool(stats.get_used()), 10, "the stats buffer back")
                assert dev.stats_updates >= 1


# ------------------------------------------------------------------ net


@pytest.mark.parametrize("personality", PERSONALITY_NAMES)
async def test_net_packed_guest_talks_to_split_guest(tmp_path: Path, personality: str) -> None:
    """One switch, one guest on packed rings and one on split rings:
    frames both ways byte-exact, mergeable buffers across wraps."""
    from test_net_harness import MAC_A, MAC_B, net_group

    with trio.fail_after(60):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with net_frontend(paths[0], personality=personality, packed=True) as fa, \
                    net_frontend(paths[1], personality=personality) as fb:
                a = await net_probe(fa, queue_size=32)
                b = await net_probe(fb, queue_size=32)
                assert isinstance(a.drv.queue(0), PackedDriverQueue)
                assert not isinstance(b.drv.queue(0), PackedDriverQueue)
                a.fill_rx(count=24, size=1024)
                b.fill_rx(count=24, size=1024)
                for rnd in range(5):  # more frames than the rings hold: several laps
                    if rnd:  # replace the buffers used (A: 3 frames in 4 buffers of 1 KiB)
                        a.fill_rx(count=4, size=1024)
                        b.fill_rx(count=10, size=1024)
                    frames = [eth(BCAST, MAC_A, os.urandom(46 + 113 * i)) for i in range(10)]
                    for f in frames:
                        a.send(f)
                    await a.wait_sent(len(frames))
                    assert [f for _, f in await b.recv(len(frames))] == frames
                    back = [eth(MAC_A, MAC_B, os.urandom(n)) for n in (46, 1000, 1500)]
                    for f in back:
                        b.send(f, split=False)
                    await b.wait_sent(len(back))
                    assert [f for _, f in await a.recv(len(back))] == back
                assert switch.stats()["ports"][0]["dropped"] == 0


async def test_net_in_order_coalesces_used_descriptors(tmp_path: Path) -> None:
    """With VIRTIO_F_IN_ORDER the tx completions of a batch come back as
    one used descriptor (the last buffer id); receive buffers, whose
    lengths matter, one each."""
    from test_net_harness import MAC_A, net_group

    transport = (Transport.INDIRECT_DESC, Transport.EVENT_IDX, Transport.VERSION_1, Transport.RING_PACKED,
                 Transport.IN_ORDER)
    with trio.fail_after(60):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with net_frontend(paths[0], packed=True) as fa, net_frontend(paths[1], packed=True) as fb:
                a = await net_probe(fa, transport_features=transport, queue_size=64)
                b = await net_probe(fb, transport_features=transport, queue_size=64)
                tx = packed_queue(a.drv, 1)
                assert tx.in_order and a.features & (1 << F_IN_ORDER)
                b.fill_rx(count=40, size=2048)
                frames = [eth(BCAST, MAC_A, bytes([i]) * 80) for i in range(20)]
                for f in frames:
                    tx.add_chain(out=[bytes(12) + f])
                tx.kick()
                got = await b.recv(len(frames))
                assert [f for _, f in got] == frames
                assert len(await tx.wait_used(len(frames), timeout=5)) == len(frames)
                # Count the used descriptors the device wrote: flags with
                # AVAIL == USED in slots the batch took.
                written = sum(1 for s in range(len(frames))
                              if tx.read_desc(s)[3] & (DescFlag.AVAIL | DescFlag.USED) ==
                              DescFlag.AVAIL | DescFlag.USED)
                assert written < len(frames), written


# ------------------------------------------------------------------ hostile rings


def _wrong_wrap(q: PackedDriverQueue) -> None:
    """A two-descriptor chain whose second descriptor carries last lap's bits."""
    gpa = q.memory.alloc(64, 8)
    q.write_desc(1, gpa, 64, 0, int(DescFlag.WRITE) | avail_flags(q.avail_wrap ^ 1))
    q.write_desc(0, gpa, 64, 0, int(DescFlag.NEXT) | avail_flags(q.avail_wrap))


def _id_out_of_range(q: PackedDriverQueue) -> None:
    q.write_desc(0, q.memory.alloc(64, 8), 64, q.num + 3, int(DescFlag.WRITE) | avail_flags(q.avail_wrap))


def _id_reused(q: PackedDriverQueue) -> None:
    gpa = q.memory.alloc(64, 8)
    q.write_desc(1, gpa, 64, 5, int(DescFlag.WRITE) | avail_flags(q.avail_wrap))
    q.write_desc(0, gpa, 64, 5, int(DescFlag.WRITE) | avail_flags(q.avail_wrap))


def _longer_than_ring(q: PackedDriverQueue) -> None:
    gpa = q.memory.alloc(64, 8)
    for s in reversed(range(q.num)):
        q.write_desc(s, gpa, 8, 1, int(DescFlag.NEXT | DescFlag.WRITE) | avail_flags(q.avail_wrap))


def _nested_indirect(q: PackedDriverQueue) -> None:
    table = q.memory.alloc(32, 16)
    q.memory.pack("<QIHH", table, q.memory.alloc(64, 8), 64, 0, int(DescFlag.WRITE))
    q.memory.pack("<QIHH", table + 16, table, 16, 0, int(DescFlag.INDIRECT))
    q.write_desc(0, table, 32, 0, int(DescFlag.INDIRECT) | avail_flags(q.avail_wrap))


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
@pytest.mark.parametrize("build,fault", [
    (_wrong_wrap, "VU_ERR_WRAP"), (_id_out_of_range, "VU_ERR_ID"), (_id_reused, "VU_ERR_ID_IN_FLIGHT"),
    (_longer_than_ring, "VU_ERR_LOOP"), (_nested_indirect, "VU_ERR_INDIRECT_NESTED"),
], ids=["wrong-wrap", "id-out-of-range", "id-reused", "longer-than-ring", "nested-indirect"])
async def test_hostile_packed_ring_needs_reset(tmp_path: Path, ring_impl: str, build: object, fault: str) -> None:
    """The device is marked as needing reset (status NEEDS_RESET, the ring
    error named); the process serves the next connection normally."""
    dev = RngDevice()
    with trio.fail_after(30):
        async with served(dev, tmp_path / "rng.sock", ring_impl=ring_impl) as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock"), packed=True) as fe:
                drv = Driver(fe, queue_size=8)
                await drv.probe()
                q = packed_queue(drv, 0)
                build(q)  # type: ignore[operator]
                q.notify()
                await wait_until(lambda: runner.status()["ring_error"] is not None, 10, "the ring error")
                assert fault in runner.status()["ring_error"]
                assert await fe.get_status() & STATUS_NEEDS_RESET
            async with Frontend.connect(str(tmp_path / "rng.sock"), packed=True) as fe:
                await probe_and_serve(fe)


# ------------------------------------------------------------------ a restarted back-end


@pytest.mark.parametrize("ring_state", [True, False], ids=["ring-state", "no-ring-state"])
async def test_restarted_backend_resumes_packed_rings(tmp_path: Path, ring_state: bool) -> None:
    """QEMU after a back-end restart: the same guest rings, a new
    connection, and SET_VRING_BASE with the base of the ring's first start
    (stale: QEMU cannot read a packed ring's state back from a dead
    back-end).  ``vuser run`` resumes from its ring state file; with
    ``--no-ring-state`` it believes the stale base and the guest's new
    buffers are never served (the control that shows the file matters)."""
    from vuser.frontend.memory import GuestRam
    from vuser.testing.process import VuserProcess

    sock = tmp_path / "rng.sock"
    args = [] if ring_state else ["--no-ring-state"]
    ram = GuestRam.create(64 * MiB, regions=2)
    try:
        with trio.fail_after(60):
            async with VuserProcess("rng", sock, args=args, log_path=tmp_path / "vuser0.log") as vp:
                async with Frontend.connect(str(sock), packed=True, memory=ram, own_memory=False) as fe:
                    drv = Driver(fe, queue_size=16)
                    await drv.probe()
                    first_base = next(e.fields.num for e in fe.trace if e.request == "SET_VRING_BASE")
                    q = packed_queue(drv, 0)
                    for _ in range(5):  # 5 x 7 slots on a 16-slot ring: two laps and a bit
                        added = [(q.add_inbuf(64), 64) for _ in range(5)]
                        added.append((q.add_chain(in_=[32, 32], indirect=False), 64))
                        q.kick()
                        check_rng_data(added, await q.wait_used(len(added), timeout=10))
                    await vp.kill()
            async with VuserProcess("rng", sock, args=args, log_path=tmp_path / "vuser1.log") as vp:
                async with Frontend.connect(str(sock), packed=True, memory=ram, own_memory=False) as fe:
                    q.renew_fds()
                    fe.queues[0] = q
                    fe.vring_bases[0] = first_base          # what QEMU sends: the first start's base
                    await fe.start(drv.queues, features=drv.features)
                    added = [(q.add_inbuf(100 + k), 100 + k) for k in range(5)]
                    q.kick()
                    if ring_state:
                        check_rng_data(added, await q.wait_used(len(added), timeout=10))
                        assert "resuming the packed ring" in vp.log_text()
                        assert (await fe.stop())[0] == expected_base(q)
                    else:
                        await trio.sleep(1)
                        assert len(q.get_used()) < len(added)
    finally:
        ram.close()


# ------------------------------------------------------------------ a chain that comes while notifications are off


class LateChainRng(RngDevice):
    """An rng whose round, once, lets the driver add a chain right after
    the round looked at the ring: what a guest on another CPU does while
    the device says "no kicks" (packed: DISABLE; split: NO_NOTIFY)."""

    hook: object = None

    def on_kick(self, queue: object) -> None:
        super().on_kick(queue)  # type: ignore[arg-type]
        hook, self.hook = self.hook, None
        if callable(hook):
            hook()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "split"])
async def test_chain_made_available_while_notifications_are_off(tmp_path: Path, packed: bool) -> None:
    """A kick finds the ring empty; during that round the driver adds a
    chain and does not kick (the device asked for none).  The pass must go
    again: the chain is served with no further kick."""
    dev = LateChainRng()
    with trio.fail_after(30):
        async with served(dev, tmp_path / "rng.sock"):
            async with Frontend.connect(str(tmp_path / "rng.sock"), packed=packed) as fe:
                drv = Driver(fe, decline=[F_EVENT_IDX])
                await drv.probe()
                q = drv.queue(0)
                dev.hook = lambda: q.add_inbuf(64)   # made available, never kicked
                q.notify()                           # a kick on an empty ring
                used = await q.wait_used(1, timeout=5)
                assert len(used) == 1 and used[0].length == 64
                assert q.stats.kicks == 1
