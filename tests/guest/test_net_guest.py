"""virtio-net served by vuser to real Linux guests: QEMU 7.2's vhost-user
netdev (``-netdev vhost-user`` + ``virtio-net-pci``), kernels 6.1
(bookworm) and sid's.

- Two guests on two sockets of one switch ping each other and move 8 MiB
  with nc (checksums compared in the guests; the serial command channel is
  far too slow to carry the data).
- The host reaches a guest through a tap port vuser creates (``--tap``).
- Legacy drivers (``virtio_pci.force_legacy=1``): one without MRG_RXBUF
  (10-byte header) talks to one with it (12-byte header).
- MTU 9000: QEMU's ``host_mtu`` gives the guest the MTU and vuser NET_SET_MTU;
  8000-byte pings pass whole.
- Two queue pairs: a 2-vCPU guest sends on both transmit queues.
- Reconnect: ``vuser run net`` killed and restarted under a QEMU whose
  chardev reconnects; traffic resumes.

Every guest gets ``vectors=0`` on its virtio-net-pci: QEMU 7.2 under TCG
segfaults at DRIVER_OK without it (design.md).  vuser runs in the test's
process (one Runner per socket on one switch, as ``vuser run net --socket A
--socket B``), except for the reconnect test, which needs a process to kill.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import struct
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import pytest
import trio

from vuser.devices.net import NetSwitch
from vuser.runner import Runner, RunnerGroup
from vuser.testing.guest import Guest, boot_guest
from vuser.testing.poll import wait_until
from vuser.testing.process import VuserProcess

try:
    from vuser.devices.net import NetDevice
except ImportError:  # pragma: no cover - a tree that was never installed
    from devices.net import NetDevice  # type: ignore[no-redef]

KERNELS = ["bookworm", "sid"]
QEMU = "7.2"
GUEST_MB = 256
TRANSFER_MIB = 8
MAC = "52:54:00:12:34:{:02x}"
F_VERSION_1 = 32
F_RING_PACKED = 34
SHOWN = ("tx_packets", "tx_gso", "rx_packets", "rx_segments", "rx_csum", "drops")

pytestmark = pytest.mark.guest


@pytest.fixture(autouse=True)
def no_vuser_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """vuser served in-process must not log errors (ring faults, tap read
    errors) while a test passes."""
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("vuser")]
    assert not errors, "\n".join(r.getMessage() for r in errors)


# ---------------------------------------------------------------- vuser

@dataclass
class Net:
    """vuser's net device served in-process: one port per socket, then the taps."""

    switch: NetSwitch
    devices: list[NetDevice]
    runners: list[Runner]
    sockets: list[str]

    def port(self, i: int) -> dict[str, Any]:
        return self.switch.stats()["ports"][i]

    def status(self, i: int) -> dict[str, Any]:
        return self.runners[i].status()


@asynccontextmanager
async def vuser_net(tmp_path: Path, ports: int, *, taps: Sequence[str] = (), pcap: str | None = None,
                    per_port: Sequence[dict[str, Any]] | None = None, **device_kw: Any) -> AsyncIterator[Net]:
    switch = NetSwitch(pcap=pcap)
    try:
        devices = [NetDevice(switch=switch, port_name=f"guest{i}",
                             **{**device_kw, **(per_port[i] if per_port else {})}) for i in range(ports)]
        for d in devices:
            d.port  # noqa: B018 - ports numbered in socket order, taps after
        for tap in taps:
            switch.add_tap(tap)
        sockets = [str(tmp_path / f"net{i}.sock") for i in range(ports)]
        runners = [Runner(d, s) for d, s in zip(devices, sockets)]
        group = RunnerGroup(runners, background=[switch.run])
        async with trio.open_nursery() as nursery:
            await nursery.start(group.run)
            try:
                yield Net(switch, devices, runners, sockets)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        switch.close()


# ---------------------------------------------------------------- guests

