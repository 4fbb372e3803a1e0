"""Live migration against vuser, driven by the harness's migration
personality (vuser.frontend.migration: QEMU's sequence): the dirty log
covers every page the back-end wrote, logging toggles never disturb the
rings, the destination resumes from GET_VRING_BASE's bases, SEND_RARP
moves the switch's entry at once, and a cancelled migration stops the
logging.

The negative control: with the log withheld from the C data path (a test
hook in place of what the handler hooks up), the same check fails -- the
check can fail, and the logging it passes on comes from C.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from conftest import RING_IMPLS, check_rng_data, probe_and_serve, served, submit_mixed, wait_until
from test_net_harness import MAC_A, MAC_B, net_group, port_stats
from vuser.devices.net import NetDevice, NetSwitch
from vuser.frontend import Driver, Frontend
from vuser.frontend.migration import Migration, log_size
from vuser.frontend.netdriver import BCAST, NetGuest, eth
from vuser.frontend.netdriver import net_frontend as connect
from vuser.frontend.netdriver import net_probe as probe
from vuser.memory import GuestMemory
from vuser.runner import Runner
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request

ffi = pytest.importorskip("vuser._native").ffi

try:
    from vuser.devices.rng import RngDevice
except ImportError:  # pragma: no cover - a tree that was never installed
    from devices.rng import RngDevice  # type: ignore[no-redef]

F_GUEST_ANNOUNCE = 21


async def exchange(a: NetGuest, b: NetGuest, rounds: int, size: int = 1400, *, refill: bool = True) -> None:
    """B sends four frames to A and A answers, ``rounds`` times; every frame
    arrives.  ``refill=False``: A's driver gives no new receive buffers (it
    writes no buffer page: the back-end's log alone names the pages it
    fills)."""
    for i in range(rounds):
        frames = [eth(MAC_A, MAC_B, os.urandom(size - 14 - k)) for k in range(4)]
        for f in frames:
            b.send(f)
        assert [f for _, f in await a.recv(len(frames))] == frames
        if refill:
            a.fill_rx(count=len(frames))
        back = eth(MAC_B, MAC_A, bytes([i % 256]) * 100)
        a.send(back)
        assert [f for _, f in await b.recv(1)] == [back]
        b.fill_rx(count=1)


@dataclass
class Pair:
    """Guest A (its source on port 1) and guest B (port 0) of one switch."""

    switch: NetSwitch
    paths: list[str]
    fa: Frontend
    a: NetGuest
    b: NetGuest


@asynccontextmanager
async def pair(tmp_path: Path, ports: int = 2, *, packed: bool = False, personality: str = "qemu-11.1",
               decline: tuple[int, ...] = ()) -> AsyncIterator[Pair]:
    async with net_group(tmp_path, ports=ports) as (switch, _, paths):
        async with connect(paths[1], packed=packed, memory_mb=8, personality=personality) as fa, \
                connect(paths[0], packed=packed, memory_mb=8) as fb:
            a, b = await probe(fa, decline=list(decline)), await probe(fb)
            a.fill_rx()
            b.fill_rx()
            yield Pair(switch, paths, fa, a, b)


@pytest.mark.parametrize("packed", [False, True])
async def test_net_migration_logs_every_page_and_the_destination_resumes(tmp_path: Path, packed: bool) -> None:
    """Port 0: guest B.  Port 1: guest A's source; port 2: its destination."""
    with trio.fail_after(60):
        async with pair(tmp_path, 3, packed=packed, decline=(F_GUEST_ANNOUNCE,)) as p:
            switch, a, b = p.switch, p.a, p.b
            await exchange(a, b, 2)
            async with Migration(p.fa) as m:
                assert m.log is not None and m.log.size == log_size(p.fa.memory)
                await exchange(a, b, 3, size=1500, refill=False)
                assert m.sync()                   # one of QEMU's RAM iterations
                await exchange(a, b, 3, size=600, refill=False)
                await m.stop()
                check = m.check()
                assert check.ok, check
                # What was checked: A's receive buffers and used rings.
                assert len(check.log_only) >= 3, check
                assert port_stats(switch, 1)["drops"] == {}
                # Frames for A while it moves go to its old, stopped port.
                b.send(eth(MAC_A, MAC_B, b"lost in the switch-over"))
                await wait_until(lambda: port_stats(switch, 1)["drops"] == {"no_buffer": 1}, 5,
                                 "the frame to A's stopped port to be dropped")
                async with m.destination(p.paths[2]) as fd:
                    # The guest did not accept GUEST_ANNOUNCE: QEMU sends
                    # SEND_RARP, and the switch moves A's address at once.
                    await fd.request(Request.SEND_RARP, {"mac": MAC_A})
                    await fd.get_features()           # (applied by now)
                    assert switch.lookup(MAC_A) == 2
                    (_, rarp), = await b.recv(1)
                    assert rarp[6:12] == MAC_A and rarp[12:14] == b"\x80\x35"
                    b.fill_rx(count=1)
                    # The same rings, where the source left them.
                    await exchange(a, b, 2)
                    assert port_stats(switch, 2)["rx_packets"] == 2 * 4
                    # (the announcement was flooded to the old port too)
                    assert port_stats(switch, 1)["drops"] == {"no_buffer": 2}


