"""Python devices as a fault domain (issue 9): what a front-end or guest
does to the balloon or rng ends at most its own connection, and no guest
can make a device allocate or work without bound.

Each case serves the device in-process next to a second, well-behaved rng
connection that keeps being served throughout."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from conftest import BalloonDevice, RngDevice, fd_count, probe_and_serve, served, wait_until
from vuser.devices.balloon.pages import MAX_PFNS_PER_BUFFER, PAGE_SIZE
from vuser.devices.rng import RNG_MAX_FILL
from vuser.frontend import Driver, Frontend, GuestRam
from vuser.runner import Runner

KiB, MiB = 1 << 10, 1 << 20
BALLOON_CONFIG_SIZE = 16
F_STATS_VQ, F_REPORTING = 1, 5
F_SEAL_FUTURE_WRITE = 0x0010  # linux/fcntl.h (Python 3.11's fcntl lacks it)


@asynccontextmanager
async def bystander(tmp_path: Path) -> AsyncIterator[list[int]]:
    """An rng connection served over and over beside the case: yields a
    counter of rounds served."""
    rounds = [0]
    async with served(RngDevice(), tmp_path / "other.sock"):
        async with trio.open_nursery() as nursery:
            async def serve() -> None:
                while True:
                    async with Frontend.connect(str(tmp_path / "other.sock")) as fe:
                        await probe_and_serve(fe, chains=2)
                        await fe.stop()
                    rounds[0] += 1

            nursery.start_soon(serve)
            await wait_until(lambda: rounds[0] >= 1, 10, "the bystander to be served")
            yield rounds
            before = rounds[0]
            await wait_until(lambda: rounds[0] > before, 10, "the bystander to go on being served")
            nursery.cancel_scope.cancel()


async def test_rng_truncated_memory_ends_that_connection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """rng copies into guest memory through the SIGBUS guard: a truncated
    region closes the connection with one line, not the process."""
    caplog.set_level(logging.INFO, logger="vuser")
    with trio.fail_after(30):
        async with bystander(tmp_path), served(RngDevice(), tmp_path / "rng.sock") as runner:
            ram = GuestRam.create(16 * MiB, regions=1, sealable=False)
            async with Frontend.connect(str(tmp_path / "rng.sock"), memory=ram) as fe:
                drv = Driver(fe)
                await drv.probe()
                q = drv.queue(0)
                q.add_inbuf(4096)
                os.ftruncate(ram.regions[0].fd, 0)
                q.notify()
                await fe.expect_disconnect(10)
            lines = [r.getMessage() for r in caplog.records if "closing connection" in r.getMessage()]
            assert len(lines) == 1 and "guest memory faulted" in lines[0], lines
            assert runner.connection is None
            async with Frontend.connect(str(tmp_path / "rng.sock")) as fe:
                await probe_and_serve(fe)


async def test_rng_fills_a_huge_buffer_in_a_bounded_piece(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with served(RngDevice(), tmp_path / "rng.sock"):
            async with Frontend.connect(str(tmp_path / "rng.sock"), memory_mb=64) as fe:
                drv = Driver(fe)
                await drv.probe()
                q = drv.queue(0)
                q.add_inbuf(32 * MiB)
                q.kick()
                (elem,) = await q.wait_used(1, timeout=10)
                assert elem.length == RNG_MAX_FILL


async def probe_balloon(fe: Frontend, queues: list[int]) -> Driver:
    drv = Driver(fe, queues=queues)
    await drv.probe()
    return drv


async def test_balloon_report_on_memory_that_cannot_be_released(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A memfd sealed against writes after vuser mapped it makes MADV_REMOVE
    fail: the report is answered, one warning, the connection lives on."""
    caplog.set_level(logging.INFO, logger="vuser")
    dev = BalloonDevice(stats_interval=0, without=["FREE_PAGE_HINT"])
    with trio.fail_after(30):
        async with bystander(tmp_path), served(dev, tmp_path / "b.sock"):
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = await probe_balloon(fe, [0, 1, 2, 3])
                fcntl.fcntl(fe.memory.regions[0].fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
                q = drv.queue(3)
                for _ in range(3):
                    q.add_inbuf(64 * KiB)
                q.kick()
                assert len(await q.wait_used(3, timeout=10)) == 3
                assert dev.bytes_reported == 3 * 64 * KiB
                warnings = [r.getMessage() for r in caplog.records
                            if r.levelno == logging.WARNING and "cannot release" in r.getMessage()]
                assert len(warnings) == 1, warnings  # rate-limited: one line for three
                # Still served.
                q.add_inbuf(4 * KiB)
                q.kick()
                assert len(await q.wait_used(1, timeout=10)) == 1


async def test_balloon_pfns_are_bounded_and_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A buffer of 8 MiB of PFNs: only MAX_PFNS_PER_BUFFER are read; PFNs
    outside guest RAM are dropped and counted, in one warning line."""
    caplog.set_level(logging.INFO, logger="vuser")
    dev = BalloonDevice(stats_interval=0)
    with trio.fail_after(60):
        async with served(dev, tmp_path / "b.sock"):
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE,
                                        memory_mb=64) as fe:
                drv = await probe_balloon(fe, [0, 1])
                inflate = drv.queue(0)
                ram_pages = (64 * MiB) // PAGE_SIZE
                pfns = [0x100 + k for k in range(16)] + [ram_pages + 10 + k for k in range(16)] + \
                    [0xFFFF_FFFF] * (2 * MiB)
                inflate.add_outbuf(struct.pack(f"<{len(pfns)}I", *pfns))
                inflate.kick()
                assert len(await inflate.wait_used(1, timeout=30)) == 1
                assert dev.status()["inflated_pages"] == 16
                assert dev.ignored_pfns == len(pfns) - MAX_PFNS_PER_BUFFER
                assert dev.bad_pages == 16 + 1  # distinct pages: 0xFFFFFFFF counts once
                warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
                assert len(warnings) == 1, warnings


async def test_balloon_stale_stats_buffer_after_reconnect(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The stats buffer held from one connection is never pushed into the
    next one's ring (it used to raise from the stats timer)."""
    caplog.set_level(logging.INFO, logger="vuser")
    dev = BalloonDevice(stats_interval=0.05)
    with trio.fail_after(30):
        async with bystander(tmp_path), served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = await probe_balloon(fe, [0, 1, 2])
                stats = drv.queue(2)
                for _ in range(7):  # the head held is 6
                    stats.add_outbuf(bytes(10))
                stats.kick()
                await wait_until(lambda: dev.stats_updates >= 1, 10, "a stats buffer")
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, queues=[0, 1, 2], queue_size=4)
                await drv.probe()
                await trio.sleep(0.3)  # several stats intervals
                assert runner.connection is not None
                await fe.stop()
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            fds = fd_count()
        assert fd_count() <= fds


