"""vuser's net device: ports of one switch served in-process on real unix
sockets (one Runner per socket, as ``vuser run net --socket A --socket B``),
driven by the front-end harness playing two guests.

What is shown: two guests on two sockets exchange frames byte-exact (flood
while unknown, then learned unicast); reflect and sink modes; the legacy
10-byte header (VERSION_1 and MRG_RXBUF declined) against a modern guest;
mergeable receive buffers (num_buffers); two queue pairs and GET_QUEUE_NUM
in queue pairs; NET_SET_MTU; SEND_RARP; drops counted by reason; the
DPDK personality (memory table replaced while running); pcap output; the
control socket; a host tap port; and the command line with two sockets.
"""

from __future__ import annotations

import os
import socket
import struct
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from conftest import wait_until
from vuser.control import call as control_call
from vuser.frontend.netdriver import BCAST, eth
from vuser.frontend.netdriver import net_frontend as connect
from vuser.frontend.netdriver import net_probe as probe
from vuser.devices.net import NetSwitch
from vuser.runner import Runner, RunnerGroup
from vuser.testing.netframes import VnetHdr, offload_hdr, parse_tcp, tcp_frame
from vuser.testing.process import VuserProcess
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request

try:
    from vuser.devices.net import NetDevice
except ImportError:  # pragma: no cover - a tree that was never installed
    from devices.net import NetDevice  # type: ignore[no-redef]

F_CSUM, F_GUEST_CSUM, F_MTU, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6 = 0, 1, 3, 7, 8, 11, 12
F_MRG_RXBUF, F_STATUS, F_MQ = 15, 16, 22
F_EVENT_IDX, F_VERSION_1 = 29, 32
MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")


@asynccontextmanager
async def net_group(tmp_path: Path, ports: int = 2, *, mode: str = "switch", queue_pairs: int = 1,
                    pcap: str | None = None, control: str | None = None, busy_poll: bool = False,
                    taps: tuple[str, ...] = ()) -> AsyncIterator[tuple[NetSwitch, list[NetDevice], list[str]]]:
    switch = NetSwitch(mode=mode, pcap=pcap, busy_poll=busy_poll)
    devices = [NetDevice(switch=switch, queue_pairs=queue_pairs, port_name=f"port{i}") for i in range(ports)]
    for d in devices:
        d.port  # noqa: B018 - number the ports in order
    for tap in taps:
        switch.add_tap(tap)
    paths = [str(tmp_path / f"net{i}.sock") for i in range(ports)]
    group = RunnerGroup([Runner(d, p) for d, p in zip(devices, paths)], control_path=control,
                        background=[switch.run])
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(group.run)
            try:
                yield switch, devices, paths
            finally:
                nursery.cancel_scope.cancel()
    finally:
        switch.close()


def port_stats(switch: NetSwitch, index: int) -> dict[str, Any]:
    return switch.stats()["ports"][index]


# ------------------------------------------------------------------ switching


@pytest.mark.parametrize("personality", ["qemu-11.1", "qemu-7.2", "dpdk"])
async def test_two_guests_exchange_frames(tmp_path: Path, personality: str) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0], personality=personality) as fa, \
                    connect(paths[1], personality=personality) as fb:
                a, b = await probe(fa), await probe(fb)
                assert a.hdr_len == b.hdr_len == 12
                a.fill_rx()
                b.fill_rx()
                # Unknown destination: flooded to B, and A's address is learned.
                frames = [eth(BCAST, MAC_A, bytes([i]) * (46 + 97 * i)) for i in range(10)]
                for f in frames:
                    a.send(f)
                await a.wait_sent(len(frames))
                got = await b.recv(len(frames))
                assert [f for _, f in got] == frames
                assert all(h == bytes(10) + b"\x01\x00" for h, _ in got)
                assert switch.lookup(MAC_A) == 0
                # B answers unicast; its address is learned too.
                replies = [eth(MAC_A, MAC_B, os.urandom(n - 14)) for n in (60, 1000, 1514)]
                for f in replies:
                    b.send(f, split=False)
                await b.wait_sent(len(replies))
                assert [f for _, f in await a.recv(len(replies))] == replies
                assert switch.lookup(MAC_B) == 1
                # Unicast to a learned address reaches only that port.
                a.send(eth(MAC_B, MAC_A, b"x" * 50))
                assert [f for _, f in await b.recv(1)] == [eth(MAC_B, MAC_A, b"x" * 50)]

                sa, sb = port_stats(switch, 0), port_stats(switch, 1)
                assert sa["tx_packets"] == 11 and sa["rx_packets"] == 3
                assert sb["tx_packets"] == 3 and sb["rx_packets"] == 11
                assert sa["tx_bytes"] == sum(map(len, frames)) + 64 == sb["rx_bytes"]
                assert sa["dropped"] == sb["dropped"] == 0
                st = devices[0].status()
                assert st["flooded"] == 10 and st["learned"] == 2


