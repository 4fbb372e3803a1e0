"""Shared helpers for the integration tests: vuser devices served in-process
by ``Runner`` on real unix sockets, driven by the front-end harness.

Everything here runs in the test's own trio loop: the back-end (Runner ->
serve_unix -> Connection) and the harness (Frontend, Driver) are two sets of
tasks talking over a real socket, with memfd guest memory and eventfds, so
``/proc/self/fd`` counts both sides.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import pytest
import trio

from vuser.device import Device
from vuser.frontend import Driver, DriverQueue, Frontend, UsedElem
from vuser.runner import Runner
from vuser.testing.poll import wait_until  # re-exported: the tests import it from here

try:  # installed layout (pip install -e .): devices/ is vuser.devices
    from vuser.devices.balloon import BalloonDevice
    from vuser.devices.rng import RngDevice
except ImportError:  # pragma: no cover - a tree that was never installed
    from devices.balloon import BalloonDevice  # type: ignore[no-redef]
    from devices.rng import RngDevice  # type: ignore[no-redef]

__all__ = [
    "BalloonDevice", "RngDevice", "served", "fd_count", "wait_until", "wait_idle", "sync",
    "closing_lines", "submit_mixed", "check_rng_data", "probe_and_serve",
    "RING_IMPLS", "PERSONALITY_NAMES", "F_INDIRECT", "F_EVENT_IDX", "F_VERSION_1",
    "STATUS_NEEDS_RESET",
]

F_INDIRECT, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
RING_IMPLS = ("native", "python")
PERSONALITY_NAMES = ("qemu-11.1", "qemu-7.2", "dpdk")


@asynccontextmanager
async def served(device: Device, path: Path | str, *, ring_impl: str = "native",
                 control_path: str | None = None) -> AsyncIterator[Runner]:
    """Serve ``device`` on ``path`` (server mode) for the body of the block."""
    runner = Runner(device, str(path), ring_impl=ring_impl, control_path=control_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        try:
            yield runner
        finally:
            nursery.cancel_scope.cancel()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_idle(runner: Runner, connections: int, timeout: float = 5.0) -> None:
    """Wait until ``runner`` has served ``connections`` connections and has
    none open (the back-end side has released everything)."""
    await wait_until(lambda: runner.connections >= connections and runner.connection is None,
                     timeout, f"the back-end to finish connection {connections}")


async def sync(fe: Frontend) -> None:
    """A request with a reply: every message sent before it has been applied
    by the back-end (most requests have no reply without REPLY_ACK)."""
    await fe.get_features()


def closing_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The back-end's 'closing connection: REQUEST: fault' log lines."""
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("vuser") and "closing connection" in r.getMessage()]


def submit_mixed(q: DriverQueue, rounds: int = 1) -> list[tuple[int, int]]:
    """Add a mix of chains to an rng request queue: direct single buffers of
    various sizes, direct multi-segment chains, indirect chains (one or
    several segments), a chain with a device-readable header.  Returns
    (head, device-writable bytes) per chain in submission order."""
    added: list[tuple[int, int]] = []
    for r in range(rounds):
        for size in (1, 16, 64, 511, 4096, 4097):
            added.append((q.add_inbuf(size + r), size + r))
        added.append((q.add_chain(in_=[32, 100, 7], indirect=False), 139))
        added.append((q.add_chain(in_=[64], indirect=True), 64))
        added.append((q.add_chain(in_=[128, 256, 8, 8], indirect=True), 400))
        added.append((q.add_chain(out=[b"hdr!" * 4], in_=[48, 80], indirect=False), 128))
        added.append((q.add_chain(out=[b"x" * 8], in_=[200], indirect=True), 200))
    return added


def check_rng_data(added: Iterable[tuple[int, int]], used: list[UsedElem]) -> None:
    """Every chain came back once, with all its device-writable bytes
    filled, non-zero, and different from every other buffer."""
    expected = dict(added)
    got = {u.head: u for u in used}
    assert len(got) == len(used), "a head came back twice"
    assert set(got) == set(expected), f"heads {sorted(got)} != {sorted(expected)}"
    seen: set[bytes] = set()
    for head, size in expected.items():
        elem = got[head]
        assert elem.length == size, f"head {head}: length {elem.length}, expected {size}"
        assert len(elem.data) == size
        if size >= 16:
            assert elem.data.count(0) < size, f"head {head}: all zero"
            assert elem.data not in seen, f"head {head}: same bytes as another buffer"
            seen.add(elem.data)


async def probe_and_serve(fe: Frontend, *, chains: int = 4, **driver_options: Any) -> Driver:
    """A whole probe of an rng device and a few buffers served (used to show
    that a connection after a bad one is served normally)."""
    drv = Driver(fe, **driver_options)
    await drv.probe()
    q = drv.queue(0)
    added = [(q.add_inbuf(64 + i), 64 + i) for i in range(chains)]
    q.kick()
    used = await q.wait_used(len(added), timeout=10)
    check_rng_data(added, used)
    return drv