async def test_control_client_errors_stay_with_the_client(tmp_path: Path) -> None:
    runner = Runner(RngDevice(), str(tmp_path / "rng.sock"), control_path=str(tmp_path / "ctl"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            for junk in (b"[" * 50_000 + b"\n", b'{"command": 1, "args": 5}\n', b"\xff\xfe\n", b"null\n"):
                stream = await trio.open_unix_socket(str(tmp_path / "ctl"))
                async with stream:
                    await stream.send_all(junk)
                    assert b'"ok": false' in await stream.receive_some(4096)
            from vuser.control import call
            assert (await call(str(tmp_path / "ctl"), "status"))["device"] == "rng"
            nursery.cancel_scope.cancel()


async def test_full_blocking_call_eventfd_does_not_block_the_process(tmp_path: Path) -> None:
    """The front-end clears O_NONBLOCK on the call eventfd it shares with
    vuser and fills its counter: a write would block the whole process.
    vuser polls first and counts a full counter as already signalled."""
    with trio.fail_after(30):
        async with bystander(tmp_path) as rounds, served(RngDevice(), tmp_path / "rng.sock") as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock")) as fe:
                drv = Driver(fe)
                await drv.probe()
                q = drv.queue(0)
                os.set_blocking(q.call_fd, True)
                os.eventfd_write(q.call_fd, 0xFFFF_FFFF_FFFF_FFFE)  # the most a counter holds
                before = rounds[0]
                for _ in range(5):
                    q.add_inbuf(64)
                    q.kick(force=True)
                    await trio.sleep(0.05)
                await wait_until(lambda: rounds[0] > before, 10, "the bystander to be served meanwhile")
                assert runner.status()["queues"][0]["buffers"] == 5
