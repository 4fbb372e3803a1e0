"""vuser's net switch against DPDK's ``net_virtio_user`` (testpmd): a real
userspace virtio-net driver on the other side of the socket.

- One testpmd sends 64-byte frames (``txonly``) through vuser's switch to
  another testpmd (``rxonly``) on a second socket: counted by both
  testpmds and by vuser's per-port counters, then the other way round.
- ``--reflect``: testpmd's ``flowgen`` gets its frames back from vuser.
- ``--sink`` with two queue pairs: both transmit queues drained.
- The first two also with packed rings (virtio_user's ``packed_vq=1``).

vuser runs in the test's process (one Runner per socket, as ``vuser run
net --socket A --socket B``).  Needs ``dpdk-testpmd`` (Debian's dpdk-dev).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from vuser.devices.net import NetSwitch
from vuser.runner import Runner, RunnerGroup
from vuser.testing import dpdk
from vuser.testing.poll import wait_until

try:
    from vuser.devices.net import NetDevice
except ImportError:  # pragma: no cover - a tree that was never installed
    from devices.net import NetDevice  # type: ignore[no-redef]

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(not dpdk.available(), reason="dpdk-testpmd not installed")]

FRAME = 64
RING = 256          # virtio_user's queue size: at most this many in flight
ENOUGH = 2000
DEADLINE = 60


def lcores(k: int) -> str:
    """testpmd instance k: main lcore and forwarding lcore, spread over the
    CPUs we may use (vuser's Python runs on whichever is free)."""
    cpus = sorted(os.sched_getaffinity(0))
    fwd = cpus[k % len(cpus)]
    return f"0@{fwd},1@{fwd}"


RINGS = {"split": "", "packed": ",packed_vq=1"}
PACKED = "VIRTIO_F_RING_PACKED"


@asynccontextmanager
async def vuser_net(tmp_path: Path, sockets: int, **switch_options: Any
                    ) -> AsyncIterator[tuple[NetSwitch, list[str]]]:
    queue_pairs = switch_options.pop("queue_pairs", 1)
    switch = NetSwitch(**switch_options)
    devices = [NetDevice(switch=switch, queue_pairs=queue_pairs, port_name=f"dpdk{i}")
               for i in range(sockets)]
    for d in devices:
        d.port  # noqa: B018 - ports in socket order
    paths = [str(tmp_path / f"vnet{i}.sock") for i in range(sockets)]
    runners = [Runner(d, p) for d, p in zip(devices, paths)]
    RUNNERS[:] = runners
    group = RunnerGroup(runners, background=[switch.run])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(group.run)
            try:
                yield switch, paths
            finally:
                nursery.cancel_scope.cancel()
    finally:
        switch.close()


RUNNERS: list[Runner] = []   # of the running vuser_net, for the negotiated features


def negotiated(i: int) -> list[str]:
    return list(RUNNERS[i].status()["negotiated_features"])


def port(switch: NetSwitch, i: int) -> dict[str, Any]:
    return switch.stats()["ports"][i]


async def one_way(sender: dpdk.Testpmd, receiver: dpdk.Testpmd, switch: NetSwitch,
                  tx_port: int, rx_port: int) -> None:
    """sender txonly -> vuser -> receiver rxonly; checks every count."""
    tx_before = port(switch, tx_port)["tx_packets"]
    rx_before = (await receiver.stats())[0].rx_packets
    await receiver.start()
    await sender.start()
    await wait_until(lambda: receiver.received_more(rx_before + ENOUGH), DEADLINE,
                     f"{receiver.name} to receive {ENOUGH} frames", interval=0.05)
    await sender.stop()
    sent = (await sender.stats())[0]
    # vuser takes every frame off the sender's ring ...
    await wait_until(lambda: port(switch, tx_port)["tx_packets"] - tx_before >= sent.tx_packets,
                     10, f"vuser to take the {sent.tx_packets} frames sent", interval=0.05)
    await trio.sleep(0.2)
    await receiver.stop()
    got = (await receiver.stats())[0]
    s_tx, s_rx = port(switch, tx_port), port(switch, rx_port)
    took = s_tx["tx_packets"] - tx_before
    assert took == sent.tx_packets, (took, sent)
    assert sent.tx_bytes == FRAME * sent.tx_packets
    # ... and every frame is either in the receiver's counters or dropped
    # by vuser for a counted reason (the receiver's ring was full).
    # No frame dropped at the source (header, size, destination); the only
    # drops anywhere are full receive rings (counted on the receiving port).
    assert set(s_tx["drops"]) <= {"no_buffer"}, s_tx
    assert set(s_rx["drops"]) <= {"no_buffer"}, s_rx
    delivered = got.rx_packets - rx_before
    assert delivered > ENOUGH
    assert s_rx["rx_packets"] >= delivered
    assert s_rx["rx_bytes"] == FRAME * s_rx["rx_packets"]
    print(f"port {tx_port} -> {rx_port}: testpmd sent {sent.tx_packets}, vuser took {took}, "
          f"delivered {s_rx['rx_packets']} (dropped {s_rx['dropped']}), testpmd received {delivered}")


@pytest.mark.parametrize("ring", sorted(RINGS))
async def test_testpmd_to_testpmd_through_vuser(tmp_path: Path, ring: str) -> None:
    with trio.fail_after(DEADLINE):
        async with vuser_net(tmp_path, 2) as (switch, paths):
            async with dpdk.testpmd(f"net_virtio_user0,path={paths[0]},queues=1{RINGS[ring]}", fwd="txonly",
                                    txpkts=FRAME, lcores=lcores(0), name="a",
                                    log_path=tmp_path / "a.log") as a, \
                    dpdk.testpmd(f"net_virtio_user0,path={paths[1]},queues=1{RINGS[ring]}", fwd="rxonly",
                                 lcores=lcores(1), name="b", log_path=tmp_path / "b.log") as b:
                for i in range(2):
                    assert (PACKED in negotiated(i)) == (ring == "packed"), negotiated(i)
                await one_way(a, b, switch, 0, 1)
                # The other way round: forward modes switch at the prompt.
                await a.command("set fwd rxonly")
                await b.command("set fwd txonly")
                await b.command(f"set txpkts {FRAME}")
                await one_way(b, a, switch, 1, 0)
            st = switch.stats()
            assert st["ports"][0]["tx_packets"] > ENOUGH and st["ports"][1]["tx_packets"] > ENOUGH


@pytest.mark.parametrize("ring", sorted(RINGS))
async def test_reflect_back_to_testpmd(tmp_path: Path, ring: str) -> None:
    with trio.fail_after(DEADLINE):
        async with vuser_net(tmp_path, 1, mode="reflect") as (switch, paths):
            async with dpdk.testpmd(f"net_virtio_user0,path={paths[0]},queues=1{RINGS[ring]}", fwd="flowgen",
                                    txpkts=FRAME, lcores=lcores(0), name="r",
                                    log_path=tmp_path / "r.log") as tp:
                assert (PACKED in negotiated(0)) == (ring == "packed"), negotiated(0)
                await tp.start()
                await wait_until(lambda: tp.received_more(ENOUGH), DEADLINE,
                                 f"{ENOUGH} frames back", interval=0.05)
                await tp.stop()
                await trio.sleep(0.2)
                s = (await tp.stats())[0]
                p = port(switch, 0)
                # Every frame taken was sent back or dropped (ring full), counted.
                await wait_until(lambda: port(switch, 0)["tx_packets"] == s.tx_packets, 10,
                                 f"vuser to take the {s.tx_packets} frames sent", interval=0.05)
                p = port(switch, 0)
                assert p["tx_packets"] == s.tx_packets
                assert p["rx_packets"] + p["dropped"] == p["tx_packets"]
                assert set(p["drops"]) <= {"no_buffer"}
                assert p["rx_packets"] >= s.rx_packets > ENOUGH


async def test_sink_two_queue_pairs(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with vuser_net(tmp_path, 1, mode="sink", queue_pairs=2) as (switch, paths):
            async with dpdk.testpmd(f"net_virtio_user0,path={paths[0]},queues=2", fwd="txonly",
                                    txpkts=FRAME, lcores=lcores(0), name="mq",
                                    args=["--rxq=2", "--txq=2"],
                                    log_path=tmp_path / "mq.log") as tp:
                await tp.start()
                await trio.sleep(1)
                await tp.stop()
                sent = (await tp.stats())[0].tx_packets
                await wait_until(lambda: port(switch, 0)["tx_packets"] >= sent, 10,
                                 f"vuser to take the {sent} frames sent", interval=0.05)
                p = port(switch, 0)
                assert p["tx_packets"] == sent > ENOUGH
                assert p["drops"] == {"sink": sent}
