"""DPDK against DPDK over a vhost-user socket: proves the testpmd tooling.

DPDK's ``net_virtio_user`` (a userspace virtio-net front-end) sends 64-byte
frames (``txonly``) to DPDK's ``net_vhost`` back-end (``rxonly``); both sides
count.  Later tests put vuser where net_vhost is.  Needs ``dpdk-testpmd``
(Debian's dpdk-dev; scripts/provision installs it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from vuser.testing import dpdk
from vuser.testing.poll import wait_until

FRAME = 64
RING = 256          # virtio_user's default queue size: at most this many in flight
ENOUGH = 1000       # packets each side must count
DEADLINE = 25       # seconds for the whole test


def lcores() -> tuple[str, str]:
    """(back-end, front-end) --lcores: forwarding lcores on different CPUs
    when there are two; each main lcore (idle at the prompt) on the other."""
    cpus = sorted(os.sched_getaffinity(0))
    back, front = cpus[0], cpus[1 % len(cpus)]
    return f"0@{front},1@{back}", f"0@{back},1@{front}"


async def exchange(front: dpdk.Testpmd, back: dpdk.Testpmd) -> dict[int, dpdk.ForwardStats]:
    """Forward until the back-end counted ENOUGH, then stop the front-end and
    wait for the back-end to drain the ring.  Returns the front-end's
    forwarding counters."""
    await back.start()
    await front.start()
    await wait_until(lambda: back.received_more(ENOUGH), DEADLINE, f"{ENOUGH} frames received",
                     interval=0.05)
    front_fwd = await front.stop()
    sent = (await front.stats())[0].tx_packets
    with trio.move_on_after(5):
        while (await back.stats())[0].rx_packets < sent:
            await trio.sleep(0.05)
    return front_fwd


def check(front_stats: dict[int, dpdk.PortStats], back_stats: dict[int, dpdk.PortStats],
          front_fwd: dict[int, dpdk.ForwardStats]) -> None:
    tx, rx = front_stats[0], back_stats[0]
    assert tx.tx_packets > ENOUGH, tx
    assert rx.rx_packets > ENOUGH, rx
    # What the back-end received is what the front-end sent, less at most a
    # ring's worth still in flight.
    assert tx.tx_packets - RING <= rx.rx_packets <= tx.tx_packets, (tx, rx)
    assert front_fwd[0].tx_packets == tx.tx_packets
    assert tx.tx_bytes == FRAME * tx.tx_packets
    assert rx.rx_bytes == FRAME * rx.rx_packets
    assert tx.tx_errors == 0 and rx.rx_errors == 0 and rx.rx_missed == 0


@pytest.mark.guest
async def test_virtio_user_to_net_vhost(tmp_path: Path) -> None:
    """net_vhost listens (the usual set-up, as with QEMU); virtio_user connects."""
    sock = tmp_path / "net.sock"
    back_lcores, front_lcores = lcores()
    with trio.fail_after(DEADLINE):
        async with dpdk.testpmd(f"net_vhost0,iface={sock},queues=1", fwd="rxonly",
                           lcores=back_lcores, name="backend",
                           log_path=tmp_path / "backend.log") as back:
            async with dpdk.testpmd(f"net_virtio_user0,path={sock},queues=1", fwd="txonly",
                               txpkts=FRAME, lcores=front_lcores, name="frontend",
                               log_path=tmp_path / "frontend.log") as front:
                front_fwd = await exchange(front, back)
                front_stats = await front.stats()
            # The front-end has quit (GET_VRING_BASE, close); the back-end's
            # counters stay.
            back_stats = await back.stats()
    check(front_stats, back_stats, front_fwd)


@pytest.mark.guest
async def test_virtio_user_server_to_net_vhost_client(tmp_path: Path) -> None:
    """Reversed roles on the socket: virtio_user listens (server=1), net_vhost
    connects (client=1) -- the set-up ``vuser run --client`` meets."""
    sock = tmp_path / "net.sock"
    back_lcores, front_lcores = lcores()
    with trio.fail_after(DEADLINE):
        # virtio_user's start-up blocks in accept() until a back-end connects.
        async with dpdk.testpmd(f"net_virtio_user0,path={sock},queues=1,server=1", fwd="txonly",
                           txpkts=FRAME, lcores=front_lcores, name="frontend",
                           log_path=tmp_path / "frontend.log", wait_ready=False) as front:
            await wait_until(sock.exists, DEADLINE, f"{sock} to exist", interval=0.02)
            async with dpdk.testpmd(f"net_vhost0,iface={sock},queues=1,client=1", fwd="rxonly",
                               lcores=back_lcores, name="backend",
                               log_path=tmp_path / "backend.log") as back:
                await front.wait_ready()
                front_fwd = await exchange(front, back)
                front_stats = await front.stats()
                back_stats = await back.stats()
    check(front_stats, back_stats, front_fwd)