async def test_legacy_header_against_modern(tmp_path: Path) -> None:
    """A legacy driver (VERSION_1 and MRG_RXBUF declined) uses 10-byte
    headers; the modern peer sees 12-byte ones (seed 003)."""
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a = await probe(fa, decline=[F_VERSION_1, F_MRG_RXBUF])
                b = await probe(fb)
                assert a.hdr_len == 10 and b.hdr_len == 12
                a.fill_rx()
                b.fill_rx()
                to_b = [eth(BCAST, MAC_A, os.urandom(n)) for n in (46, 333, 1500)]
                for f in to_b:
                    a.send(f)
                got = await b.recv(len(to_b))
                assert [f for _, f in got] == to_b
                to_a = [eth(MAC_A, MAC_B, os.urandom(n)) for n in (46, 777)]
                for f in to_a:
                    b.send(f)
                got = await a.recv(len(to_a))
                assert [f for _, f in got] == to_a
                assert all(h == bytes(10) for h, _ in got)
                assert port_stats(switch, 0)["dropped"] == port_stats(switch, 1)["dropped"] == 0


async def test_legacy_without_mrg_but_modern_keeps_12_bytes(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a = await probe(fa, decline=[F_MRG_RXBUF])
                b = await probe(fb, decline=[F_VERSION_1])  # legacy, but mergeable
                assert a.hdr_len == 12 and b.hdr_len == 12 and b.mergeable and not a.mergeable
                a.fill_rx()
                b.fill_rx()
                f = eth(BCAST, MAC_A, os.urandom(600))
                a.send(f)
                (hdr, got), = await b.recv(1)
                assert got == f and hdr[10:12] == b"\x01\x00"
                g = eth(MAC_A, MAC_B, os.urandom(700))
                b.send(g)
                (hdr, got), = await a.recv(1)
                assert got == g and hdr == bytes(10) + b"\x01\x00"


async def test_mergeable_receive_buffers(tmp_path: Path) -> None:
    """Small receive buffers: a frame spans several, num_buffers says how
    many, and a frame is never published half."""
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                # MTU declined: a driver may then send frames up to 64 KiB.
                a, b = await probe(fa, decline=[F_MTU]), await probe(fb, decline=[F_MTU])
                assert b.mergeable
                b.fill_rx(count=200, size=128)
                sizes = [60, 116, 117, 500, 1514, 9000]
                frames = [eth(BCAST, MAC_A, os.urandom(n - 14)) for n in sizes]
                for f in frames:
                    a.send(f)
                got = await b.recv(len(frames))
                assert [f for _, f in got] == frames
                nbufs = [struct.unpack_from("<H", h, 10)[0] for h, _ in got]
                assert nbufs == [-(-(12 + n) // 128) for n in sizes]
                st = port_stats(switch, 1)
                assert st["rx_buffers"] == sum(nbufs) and st["rx_packets"] == len(frames)
                # Not enough buffers left for a big frame: dropped, counted,
                # and the buffers it would have used are still there.
                left = 200 - sum(nbufs)
                a.send(eth(BCAST, MAC_A, bytes(128 * (left + 1))))
                await a.wait_sent(len(frames) + 1)
                assert port_stats(switch, 1)["drops"] == {"no_buffer": 1}
                small = eth(BCAST, MAC_A, b"s" * 50)
                a.send(small)
                assert [f for _, f in await b.recv(1)] == [small]


async def test_non_mergeable_buffer_too_small(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a, b = await probe(fa), await probe(fb, decline=[F_MRG_RXBUF])
                b.fill_rx(count=4, size=512)
                a.send(eth(BCAST, MAC_A, bytes(1000)))      # does not fit: dropped, buffer kept
                ok = eth(BCAST, MAC_A, bytes(400))
                a.send(ok)
                assert [f for _, f in await b.recv(1)] == [ok]
                assert port_stats(switch, 1)["drops"] == {"rx_too_small": 1}


async def test_two_queue_pairs(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path, queue_pairs=2) as (switch, devices, paths):
            async with connect(paths[0], pairs=2) as fa, connect(paths[1], pairs=2) as fb:
                # GET_QUEUE_NUM counts queue pairs (QEMU: queues=N <= it).
                assert fa.queue_num == 2
                a, b = await probe(fa, 2), await probe(fb, 2)
                assert a.features & (1 << F_MQ)
                for qp in (0, 1):
                    a.fill_rx(qp)
                    b.fill_rx(qp)
                f0 = eth(BCAST, MAC_A, b"zero" * 20)
                f1 = eth(BCAST, MAC_A, b"one!" * 20)
                a.send(f0, qp=0)
                a.send(f1, qp=1)
                assert [f for _, f in await b.recv(1, qp=0)] == [f0]
                assert [f for _, f in await b.recv(1, qp=1)] == [f1]
                # B's second pair disabled (the guest set 1 pair through the
                # control queue, QEMU disables the others): everything on 0.
                await fb.set_vring_enable(2, False)
                await fb.set_vring_enable(3, False)
                a.send(f1, qp=1)
                assert [f for _, f in await b.recv(1, qp=0)] == [f1]
                assert devices[1].read_config(8, 2) == b"\x02\x00"


async def test_mq_declined_means_one_pair(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path, queue_pairs=2) as (switch, devices, paths):
            async with connect(paths[0], pairs=1) as fa, connect(paths[1], pairs=1) as fb:
                a = await probe(fa, decline=[F_MQ])
                b = await probe(fb, decline=[F_MQ])
                a.fill_rx()
                b.fill_rx()
                f = eth(BCAST, MAC_A, b"single pair")
                a.send(f)
                assert [g for _, g in await b.recv(1)] == [f]


async def test_reflect_mode(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path, ports=1, mode="reflect") as (switch, devices, paths):
            async with connect(paths[0]) as fa:
                a = await probe(fa)
                a.fill_rx(count=64)
                frames = [eth(MAC_B, MAC_A, os.urandom(n)) for n in range(46, 46 + 40)]
                for f in frames:
                    a.send(f)
                got = await a.recv(len(frames))
                assert [f for _, f in got] == [eth(MAC_A, MAC_B, f[14:], 0x88B5) for f in frames]
                st = port_stats(switch, 0)
                assert st["tx_packets"] == st["rx_packets"] == len(frames)


async def test_busy_poll(tmp_path: Path) -> None:
    """Busy-poll mode moves frames without kicks."""
    with trio.fail_after(30):
        async with net_group(tmp_path, busy_poll=True) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a, b = await probe(fa), await probe(fb)
                b.fill_rx()
                frames = [eth(BCAST, MAC_A, bytes([n]) * 100) for n in range(5)]
                q = a.drv.queue(1)
                for f in frames:
                    q.add_outbuf(bytes(12) + f)   # no kick
                assert [f for _, f in await b.recv(5)] == frames
                assert devices[0].context.slots[1].kicks == 0  # type: ignore[union-attr]
                assert switch.stats()["busy_poll"]


async def test_sink_mode(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path, ports=2, mode="sink") as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a, b = await probe(fa), await probe(fb)
                b.fill_rx()
                for n in range(100):
                    a.send(eth(BCAST, MAC_A, bytes(50 + n)))
                await a.wait_sent(100)
                sa, sb = port_stats(switch, 0), port_stats(switch, 1)
                assert sa["tx_packets"] == 100 and sa["drops"] == {"sink": 100}
                assert sa["tx_bytes"] == sum(64 + n for n in range(100))
                assert sb["rx_packets"] == 0


async def test_drops_are_counted(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a, _b = await probe(fa, decline=[F_CSUM]), await probe(fb)
                a.send(eth(BCAST, MAC_A, bytes(50)))             # B has no rx buffers yet
                a.send(b"\x01\x02\x03")                           # runt
                a.send(eth(BCAST, MAC_A, bytes(50)), hdr=b"\x01" + bytes(11))  # NEEDS_CSUM: CSUM declined
                a.drv.queue(1).add_outbuf(b"short")                # shorter than the header
                a.drv.queue(1).kick()
                a.send(eth(MAC_A, MAC_A, bytes(50)))              # to itself (learned on port 0)
                await a.wait_sent(5)
                assert port_stats(switch, 0)["drops"] == {"bad_header": 2, "runt": 1, "no_dest": 1}
                assert port_stats(switch, 1)["drops"] == {"no_buffer": 1}
                assert port_stats(switch, 0)["tx_packets"] == 5


async def test_single_port_has_no_destination(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path, ports=1) as (switch, devices, paths):
            async with connect(paths[0]) as fa:
                a = await probe(fa)
                a.send(eth(BCAST, MAC_A, bytes(50)))
                await a.wait_sent(1)
                assert port_stats(switch, 0)["drops"] == {"no_dest": 1}


async def test_net_set_mtu(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                assert fa.offered_protocol_features & (1 << PF.MTU)
                # Readable before any feature is set (seed 002).
                assert devices[0].read_config(10, 2) == struct.pack("<H", 1500)
                await fa.request(Request.NET_SET_MTU, {"u64": 1000}, need_reply=True)
                assert devices[0].mtu == 1000
                assert devices[0].read_config(10, 2) == struct.pack("<H", 1000)
                refused = await fa.request(Request.NET_SET_MTU, {"u64": 10}, need_reply=True,
                                           expect_reply=True)
                assert refused is not None and refused.u64 != 0
                a, b = await probe(fa), await probe(fb)
                assert a.features & (1 << F_MTU)
                b.fill_rx()
                a.send(eth(BCAST, MAC_A, bytes(1000 + 4 - 14)))   # fits mtu + VLAN header
                a.send(eth(BCAST, MAC_A, bytes(1100)))            # does not
                await a.wait_sent(2)
                assert len(await b.recv(1)) == 1
                assert port_stats(switch, 0)["drops"] == {"too_big": 1}


async def test_send_rarp(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                _a, b = await probe(fa), await probe(fb)
                b.fill_rx()
                await fa.request(Request.SEND_RARP, {"mac": MAC_A}, need_reply=True)
                (_, frame), = await b.recv(1)
                assert len(frame) == 60 and frame[:6] == BCAST and frame[6:12] == MAC_A
                assert frame[12:14] == b"\x80\x35" and frame[20:22] == b"\x00\x03"
                assert switch.lookup(MAC_A) == 0


async def test_dpdk_memory_table_replaced_while_running(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0], personality="dpdk") as fa, connect(paths[1]) as fb:
                a, b = await probe(fa), await probe(fb)
                assert not a.features & (1 << F_EVENT_IDX)
                a.fill_rx()
                b.fill_rx()
                f = eth(BCAST, MAC_A, b"before" * 10)
                a.send(f)
                assert [g for _, g in await b.recv(1)] == [f]
                await fa.replace_mem_table()
                g = eth(MAC_A, MAC_B, b"after" * 10)
                b.send(g)
                assert [h for _, h in await a.recv(1)] == [g]
                bases = await fa.stop()
                assert bases == {0: 1, 1: 1}  # exactly the chains consumed


async def test_stop_restart_and_disconnect(tmp_path: Path) -> None:
    """GET_VRING_BASE is exact (it counts only consumed chains: receive
    buffers not used stay available), and frames for a port whose front-end
    went away are dropped, counted."""
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            async with connect(paths[0]) as fa:
                a = await probe(fa)
                async with connect(paths[1]) as fb:
                    b = await probe(fb)
                    b.fill_rx(count=8)
                    a.send(eth(BCAST, MAC_A, bytes(100)))
                    await b.recv(1)
                    bases = await fb.stop()
                    assert bases == {0: 1, 1: 0}
                await wait_until(lambda: not port_stats(switch, 1)["connected"], 5, "port 1 gone")
                a.send(eth(BCAST, MAC_A, bytes(100)))
                await a.wait_sent(2)
                # A port whose front-end is gone is like a link that is down:
                # flooding skips it, so the frame had nowhere to go.
                assert port_stats(switch, 0)["drops"] == {"no_dest": 1}


async def test_offloads_between_guests(tmp_path: Path) -> None:
    """A guest with CSUM/HOST_TSO sends a partial-checksum frame and a TCP
    GSO frame: a guest with GUEST_CSUM/GUEST_TSO4 gets them as they are, a
    guest without gets a completed checksum and MSS-sized segments."""
    with trio.fail_after(30):
        async with net_group(tmp_path, ports=3) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb, connect(paths[2]) as fc:
                a = await probe(fa)
                b = await probe(fb)
                c = await probe(fc, decline=[F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6])
                for bit in (F_CSUM, F_HOST_TSO4, F_GUEST_CSUM, F_GUEST_TSO4):
                    assert a.features & (1 << bit)
                b.fill_rx(count=64, size=4096)
                c.fill_rx(count=64, size=4096)
                payload = os.urandom(20000)
                frame = tcp_frame(payload, dst_mac=BCAST, partial=True)
                hdr = offload_hdr(frame, gso_size=1448)
                a.send(frame, hdr=hdr.pack())
                (hb, fb_), = await b.recv(1)
                assert fb_ == frame and VnetHdr.unpack(hb) == hdr
                segs = [parse_tcp(f) for _, f in await c.recv(14)]
                assert b"".join(sg.payload for sg in segs) == payload
                assert port_stats(switch, 2)["rx_segments"] == 14
                small = tcp_frame(b"abc" * 100, dst_mac=BCAST, partial=True)
                a.send(small, hdr=offload_hdr(small).pack())
                (hb, got), = await b.recv(1)
                assert got == small and VnetHdr.unpack(hb) == offload_hdr(small)
                (hc, got), = await c.recv(1)
                assert parse_tcp(got).payload == b"abc" * 100 and hc == bytes(10) + b"\x01\x00"


# ------------------------------------------------------------------ pcap, control, CLI, tap


async def test_pcap_file(tmp_path: Path) -> None:
    pcap = tmp_path / "frames.pcap"
    with trio.fail_after(30):
        async with net_group(tmp_path, pcap=str(pcap)) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a, b = await probe(fa), await probe(fb)
                b.fill_rx()
                frames = [eth(BCAST, MAC_A, os.urandom(n)) for n in (46, 500, 1500)]
                for f in frames:
                    a.send(f)
                await b.recv(3)
    data = pcap.read_bytes()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("=IHHiIII", data)
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 65535, 1)
    off, got = 24, []
    while off < len(data):
        _, _, incl, orig = struct.unpack_from("=IIII", data, off)
        got.append(data[off + 16:off + 16 + incl])
        assert incl == orig
        off += 16 + incl
    assert got == frames


async def test_control_socket_status(tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    with trio.fail_after(30):
        async with net_group(tmp_path, control=ctl) as (switch, devices, paths):
            async with connect(paths[0]) as fa, connect(paths[1]) as fb:
                a, b = await probe(fa), await probe(fb)
                b.fill_rx()
                a.send(eth(BCAST, MAC_A, bytes(100)))
                await b.recv(1)
                st = await control_call(ctl, "status")
                assert [s["socket"] for s in st["sockets"]] == paths
                assert all(s["connected"] for s in st["sockets"])
                ports = st["device_status"]["ports"]
                assert ports[0]["tx_packets"] == 1 and ports[1]["rx_packets"] == 1
                assert ports[1]["rx_bytes"] == 114
                fdb = await control_call(ctl, "fdb")
                assert fdb == [{"mac": MAC_A.hex(":"), "port": 0}]


async def test_cli_two_sockets(tmp_path: Path) -> None:
    """``vuser run net --socket A --socket B --control C``: one process,
    two ports of one switch."""
    a_path, b_path, ctl = str(tmp_path / "a.sock"), str(tmp_path / "b.sock"), str(tmp_path / "ctl")
    with trio.fail_after(30):
        async with VuserProcess("net", [a_path, b_path], control=ctl, args=["--queue-pairs", "1"],
                                log_path=tmp_path / "vuser.log", start_timeout=15) as vp:
            async with connect(a_path) as fa, connect(b_path) as fb:
                a, b = await probe(fa), await probe(fb)
                b.fill_rx()
                f = eth(BCAST, MAC_A, b"through the CLI" * 4)
                a.send(f)
                assert [g for _, g in await b.recv(1)] == [f]
                st = await control_call(ctl, "status")
                assert st["device_status"]["ports"][1]["rx_packets"] == 1
            assert await vp.stop() == 0, vp.log_text()[-2000:]


def _tap_possible() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@pytest.mark.skipif(not _tap_possible(), reason="needs root and /dev/net/tun")
async def test_tap_port(tmp_path: Path) -> None:
    """Frames from a guest come out of the host's tap interface, frames sent
    on the interface reach the guest (seen with an AF_PACKET socket)."""
    tap = f"vut{os.getpid() % 100000}"
    with trio.fail_after(30):
        async with net_group(tmp_path, ports=1, taps=(tap,)) as (switch, devices, paths):
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5)) as raw:
                raw.bind((tap, 0))
                raw.setblocking(False)
                async with connect(paths[0]) as fa:
                    a = await probe(fa)
                    a.fill_rx()
                    out = eth(BCAST, MAC_A, b"to the host" * 5)
                    a.send(out)
                    with trio.fail_after(5):
                        await trio.lowlevel.wait_readable(raw.fileno())
                    assert raw.recv(4096) == out
                    back = eth(MAC_A, MAC_B, b"from the host" * 5)
                    raw.send(back)
                    assert [f for _, f in await a.recv(1)] == [back]
                    tap_stats = port_stats(switch, 1)
                    assert tap_stats["kind"] == "tap" and tap_stats["rx_packets"] >= 1