async def test_idle_migration(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with pair(tmp_path, 3) as p:
            await exchange(p.a, p.b, 1)
            async with Migration(p.fa) as m:
                await m.stop()
                check = m.check()
                assert check.ok, check
                async with m.destination(p.paths[2]):
                    # GUEST_ANNOUNCE accepted: no SEND_RARP; the guest's own
                    # announcement moves its address, its old port stopped.
                    assert p.a.features & 1 << F_GUEST_ANNOUNCE
                    p.a.send(eth(BCAST, MAC_A, b"gratuitous ARP"))
                    await p.b.recv(1)
                    p.b.fill_rx(count=1)
                    assert p.switch.lookup(MAC_A) == 2
                    await exchange(p.a, p.b, 1)


async def test_cancelled_migration_keeps_the_rings_and_stops_logging(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vuser")
    with trio.fail_after(30):
        async with pair(tmp_path) as p:
            a, b = p.a, p.b
            async with Migration(p.fa) as m:
                await exchange(a, b, 2)
                await m.cancel()
                assert m.check().ok and m.logged
                # Logging is off: traffic goes on over the same rings, the
                # log stays untouched.
                await exchange(a, b, 3)
                assert m.sync() == set()
                # And on again (a second attempt), the rings still running.
                await m.begin()
                await exchange(a, b, 1)
                assert m.sync() and m.check().ok
            messages = [r.getMessage() for r in caplog.records if r.name.startswith("vuser")]
            assert [t for t in messages if "dirty logging" in t] == [
                "net: dirty logging on", "net: dirty logging off", "net: dirty logging on"]
            # No ring was stopped or restarted once logging began.
            since = messages[messages.index("net: dirty logging on"):]
            assert not [t for t in since if "stopped at avail index" in t or "started, size" in t]
            assert port_stats(p.switch, 1)["drops"] == {}


async def test_memory_hot_plug_while_logging_replaces_the_log(tmp_path: Path) -> None:
    """QEMU grows the log before it sends the bigger memory table
    (vhost_commit): a second SET_LOG_BASE replaces the first; nothing
    written in between is lost."""
    with trio.fail_after(30):
        async with pair(tmp_path, personality="qemu-7.2") as p:
            async with Migration(p.fa) as m:
                await exchange(p.a, p.b, 2, refill=False)
                small = m.log.size if m.log else 0
                p.fa.memory.add_region(1 << 20)          # above 4 GiB: a log 128 times larger
                await m.set_log_base()
                assert m.log is not None and m.log.size > small
                await p.fa.set_mem_table()
                await exchange(p.a, p.b, 2, refill=False)
                await m.stop()
                check = m.check()
                assert check.ok and check.log_only, check


async def test_log_fd_is_signalled_after_log_writes(tmp_path: Path) -> None:
    """SET_LOG_FD: the eventfd is signalled once the log was written."""
    with trio.fail_after(30):
        async with pair(tmp_path) as p:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                await p.fa.request(Request.SET_LOG_FD, {}, [efd])
                async with Migration(p.fa) as m:
                    await exchange(p.a, p.b, 1)
                    await trio.lowlevel.wait_readable(efd)
                    assert os.eventfd_read(efd) >= 1 and m.sync()
            finally:
                os.close(efd)


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
async def test_python_device_pushes_are_logged(tmp_path: Path, ring_impl: str) -> None:
    """The rng device writes its buffers in Python: the framework logs the
    written length of each (the device knows nothing of it)."""
    with trio.fail_after(30):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl):
            async with Frontend.connect(str(tmp_path / "rng.sock"), memory_mb=8) as fe:
                drv = Driver(fe)
                await drv.probe()
                q = drv.queue(0)
                # Buffers made available before, filled while logging: only
                # the back-end writes their pages from then on.
                added = submit_mixed(q, rounds=2)
                async with Migration(fe) as m:
                    q.kick()
                    check_rng_data(added, await q.wait_used(len(added), timeout=10))
                    await m.stop()
                    check = m.check()
                    assert check.ok, check
                    assert len(check.log_only) > 4, check


@pytest.mark.parametrize("device", ["rng", "net"])
async def test_forced_dirty_log_for_benchmarks(tmp_path: Path, device: str) -> None:
    """``vuser run --force-dirty-log``: a front-end that never migrates
    (DPDK's virtio_user has no LOG_SHMFD) still gets every write logged, into
    a private log -- what ``scripts/bench-net --dirty-log`` measures."""
    sock = str(tmp_path / "dev.sock")
    dev = RngDevice() if device == "rng" else NetDevice(switch=NetSwitch(mode="reflect"))
    runner = Runner(dev, sock, force_dirty_log=True)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            async with Frontend.connect(sock, personality="dpdk", memory_mb=8, num_queues=1 if device == "rng"
                                        else 2) as fe:
                assert not fe.has_protocol_feature(PF.LOG_SHMFD)
                if device == "rng":
                    await probe_and_serve(fe, chains=8)
                else:
                    g = await probe(fe)
                    g.fill_rx()
                    frames = [eth(MAC_B, MAC_A, os.urandom(1000)) for _ in range(8)]
                    for f in frames:
                        g.send(f)
                    assert len(await g.recv(len(frames))) == len(frames)
                log = runner.status()["dirty_log"]
                assert log["logging"] and log["updates"] >= 8 and log["outside"] == 0, log
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- negative control

@pytest.mark.parametrize("withheld", ["nothing", "data path", "everything"])
async def test_the_check_fails_without_c_logging(tmp_path: Path, withheld: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A test hook turns the C log writes off: the memory table's log is
    withheld from the net data path ("data path"), or the rings' too
    ("everything").  The harness's check must then fail."""
    if withheld != "nothing":
        real = GuestMemory.set_dirty_log

        def no_c_log(self: GuestMemory, log: Any) -> None:
            real(self, log)
            self.native.dirty = ffi.NULL

        monkeypatch.setattr(GuestMemory, "set_dirty_log", no_c_log)
    if withheld == "everything":
        from vuser.virtqueue import VirtQueue
        monkeypatch.setattr(VirtQueue, "set_log", lambda self, log, used_gpa=0: None)
    with trio.fail_after(30):
        async with pair(tmp_path) as p:
            async with Migration(p.fa) as m:
                await exchange(p.a, p.b, 3, refill=False)
                await m.stop()
                check = m.check()
    if withheld == "nothing":
        assert check.ok, check
    else:
        assert not check.ok, check
        assert check.stale