def net_args(sock: str, mac: str, *, queues: int = 1, reconnect: int | None = None,
             device_opts: str = "") -> list[str]:
    chardev = f"socket,id=c0,path={sock}" + (f",reconnect={reconnect}" if reconnect else "")
    netdev = "vhost-user,id=n0,chardev=c0" + (f",queues={queues}" if queues > 1 else "")
    device = f"virtio-net-pci,netdev=n0,vectors=0,mac={mac}" + (",mq=on" if queues > 1 else "") + device_opts
    return ["-chardev", chardev, "-netdev", netdev, "-device", device]


@asynccontextmanager
async def guests(kernel: str, specs: Sequence[dict[str, Any]], qemu: str = QEMU) -> AsyncIterator[list[Guest]]:
    """Boot one guest per spec (boot_guest keyword arguments) at the same
    time; all are powered off on the way out."""
    booted: list[Guest | None] = [None] * len(specs)
    all_up, done = trio.Event(), trio.Event()

    async def one(i: int) -> None:
        async with boot_guest(qemu, kernel, **{"memory_mb": GUEST_MB, **specs[i]}) as g:
            booted[i] = g
            if all(booted):
                all_up.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        for i in range(len(specs)):
            nursery.start_soon(one, i)
        await all_up.wait()
        try:
            yield [g for g in booted if g is not None]
        finally:
            done.set()


async def set_ip(guest: Guest, addr: str, *, dev: str = "eth0") -> None:
    """Address ``dev`` and wait for its carrier (the config's link status)."""
    await guest.check(f"ip addr add {addr} dev {dev} && ip link set {dev} up && "
                      f"for i in $(seq 100); do [ \"$(cat /sys/class/net/{dev}/carrier)\" = 1 ] && exit 0; "
                      "sleep 0.1; done; exit 1")


@dataclass
class Ping:
    sent: int
    received: int
    avg_ms: float | None
    text: str


def parse_ping(text: str) -> Ping:
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", text)
    assert m, text
    rtt = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", text)
    return Ping(int(m[1]), int(m[2]), float(rtt[1]) if rtt else None, text)


async def ping(guest: Guest, addr: str, *, count: int = 5, size: int = 56, warmup: float = 15.0) -> Ping:
    """Ping until one reply comes (ARP, the peer's rx ring filling), then
    ``count`` pings that must all be answered."""
    with trio.fail_after(warmup + 5):
        await guest.check(f"i=0; until ping -c 1 -W 1 -s {size} {addr} >/dev/null; do i=$((i+1)); "
                          f"[ $i -ge {int(warmup)} ] && exit 1; done", timeout=warmup + 2)
    r = await guest.run(f"ping -c {count} -i 0.2 -W 2 -s {size} {addr}", merge_stderr=True, timeout=count + 10)
    p = parse_ping(r.stdout)
    assert p.received == p.sent == count, r.stdout
    return p


async def md5(guest: Guest, path: str) -> str:
    return (await guest.check(f"md5sum {path}")).stdout.split()[0]


async def nc_listen(receiver: Guest, port: int) -> None:
    """nc listening on ``port`` in the background: what it receives goes to
    /tmp/rx, its exit status to /tmp/rx.rc."""
    # busybox nc quits at EOF on its stdin: the listener's stdin is a FIFO
    # opened read-write, which never ends; it quits when the sender closes.
    await receiver.check(
        f"rm -f /tmp/rx /tmp/rx.rc; [ -p /tmp/hold ] || mkfifo /tmp/hold; "
        f"(nc -l -p {port} <>/tmp/hold >/tmp/rx 2>/tmp/rx.err; echo $? >/tmp/rx.rc) </dev/null >/dev/null 2>&1 & "
        f"for i in $(seq 50); do netstat -ltn | grep -q ':{port} ' && exit 0; sleep 0.1; done; exit 1")


async def nc_transfer(sender: Guest, receiver: Guest, receiver_ip: str, *, mib: int = TRANSFER_MIB,
                      port: int = 5000) -> tuple[float, str, str]:
    """``mib`` MiB of random data from ``sender`` to ``receiver`` over TCP
    (busybox nc); returns the sender's seconds and both md5 sums."""
    await sender.check(f"dd if=/dev/urandom of=/tmp/tx bs=1M count={mib} 2>/dev/null", timeout=60)
    sent_md5 = await md5(sender, "/tmp/tx")
    await nc_listen(receiver, port)
    r = await sender.check(f"t0=$(cut -d' ' -f1 /proc/uptime); nc {receiver_ip} {port} </tmp/tx; rc=$?; "
                           "t1=$(cut -d' ' -f1 /proc/uptime); echo $rc $t0 $t1", timeout=120)
    rc, t0, t1 = r.stdout.split()
    assert rc == "0", r.stdout
    await receiver.check("for i in $(seq 100); do [ -s /tmp/rx.rc ] && exit 0; sleep 0.1; done; exit 1", timeout=20)
    got_md5 = await md5(receiver, "/tmp/rx")
    await sender.check("rm -f /tmp/tx")
    await receiver.check("rm -f /tmp/rx")
    return max(float(t1) - float(t0), 0.01), sent_md5, got_md5


# ---------------------------------------------------------------- host side of a tap

def tap_name(tag: str) -> str:
    return f"vut{tag}{os.getpid() % 10000}"[:15]


def tap_subnet(k: int) -> str:
    """A private /24 for the host side of test k's tap, distinct per test
    and per pytest process (the first three octets)."""
    return f"10.{77 + k}.{os.getpid() % 250}"


async def host_addr_tap(tap: str, addr: str) -> None:
    """The host's side of the tap vuser made: an address, and up."""
    for args in (["addr", "add", addr, "dev", tap], ["link", "set", tap, "up"]):
        await trio.run_process(["ip", *args], capture_stdout=True, capture_stderr=True)


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


async def host_ping(addr: str, *, count: int = 3, timeout: float = 2.0, device: str | None = None) -> list[float]:
    """ICMP echo from the host (no ping binary needed; we are root): the
    round-trip times, in ms, of the replies that came within ``timeout``."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    rtts = []
    with sock:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        ident = os.getpid() & 0xFFFF
        for seq in range(count):
            payload = struct.pack("!d", time.monotonic()) + bytes(48)
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = struct.pack("!BBHHH", 8, 0, icmp_checksum(hdr + payload), ident, seq) + payload
            t0 = time.monotonic()
            await sock.sendto(pkt, (addr, 0))
            with trio.move_on_after(timeout):
                while True:
                    data, src = await sock.recvfrom(2048)
                    ihl = (data[0] & 0xF) * 4
                    typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
                    if src[0] == addr and typ == 0 and rid == ident and rseq == seq:
                        rtts.append((time.monotonic() - t0) * 1000)
                        break
            await trio.sleep(0.1)
    return rtts


async def host_ping_until(addr: str, *, deadline: float, device: str | None = None) -> float:
    """Ping once a second until a reply comes; seconds it took."""
    t0 = time.monotonic()
    await wait_until(lambda: host_ping(addr, count=1, timeout=1.0, device=device), deadline,
                     f"an echo reply from {addr}", interval=0)
    return time.monotonic() - t0


async def host_to_guest_tcp(guest: Guest, addr: str, nbytes: int, *, port: int = 5000) -> float:
    """Send ``nbytes`` random bytes from the host to nc in the guest;
    the seconds it took.  The guest's md5 must match."""
    data = os.urandom(nbytes)
    await guest.check(
        f"rm -f /tmp/rx /tmp/rx.rc; [ -p /tmp/hold ] || mkfifo /tmp/hold; "
        f"(nc -l -p {port} <>/tmp/hold >/tmp/rx; echo $? >/tmp/rx.rc) </dev/null >/dev/null 2>&1 & "
        f"for i in $(seq 50); do netstat -ltn | grep -q ':{port} ' && exit 0; sleep 0.1; done; exit 1")
    t0 = time.monotonic()
    with trio.fail_after(60):
        stream = await trio.open_tcp_stream(addr, port)
        async with stream:
            await stream.send_all(data)
            await stream.send_eof()
            assert await stream.receive_some() == b""
    took = time.monotonic() - t0
    await guest.check("for i in $(seq 100); do [ -s /tmp/rx.rc ] && exit 0; sleep 0.1; done; exit 1", timeout=20)
    assert await md5(guest, "/tmp/rx") == hashlib.md5(data).hexdigest()
    await guest.check("rm -f /tmp/rx")
    return took


# ---------------------------------------------------------------- pcap

def pcap_frames(path: str) -> list[bytes]:
    data = Path(path).read_bytes()
    magic = struct.unpack_from("=I", data)[0]
    assert magic == 0xA1B2C3D4, hex(magic)
    frames, off = [], 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from("=IIII", data, off)
        frames.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return frames


def queue_counters(status: dict[str, Any]) -> dict[int, tuple[str, int, int]]:
    return {q["index"]: (q["role"], q["buffers"], q["kicks"]) for q in status["queues"]}


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("kernel", KERNELS)
async def test_two_guests_ping_and_transfer(kernel: str, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with vuser_net(tmp_path, 2) as net:
            specs = [{"extra_args": net_args(net.sockets[i], MAC.format(i + 1))} for i in range(2)]
            async with guests(kernel, specs) as (a, b):
                await set_ip(a, "10.0.0.1/24")
                await set_ip(b, "10.0.0.2/24")
                ab = await ping(a, "10.0.0.2")
                ba = await ping(b, "10.0.0.1")
                seconds, sent, got = await nc_transfer(a, b, "10.0.0.2")
                assert sent == got
                back, sent2, got2 = await nc_transfer(b, a, "10.0.0.1", port=5001)
                assert sent2 == got2

                # vuser saw it all: each port learned, nothing dropped once
                # both guests were up, the data in both directions.
                fdb = {e["mac"]: e["port"] for e in net.switch.fdb()}
                assert fdb.get(MAC.format(1)) == 0 and fdb.get(MAC.format(2)) == 1, fdb
                pa, pb = net.port(0), net.port(1)
                for p in (pa, pb):
                    assert p["tx_bytes"] > TRANSFER_MIB << 20 and p["rx_bytes"] > TRANSFER_MIB << 20, p
                    drops = {k: v for k, v in p["drops"].items() if k != "no_buffer"}
                    assert not drops, p
                st = net.status(0)
                assert "VIRTIO_F_VERSION_1" in st["negotiated_features"]
                q = queue_counters(st)
                # Every frame port 0 sent was one chain of its tx0 (index 1).
                assert q[1][0] == "tx0" and q[1][1] >= pa["tx_packets"], (q, pa)
                print(f"kernel {kernel}: ping a->b avg {ab.avg_ms} ms, b->a avg {ba.avg_ms} ms; "
                      f"{TRANSFER_MIB} MiB a->b in {seconds:.2f}s ({TRANSFER_MIB / seconds:.1f} MiB/s), "
                      f"b->a in {back:.2f}s ({TRANSFER_MIB / back:.1f} MiB/s); md5 {sent}; "
                      f"port 0 {json.dumps({k: pa[k] for k in SHOWN})}")


@pytest.mark.parametrize("kernel", KERNELS)
async def test_host_reaches_guest_over_tap(kernel: str, tmp_path: Path) -> None:
    tap, net24 = tap_name("t"), tap_subnet(0)
    with trio.fail_after(90):
        async with vuser_net(tmp_path, 1, taps=[tap]) as net:
            await host_addr_tap(tap, f"{net24}.1/24")
            async with guests(kernel, [{"extra_args": net_args(net.sockets[0], MAC.format(1))}]) as (g,):
                await set_ip(g, f"{net24}.2/24")
                await ping(g, f"{net24}.1")
                await host_ping_until(f"{net24}.2", deadline=15, device=tap)
                rtts = await host_ping(f"{net24}.2", count=5, device=tap)
                assert len(rtts) == 5, rtts

                # TCP from the host into the guest: whatever the tap hands
                # over (GSO frames, partial checksums) arrives intact.
                took = await host_to_guest_tcp(g, f"{net24}.2", 4 << 20)
                tp = net.port(1)
                assert tp["kind"] == "tap" and tp["interface"] == tap
                assert tp["tx_bytes"] > 4 << 20, tp
                print(f"kernel {kernel}: host->guest ping {sum(rtts) / len(rtts):.2f} ms avg; "
                      f"4 MiB host->guest TCP in {took:.2f}s; tap port {tp}")
    # vuser closed the tap: the interface is gone with it.
    r = await trio.run_process(["ip", "link", "show", tap], capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode != 0, r.stdout


@pytest.mark.parametrize("kernel", KERNELS)
async def test_legacy_drivers(kernel: str, tmp_path: Path) -> None:
    """Transitional devices driven by legacy drivers
    (``virtio_pci.force_legacy=1``): VERSION_1 is not negotiated.  Guest a
    also goes without MRG_RXBUF (QEMU's ``mrg_rxbuf=off``), so its header is
    10 bytes; guest b keeps MRG_RXBUF, so its header is 12 bytes with
    num_buffers.  vuser converts between the two."""
    legacy = ",disable-legacy=off"
    with trio.fail_after(120):
        async with vuser_net(tmp_path, 2) as net:
            specs: list[dict[str, Any]] = [
                {"extra_args": net_args(net.sockets[0], MAC.format(1), device_opts=legacy + ",mrg_rxbuf=off"),
                 "kernel_cmdline_extra": "virtio_pci.force_legacy=1"},
                {"extra_args": net_args(net.sockets[1], MAC.format(2), device_opts=legacy),
                 "kernel_cmdline_extra": "virtio_pci.force_legacy=1"},
            ]
            async with guests(kernel, specs) as (a, b):
                # The guests really drive them as legacy devices.
                for g in (a, b):
                    bits = (await g.check("cat /sys/class/net/eth0/device/features")).stdout.strip()
                    assert bits[F_VERSION_1] == "0", bits
                await set_ip(a, "10.0.0.1/24")
                await set_ip(b, "10.0.0.2/24")
                await ping(a, "10.0.0.2")
                await ping(b, "10.0.0.1")
                seconds, sent, got = await nc_transfer(a, b, "10.0.0.2", mib=4)
                assert sent == got
                back, sent, got = await nc_transfer(b, a, "10.0.0.1", mib=4, port=5001)
                assert sent == got

                sa, sb = net.status(0), net.status(1)
                for st in (sa, sb):
                    assert "VIRTIO_F_VERSION_1" not in st["negotiated_features"], st["negotiated_features"]
                assert "VIRTIO_NET_F_MRG_RXBUF" not in sa["negotiated_features"]
                assert "VIRTIO_NET_F_MRG_RXBUF" in sb["negotiated_features"]
                # The header size is not in vuser's status: read the port's C view.
                hdr = [int(net.switch.ports[i].c.hdr_len) for i in range(2)]
                assert hdr == [10, 12], hdr
                for i in range(2):
                    p = net.port(i)
                    assert not {k for k in p["drops"] if k != "no_buffer"}, p
                print(f"kernel {kernel}: legacy guests, header sizes {hdr}; features a {sa['negotiated_features']}; "
                      f"4 MiB a->b {seconds:.2f}s, b->a {back:.2f}s")


@pytest.mark.parametrize("kernel", KERNELS)
async def test_mtu_9000(kernel: str, tmp_path: Path) -> None:
    """QEMU owns virtio-net's config: ``host_mtu=9000`` offers VIRTIO_NET_F_MTU
    with mtu 9000 to the guest and sends vuser NET_SET_MTU 9000 (vuser's own
    ``--mtu``, here left at 1500, is not what the guest reads)."""
    pcap = str(tmp_path / "mtu.pcap")
    with trio.fail_after(120):
        async with vuser_net(tmp_path, 2, pcap=pcap) as net:
            assert [d.mtu for d in net.devices] == [1500, 1500]
            specs = [{"extra_args": net_args(net.sockets[i], MAC.format(i + 1), device_opts=",host_mtu=9000")}
                     for i in range(2)]
            async with guests(kernel, specs) as (a, b):
                for g in (a, b):
                    assert (await g.check("cat /sys/class/net/eth0/mtu")).stdout.strip() == "9000"
                # vuser got NET_SET_MTU and accepted it.
                for i in range(2):
                    st = net.status(i)
                    assert st["device_status"]["mtu"] == 9000, st["device_status"]
                    assert "VIRTIO_NET_F_MTU" in st["negotiated_features"]
                await set_ip(a, "10.0.0.1/24")
                await set_ip(b, "10.0.0.2/24")
                p = await ping(a, "10.0.0.2", size=8000)
                await ping(b, "10.0.0.1", size=8000)
                # 8000 bytes of ICMP payload, + 8 + 20 + 14: one 8042-byte
                # frame per echo, not IP fragments.
                sizes = [len(f) for f in pcap_frames(pcap)]
                assert sizes.count(8042) >= 4 * 5, sorted(set(sizes))
                for i in range(2):
                    assert "too_big" not in net.port(i)["drops"], net.port(i)
                seconds, sent, got = await nc_transfer(a, b, "10.0.0.2", mib=4)
                assert sent == got
                print(f"kernel {kernel}: guest mtu 9000, vuser mtu {[d.mtu for d in net.devices]}; "
                      f"ping -s 8000 avg {p.avg_ms} ms; 4 MiB in {seconds:.2f}s; "
                      f"{sizes.count(8042)} frames of 8042 bytes in the pcap")


@pytest.mark.parametrize("kernel", KERNELS)
async def test_two_queue_pairs(kernel: str, tmp_path: Path) -> None:
    """queues=2 / mq=on on a 2-vCPU guest (Linux enables min(pairs, CPUs)
    pairs; XPS maps vCPU k to transmit queue k): pings pinned to each vCPU
    leave on tx0 (index 1) and tx1 (index 3)."""
    tap, net24 = tap_name("q"), tap_subnet(1)
    with trio.fail_after(120):
        async with vuser_net(tmp_path, 1, taps=[tap], queue_pairs=2) as net:
            await host_addr_tap(tap, f"{net24}.1/24")
            spec = {"extra_args": net_args(net.sockets[0], MAC.format(1), queues=2), "smp": 2}
            async with guests(kernel, [spec]) as (g,):
                queues = (await g.check("ls /sys/class/net/eth0/queues")).stdout.split()
                assert sorted(queues) == ["rx-0", "rx-1", "tx-0", "tx-1"], queues
                await set_ip(g, f"{net24}.2/24")
                await ping(g, f"{net24}.1")
                before = queue_counters(net.status(0))
                r = await g.check(f"taskset 1 ping -c 20 -i 0.05 {net24}.1 >/tmp/p0 & "
                                  f"taskset 2 ping -c 20 -i 0.05 {net24}.1 >/tmp/p1 & wait; cat /tmp/p0 /tmp/p1",
                                  timeout=30)
                for text in r.stdout.split("--- ")[1:]:
                    assert "20 packets received" in text, r.stdout
                after = queue_counters(net.status(0))
                assert after[1][0] == "tx0" and after[3][0] == "tx1", after
                tx0 = after[1][1] - before[1][1]
                tx1 = after[3][1] - before[3][1]
                assert tx0 >= 20 and tx1 >= 20, (before, after)
                st = net.status(0)
                assert "VIRTIO_NET_F_MQ" in st["negotiated_features"]
                print(f"kernel {kernel}: tx0 (index 1) +{tx0} buffers, tx1 (index 3) +{tx1}; queues {after}")


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("kernel", KERNELS)
async def test_reconnect_after_backend_restart(kernel: str, ring: str, tmp_path: Path) -> None:
    """``vuser run net`` (a process) is killed and started again on the same
    socket; QEMU's chardev reconnects (reconnect=1) and restarts the rings,
    and traffic between the host (tap) and the guest resumes.  Packed rings
    (``packed=on``) resume from vuser's ring state file: QEMU's
    SET_VRING_BASE after a back-end restart is stale (vuser.ringstate)."""
    tap, net24 = tap_name("r"), tap_subnet(2 if ring == "split" else 3)
    sock, control = str(tmp_path / "net.sock"), str(tmp_path / "net.ctl")
    procs: list[VuserProcess] = []

    async def start_vuser(stack: AsyncExitStack) -> VuserProcess:
        """A ``vuser run net`` that lasts until ``stack`` closes (or it is killed)."""
        vp = VuserProcess("net", sock, control=control, args=["--tap", tap],
                          global_args=["--log-level", "DEBUG"],
                          log_path=tmp_path / f"vuser{len(procs)}.log", start_timeout=15)
        procs.append(await stack.enter_async_context(vp))
        await host_addr_tap(tap, f"{net24}.1/24")
        return vp

    async with AsyncExitStack() as stack:
        vp = await start_vuser(stack)
        with trio.fail_after(120):
            opts = ",packed=on" if ring == "packed" else ""
            spec = {"extra_args": net_args(sock, MAC.format(1), reconnect=1, device_opts=opts)}
            async with guests(kernel, [spec]) as (g,):
                bits = (await g.check("cat /sys/class/net/eth0/device/features")).stdout.strip()
                assert bits[F_RING_PACKED] == ("1" if ring == "packed" else "0"), bits
                await set_ip(g, f"{net24}.2/24")
                await ping(g, f"{net24}.1")
                for _ in range(2):  # the rings go round a few laps before the kill
                    await g.check(f"ping -c 150 -i 0.01 -s 1400 {net24}.1 >/dev/null", timeout=60)
                assert len(await host_ping(f"{net24}.2", count=3, device=tap)) == 3
                first = await vp.status()

                await vp.kill()
                os.unlink(control)
                t_kill = time.monotonic()
                # QEMU notices and sets the link down: the guest loses its carrier.
                await g.check("for i in $(seq 100); do [ \"$(cat /sys/class/net/eth0/carrier)\" = 0 ] && exit 0; "
                              "sleep 0.1; done; exit 1")
                vp = await start_vuser(stack)
                took = await host_ping_until(f"{net24}.2", deadline=30, device=tap)
                resumed = time.monotonic() - t_kill
                assert (await g.check("cat /sys/class/net/eth0/carrier")).stdout.strip() == "1"
                await ping(g, f"{net24}.1")
                # The rings restarted where the guest left them: bulk data
                # over the restored receive ring arrives intact.
                await host_to_guest_tcp(g, f"{net24}.2", 2 << 20)
                second = await vp.status()
                assert second["connected"] and second["connections"] == 1
                assert second["negotiated_features"] == first["negotiated_features"]
                if ring == "packed":
                    assert "resuming the packed ring" in vp.log_text()
                print(f"kernel {kernel}, {ring} rings: traffic resumed {resumed:.1f}s after the kill "
                      f"({took:.1f}s after the restart); ports {second['ports']}")
        assert await vp.stop() == 0, vp.log_text()[-3000:]
    for vp in procs:
        errors = vp.log_problems()
        assert not errors, f"{vp.log_path.name}: " + "\n".join(errors[:20])
