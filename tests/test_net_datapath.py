"""The C net data path (native/net.c through the net switch) on real split
rings: the guest side is the front-end harness's ring code on memfd memory,
the back-end side is ``VirtQueue`` on the same memfds, as a connection would
set them up.  No sockets: the switch is called directly, as a kick would.

Properties (hypothesis): frames arrive byte-exact and in order, as a
subsequence of what was sent; the counters add up (every frame sent is
either delivered or dropped for a counted reason); nothing is written
outside the receive buffers and the used rings; hostile receive chains
(device-readable parts, addresses outside memory, zero lengths) are counted,
never crash and never write elsewhere.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vuser.dirtylog import LOG_PAGE, DirtyLog
from vuser.frontend.memory import GuestRam
from vuser.frontend.vring import DriverQueue
from vuser.memory import GuestMemory, RegionSpec
from vuser.virtqueue import VirtQueue, native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="vuser._native is not built")

if native_available():
    from vuser._native import ffi
    from vuser.devices.net.impair import parse_spec
    from vuser.devices.net.switch import OFF_ALL, OFF_CSUM, PORT_VHOST, NetSwitch, rarp_frame
from vuser.testing.netframes import (
    DATA_VALID,
    NEEDS_CSUM,
    TCP_ACK,
    TCP_CWR,
    TCP_FIN,
    TCP_PSH,
    VnetHdr,
    offload_hdr,
    parse_tcp,
    tcp_frame,
)

MiB = 1 << 20
BCAST = b"\xff" * 6
MACS = [bytes([2, 0, 0, 0, 0, i + 1]) for i in range(4)]
NUM = 64


@dataclass
class Guest:
    """One guest: its memory (both sides' views), an rx and a tx ring."""

    hdr_len: int = 12
    mrg: bool = False
    event_idx: bool = True
    tx_offloads: int = 0
    rx_offloads: int = 0
    fe: Any = None
    be: Any = None
    rx: Any = None
    tx: Any = None
    vq_rx: Any = None
    vq_tx: Any = None
    rx_bufs: list[tuple[int, int]] = field(default_factory=list)
    sent: int = 0

    def open(self, size: int = 2 * MiB, regions: int = 2) -> Guest:
        self.fe = GuestRam.create(size, regions=regions)
        self.be = GuestMemory()
        self.be.replace([(os.dup(r.fd), RegionSpec(r.gpa, r.size, r.uva, r.mmap_offset))
                         for r in self.fe.regions])
        self.rx = DriverQueue(self.fe, 0, NUM, align=64, event_idx=self.event_idx)
        self.tx = DriverQueue(self.fe, 1, NUM, align=64, event_idx=self.event_idx)
        self.vq_rx, self.vq_tx = VirtQueue(self.be), VirtQueue(self.be)
        for q, vq in ((self.rx, self.vq_rx), (self.tx, self.vq_tx)):
            desc, avail, used = q.addresses()
            vq.configure(NUM, desc, avail, used, event_idx=self.event_idx, base=0)
        return self

    def close(self) -> None:
        self.vq_rx.stop()
        self.vq_tx.stop()
        self.rx.close()
        self.tx.close()
        self.be.close()
        self.fe.close()

    def bind(self, c: Any) -> None:
        """What the net device's hooks push into its port when rings start."""
        c.kind = PORT_VHOST
        c.hdr_len = self.hdr_len
        c.mrg_rxbuf = int(self.mrg)
        c.tx_offloads = self.tx_offloads
        c.rx_offloads = self.rx_offloads
        c.mem = self.be.native
        c.nqp = 1
        c.rx[0] = self.vq_rx.native_ring
        c.tx[0] = self.vq_tx.native_ring
        c.rx_call[0] = self.rx.call_fd
        c.tx_call[0] = self.tx.call_fd

    def after(self, c: Any, result: int) -> None:  # PortBinding
        pass

    def add_rx(self, size: int) -> None:
        gpa = self.fe.alloc(size, 8)
        self.fe.fill(gpa, size, 0xEE)
        self.rx_bufs.append((gpa, size))
        self.rx.add_segments([(gpa, size, True)])

    def send(self, frame: bytes, split: bool = False, hdr: bytes | None = None) -> None:
        header = bytes(self.hdr_len) if hdr is None else hdr[:self.hdr_len]
        data = [header, frame] if split else [header + frame]
        self.tx.add_chain(out=data)
        self.sent += 1

    def received(self, headers: list[bytes] | None = None) -> tuple[list[bytes], int]:
        """(frames, used elements) from the rx used ring; their headers are
        appended to ``headers`` if given (else they must be all zero)."""
        frames, elems = [], self.rx.get_used()
        i = 0
        while i < len(elems):
            # A header may span buffers (smaller than it: a driver bug, but
            # the device must still not write elsewhere).
            k, head = i, b""
            while len(head) < self.hdr_len and k < len(elems):
                head += elems[k].data
                k += 1
            hdr = head[:self.hdr_len]
            n = struct.unpack_from("<H", hdr, 10)[0] if self.mrg else 1
            assert n >= 1 and i + n <= len(elems), (n, i, len(elems))
            if headers is not None:
                headers.append(hdr)
            elif self.hdr_len == 12:
                assert hdr[:10] == bytes(10) and (self.mrg or n == 1)
            else:
                assert hdr == bytes(10)
            assert self.hdr_len == 10 or self.mrg or n == 1
            frames.append(b"".join(e.data for e in elems[i:i + n])[self.hdr_len:])
            i += n
        return frames, len(elems)

    def snapshot(self) -> list[bytes]:
        return [self.fe.read(r.gpa, r.size) for r in self.fe.regions]


def changed_outside(guest: Guest, before: list[bytes], allowed: list[tuple[int, int]]) -> list[int]:
    """Guest-physical addresses that changed and are not in ``allowed``."""
    bad = []
    for r, old in zip(guest.fe.regions, before):
        new = guest.fe.read(r.gpa, r.size)
        if new == old:
            continue
        for page in range(0, len(new), 4096):
            if new[page:page + 4096] == old[page:page + 4096]:
                continue
            for off in range(page, min(page + 4096, len(new))):
                if new[off] != old[off]:
                    gpa = r.gpa + off
                    if not any(a <= gpa < a + n for a, n in allowed):
                        bad.append(gpa)
                        if len(bad) > 8:
                            return bad
    return bad


def changed_pages(guest: Guest, before: list[bytes]) -> set[int]:
    """The guest-physical pages in which any byte changed."""
    out = set()
    for r, old in zip(guest.fe.regions, before):
        new = guest.fe.read(r.gpa, r.size)
        for off in range(0, len(new), LOG_PAGE):
            if new[off:off + LOG_PAGE] != old[off:off + LOG_PAGE]:
                out.update(range((r.gpa + off) // LOG_PAGE, (r.gpa + min(off + LOG_PAGE, len(new)) - 1) // LOG_PAGE + 1))
    return out


def pages_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for gpa, n in ranges if n for p in range(gpa // LOG_PAGE, (gpa + n - 1) // LOG_PAGE + 1)}


def start_logging(g: Guest) -> DirtyLog:
    """What SET_LOG_BASE, LOG_ALL and VHOST_VRING_F_LOG do to a port's
    memory and rings (the handler's _sync_log)."""
    log = DirtyLog(g.be.owner)
    fd = os.memfd_create("vuser-net-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    log.replace(fd, 4096, 0)
    g.be.set_dirty_log(log)
    for q, vq in ((g.rx, g.vq_rx), (g.tx, g.vq_tx)):
        vq.set_log(log, q.used_gpa)
    return log


def ring_areas(g: Guest) -> list[tuple[int, int]]:
    """What the device may write besides receive buffers: both used rings."""
    out = []
    for q in (g.rx, g.tx):
        out.append((q.used_gpa, q.layout.used_size))
    return out


def eth(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + payload


def stats(sw: NetSwitch, i: int) -> dict[str, Any]:
    return sw.ports[i].stats()


@pytest.fixture
def pair() -> Any:
    guests: list[Guest] = []

    def make(**kw: Any) -> tuple[NetSwitch, Guest, Guest]:
        a, b = Guest(**kw.get("a", {})).open(), Guest(**kw.get("b", {})).open()
        guests.extend((a, b))
        sw = NetSwitch(mode=kw.get("mode", "switch"), hold_down_ms=kw.get("hold_down_ms", 1000),
                       learn_limit=kw.get("learn_limit", 256))
        a.bind(sw.add_vhost_port("a", a).c)
        b.bind(sw.add_vhost_port("b", b).c)
        return sw, a, b

    yield make
    for g in guests:
        g.close()


# ------------------------------------------------------------------ examples


def test_frames_cross_byte_exact(pair: Any) -> None:
    sw, a, b = pair(a={"hdr_len": 12}, b={"hdr_len": 10})
    for _ in range(8):
        b.add_rx(2048)
    frames = [eth(BCAST, MACS[0], os.urandom(n)) for n in (46, 100, 1500)]
    for f in frames:
        a.send(f, split=True)
    assert sw.tx_burst(sw.ports[0], 0) == 3
    assert b.received() == (frames, 3)
    assert a.tx.get_used() and b.rx.drain_calls() == 1
    assert stats(sw, 1)["rx_bytes"] == sum(map(len, frames))


def test_mergeable_frame_over_many_buffers(pair: Any) -> None:
    sw, a, b = pair(b={"mrg": True})
    for _ in range(40):
        b.add_rx(64)
    frame = eth(BCAST, MACS[0], os.urandom(2000))
    a.send(frame)
    sw.tx_burst(sw.ports[0], 0)
    got, nelems = b.received()
    assert got == [frame] and nelems == -(-(12 + len(frame)) // 64)
    # Header split over buffers smaller than it.
    for _ in range(8):
        b.add_rx(5)
    a.send(eth(BCAST, MACS[0], b"x" * 10))
    sw.tx_burst(sw.ports[0], 0)
    assert b.received()[0] == [eth(BCAST, MACS[0], b"x" * 10)]


def test_partial_mergeable_frame_is_rewound(pair: Any) -> None:
    sw, a, b = pair(b={"mrg": True})
    for _ in range(3):
        b.add_rx(100)
    a.send(eth(BCAST, MACS[0], bytes(400)))   # needs 5 buffers: dropped
    a.send(eth(BCAST, MACS[0], bytes(150)))   # needs 2: fits in what was given back
    sw.tx_burst(sw.ports[0], 0)
    got, n = b.received()
    assert got == [eth(BCAST, MACS[0], bytes(150))] and n == 2
    assert stats(sw, 1)["drops"] == {"no_buffer": 1}
    assert b.vq_rx.last_avail_idx == 2


def test_inject_rarp(pair: Any) -> None:
    sw, a, b = pair()
    b.add_rx(128)
    sw.inject(sw.ports[0], rarp_frame(MACS[0]))
    (frame,), _ = b.received()
    assert frame == rarp_frame(MACS[0]) and sw.lookup(MACS[0]) == 0


def test_broken_tx_ring_reports_error(pair: Any) -> None:
    sw, a, b = pair()
    b.add_rx(2048)
    a.send(eth(BCAST, MACS[0], b"good"))
    a.tx.add_segments([(0xFFFF_FFFF_0000, 100, False)])   # outside guest memory
    rc = sw.tx_burst(sw.ports[0], 0)
    assert rc < 0                                           # VU_ERR_DESC_ADDR
    assert b.received()[0] == [eth(BCAST, MACS[0], b"good")]
    assert a.vq_tx.ring.broken


# ------------------------------------------------------------------ properties

frame_sizes = st.integers(min_value=0, max_value=3000)
dests = st.sampled_from([BCAST, MACS[1], MACS[0], b"\x01\x00\x5e\x00\x00\x01"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sends=st.lists(st.tuples(frame_sizes, dests, st.booleans()), min_size=1, max_size=40),
    rx_sizes=st.lists(st.integers(min_value=1, max_value=3000), min_size=0, max_size=50),
    hdr_a=st.sampled_from([10, 12]), hdr_b=st.sampled_from([10, 12]),
    mrg=st.booleans(), event_idx=st.booleans(), budget=st.sampled_from([0, 1, 7]), logging=st.booleans(),
)
def test_delivery_invariants(pair: Any, sends: list[tuple[int, bytes, bool]], rx_sizes: list[int],
                             hdr_a: int, hdr_b: int, mrg: bool, event_idx: bool, budget: int,
                             logging: bool) -> None:
    mrg = mrg and hdr_b == 12
    sw, a, b = pair(a={"hdr_len": hdr_a, "event_idx": event_idx},
                    b={"hdr_len": hdr_b, "mrg": mrg, "event_idx": event_idx})
    logs = [start_logging(g) for g in (a, b)] if logging else []
    for size in rx_sizes[:NUM]:
        b.add_rx(size)
    # B says who it is first, so unicast to MACS[1] is learned (port 1).
    sw.inject(sw.ports[1], eth(BCAST, MACS[1], b"hello"))
    base = stats(sw, 0)["dropped"]  # A had no receive buffer for it
    before_b = b.snapshot()
    sent = []
    for size, dst, split in sends[:NUM // 2]:
        frame = (dst + MACS[0] + b"\x88\xb5" + os.urandom(size))[:max(size, 0)] if size < 14 \
            else eth(dst, MACS[0], os.urandom(size - 14))
        a.send(frame, split=split and size > 0)
        sent.append(frame)
    before_a = a.snapshot()
    moved = 0
    for _ in range(100):
        n = sw.tx_burst(sw.ports[0], 0, budget)
        assert n >= 0
        moved += n
        if not n:
            break
    assert moved == len(sent)
    # Nothing written outside the receive buffers and the used rings.
    assert changed_outside(b, before_b, b.rx_bufs + ring_areas(b)) == []
    assert changed_outside(a, before_a, ring_areas(a)) == []
    # Migrating: every page written is logged, and only pages the device
    # may write are (the receive buffers, the used rings).
    for g, before, log, allowed in zip((a, b), (before_a, before_b), logs, (ring_areas(a), b.rx_bufs + ring_areas(b))):
        logged = {gpa // LOG_PAGE for gpa in log.pages()}
        assert changed_pages(g, before) <= logged <= pages_of(allowed)
    got, nelems = b.received()
    # Delivered frames: byte-exact, in order, a subsequence of the sent ones.
    it = iter(sent)
    assert all(any(g == s for s in it) for g in got), "not an ordered subsequence"
    sa, sb = stats(sw, 0), stats(sw, 1)
    assert sa["tx_packets"] == len(sent)
    assert sa["dropped"] - base + sb["rx_packets"] + sb["dropped"] == len(sent), (sa, sb)
    assert sb["rx_packets"] == len(got) and sb["rx_buffers"] == nelems
    # Frames to A's own address never reach B; runts never leave A.
    assert sa["drops"].get("no_buffer", 0) == base == 1
    assert sa["drops"].get("no_dest", 0) == sum(1 for f in sent if len(f) >= 14 and f[:6] == MACS[0])
    assert sa["drops"].get("runt", 0) == sum(1 for f in sent if len(f) < 14)
    # Every receive chain not used is still available (none lost).
    assert b.vq_rx.last_avail_idx == nelems
    # Non-mergeable and every buffer big enough: nothing dropped at B.
    if not mrg and all(s >= hdr_b + 3000 for s in rx_sizes[:NUM]) and len(rx_sizes) >= len(sent):
        assert sb["dropped"] == 0


segment = st.tuples(
    st.sampled_from(["ok", "readable", "outside", "zero"]),
    st.integers(min_value=1, max_value=600),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chains=st.lists(st.lists(segment, min_size=1, max_size=4), min_size=1, max_size=20),
       sizes=st.lists(st.integers(min_value=14, max_value=1500), min_size=1, max_size=20),
       mrg=st.booleans())
def test_hostile_receive_chains(pair: Any, chains: list[list[tuple[str, int]]], sizes: list[int],
                                mrg: bool) -> None:
    sw, a, b = pair(b={"mrg": mrg})
    writable: list[tuple[int, int]] = []
    for chain in chains:
        segs = []
        for kind, n in sorted(chain, key=lambda s: s[0] != "readable"):  # readable parts first
            if kind == "outside":
                segs.append((0x7FFF_0000_0000, n, True))
            elif kind == "zero":
                segs.append((b.fe.alloc(8, 8), 0, True))
            else:
                gpa = b.fe.alloc(n, 8)
                segs.append((gpa, n, kind == "ok"))
                if kind == "ok":
                    writable.append((gpa, n))
        b.rx.add_segments(segs)
    before = b.snapshot()
    for size in sizes:
        a.send(eth(BCAST, MACS[0], bytes(size - 14)))
    assert sw.tx_burst(sw.ports[0], 0) == len(sizes)
    assert changed_outside(b, before, writable + ring_areas(b)) == []
    sb = stats(sw, 1)
    assert sb["rx_packets"] + sb["dropped"] == len(sizes)
    assert set(sb["drops"]) <= {"no_buffer", "rx_too_small", "bad_rx_buffer", "ring_error"}
    got, _ = b.received()
    assert all(g == eth(BCAST, MACS[0], bytes(len(g) - 14)) for g in got)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(min_value=14, max_value=2000), min_size=1, max_size=30))
def test_reflect_swaps_addresses(pair: Any, sizes: list[int]) -> None:
    sw, a, b = pair(mode="reflect", a={"mrg": True})
    for _ in range(NUM):
        a.add_rx(512)
    frames = [eth(MACS[1], MACS[0], os.urandom(n - 14)) for n in sizes]
    for f in frames:
        a.send(f)
    sw.tx_burst(sw.ports[0], 0)
    got, _ = a.received()
    want = [f[6:12] + f[:6] + f[12:] for f in frames]
    assert got == want[:len(got)]
    sa = stats(sw, 0)
    assert sa["rx_packets"] + sa["dropped"] == len(frames) == sa["tx_packets"]
    assert stats(sw, 1)["rx_packets"] == 0


# ------------------------------------------------------------------ offloads


def partial_frame_across(sw: Any, a: Any, b: Any, *, v6: bool = False) -> tuple[bytes, VnetHdr, bytes, VnetHdr]:
    """A sends one TCP frame with a partial checksum (NEEDS_CSUM) to B:
    the frame and header sent, the frame and header B received."""
    b.add_rx(4096)
    frame = tcp_frame(b"payload" * 100, v6=v6, partial=True)
    hdr = offload_hdr(frame)
    a.send(frame, hdr=hdr.pack())
    sw.tx_burst(sw.ports[0], 0)
    headers: list[bytes] = []
    (got,), _ = b.received(headers)
    return frame, hdr, got, VnetHdr.unpack(headers[0])


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("capable", [True, False], ids=["guest_csum", "no_guest_csum"])
def test_partial_checksum(pair: Any, v6: bool, capable: bool) -> None:
    sw, a, b = pair(a={"tx_offloads": OFF_CSUM}, b={"rx_offloads": OFF_CSUM if capable else 0})
    frame, hdr, got, h = partial_frame_across(sw, a, b, v6=v6)
    if capable:   # passed on for the receiver to complete (or trust)
        assert got == frame and h == hdr
        assert stats(sw, 1)["rx_csum"] == 0
    else:         # completed here
        assert parse_tcp(got).payload == b"payload" * 100
        assert got[:50] == frame[:50] and h.flags & NEEDS_CSUM == 0 and h.flags & DATA_VALID == 0
        assert stats(sw, 1)["rx_csum"] == 1


@pytest.mark.parametrize("spec", [["loss=0%"], ["corrupt=100%"]], ids=["no_corruption", "corrupting"])
def test_impaired_port_completes_checksums_only_to_corrupt(pair: Any, spec: list[str]) -> None:
    """A port that takes partial checksums keeps them under an impairment
    that never corrupts (nothing to pay per byte); one that corrupts gets
    them completed and no DATA_VALID, so the flipped bit fails its check."""
    sw, a, b = pair(a={"tx_offloads": OFF_CSUM}, b={"rx_offloads": OFF_CSUM})
    sw.impair(sw.ports[1], parse_spec(spec))
    frame, hdr, got, h = partial_frame_across(sw, a, b)
    if spec == ["loss=0%"]:
        assert got == frame and h == hdr and stats(sw, 1)["rx_csum"] == 0
    else:
        assert h.flags & (NEEDS_CSUM | DATA_VALID) == 0 and stats(sw, 1)["rx_csum"] == 1
        assert got[:14] == frame[:14] and len(got) == len(frame) and got != frame


def test_offload_not_negotiated_is_dropped(pair: Any) -> None:
    sw, a, b = pair(a={"tx_offloads": OFF_CSUM}, b={"rx_offloads": OFF_ALL})
    b.add_rx(65536)
    frame = tcp_frame(bytes(3000), partial=True)
    a.send(frame, hdr=offload_hdr(frame, gso_size=1000).pack())      # HOST_TSO4 not negotiated
    bad = offload_hdr(frame)
    a.send(frame, hdr=VnetHdr(bad.flags, 0, 0, 0, len(frame) - 1, 16).pack())  # offset outside
    a.send(frame, hdr=VnetHdr(NEEDS_CSUM, 3, 54, 1000, 34, 6).pack())  # UDP GSO: never offered
    sw.tx_burst(sw.ports[0], 0)
    assert stats(sw, 0)["drops"] == {"bad_header": 3}
    assert b.received() == ([], 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(min_value=0, max_value=9000), mss=st.integers(min_value=200, max_value=1460),
       v6=st.booleans(), capable=st.booleans(), flags=st.sampled_from([TCP_ACK, TCP_ACK | TCP_PSH | TCP_FIN,
                                                                         TCP_ACK | TCP_CWR]),
       hdr_b=st.sampled_from([10, 12]), seq=st.integers(min_value=0, max_value=2**32 - 1))
def test_tcp_segmentation(pair: Any, size: int, mss: int, v6: bool, capable: bool, flags: int,
                          hdr_b: int, seq: int) -> None:
    """A TCP GSO frame reaches a port that takes GSO as it is, and any other
    port as segments a receiving stack accepts: lengths, ids, sequence
    numbers, flags and checksums right, payload complete and in order."""
    sw, a, b = pair(a={"tx_offloads": OFF_ALL},
                    b={"rx_offloads": OFF_ALL if capable else 0, "hdr_len": hdr_b, "mrg": hdr_b == 12})
    for _ in range(NUM):
        b.add_rx(2048 if hdr_b == 12 else 12000)
    payload = os.urandom(size)
    frame = tcp_frame(payload, v6=v6, seq=seq, flags=flags, partial=True)
    hdr = offload_hdr(frame, gso_size=mss)
    a.send(frame, hdr=hdr.pack())
    assert sw.tx_burst(sw.ports[0], 0) == 1
    headers: list[bytes] = []
    got, _ = b.received(headers)
    sb = stats(sw, 1)
    assert sb["dropped"] == 0, sb
    if capable:
        assert got == [frame] and VnetHdr.unpack(headers[0]) == hdr
        return
    count = max(1, -(-size // mss))
    assert len(got) == count == sb["rx_segments"] == sb["rx_packets"]
    segs = [parse_tcp(g) for g in got]
    assert b"".join(sg.payload for sg in segs) == payload
    for k, sg in enumerate(segs):
        assert len(sg.payload) == (min(mss, size - k * mss) if size else 0)
        assert sg.seq == (seq + k * mss) & 0xFFFFFFFF
        last = k == count - 1
        want = flags
        if not last:
            want &= ~(TCP_FIN | TCP_PSH)
        if k:
            want &= ~TCP_CWR
        assert sg.flags == want, (k, sg.flags, want)
        if not v6:
            assert sg.ip_id == (0x1234 + k) & 0xFFFF
    assert all(VnetHdr.unpack(h) == VnetHdr() for h in headers)
    assert sw.stats()["segmented"] == 1


# ------------------------------------------------------------------ switch hygiene


def test_header_flags_from_a_guest_are_reduced_to_needs_csum(pair: Any) -> None:
    """A driver must not set DATA_VALID (virtio 5.1.6.2.1): it never passes
    through to another guest, which would skip its own checksum check."""
    sw, a, b = pair(a={"tx_offloads": OFF_ALL}, b={"rx_offloads": OFF_ALL})
    b.add_rx(2048)
    frame = tcp_frame(b"x" * 100)            # checksum already complete (and could be wrong)
    a.send(frame, hdr=VnetHdr(DATA_VALID | 4, 0, 0, 0, 0, 0).pack())
    sw.tx_burst(sw.ports[0], 0)
    headers: list[bytes] = []
    (got,), _ = b.received(headers)
    assert got == frame and VnetHdr.unpack(headers[0]).flags == 0


def test_locked_port_drops_other_source_macs(pair: Any) -> None:
    sw, a, b = pair()
    for _ in range(4):
        b.add_rx(2048)
    sw.lock_mac(sw.ports[0], MACS[0])
    a.send(eth(BCAST, MACS[0], b"mine"))
    a.send(eth(MACS[1], MACS[2], b"not mine"))  # would also teach the switch MACS[2] is here
    sw.tx_burst(sw.ports[0], 0)
    assert b.received()[0] == [eth(BCAST, MACS[0], b"mine")]
    assert stats(sw, 0)["drops"] == {"spoofed": 1} and stats(sw, 0)["mac_locked"] == MACS[0].hex(":")
    assert sw.lookup(MACS[2]) is None


def test_learned_address_is_held_down_but_rarp_moves_it(pair: Any) -> None:
    """B claims A's address: while A is alive the entry stays on A's port
    (so A's unicast traffic is not stolen); SEND_RARP's announcement, a
    guest that migrated, moves it at once."""
    sw, a, b = pair()
    sw.inject(sw.ports[0], eth(BCAST, MACS[0], b"I am A"))
    assert sw.lookup(MACS[0]) == 0
    b.send(eth(BCAST, MACS[0], b"I am A too"))
    sw.tx_burst(sw.ports[1], 0)
    assert sw.lookup(MACS[0]) == 0 and stats(sw, 1)["moves_held"] == 1
    sw.inject(sw.ports[1], rarp_frame(MACS[0]))
    assert sw.lookup(MACS[0]) == 1


def test_address_of_a_stopped_port_moves_at_once(pair: Any) -> None:
    """A guest migrated away from port 0 (its rings stopped, GET_VRING_BASE)
    announces itself on port 1 (GUEST_ANNOUNCE: the guest's own frame, no
    SEND_RARP): its address moves whatever the hold-down."""
    sw, a, b = pair()
    sw.inject(sw.ports[0], eth(BCAST, MACS[0], b"I am A"))
    sw.ports[0].c.rx[0] = ffi.NULL            # the net device's queue_stopped
    b.send(eth(BCAST, MACS[0], b"gratuitous ARP"))
    sw.tx_burst(sw.ports[1], 0)
    assert sw.lookup(MACS[0]) == 1 and stats(sw, 1)["moves_held"] == 0


def test_hold_down_expires(pair: Any) -> None:
    sw, a, b = pair(hold_down_ms=30)
    sw.inject(sw.ports[0], eth(BCAST, MACS[0], b"x"))
    time.sleep(0.05)
    b.send(eth(BCAST, MACS[0], b"moved"))
    sw.tx_burst(sw.ports[1], 0)
    assert sw.lookup(MACS[0]) == 1


def test_learning_limit_per_port(pair: Any) -> None:
    sw, a, b = pair(learn_limit=3)
    for k in range(6):
        a.send(eth(BCAST, bytes([2, 0, 0, 1, 0, k]), b"x"))
    sw.tx_burst(sw.ports[0], 0)
    learned = [e for e in sw.fdb() if e["port"] == 0]
    assert len(learned) == 3 and stats(sw, 0)["learned"] == 3 and stats(sw, 0)["learn_refused"] == 3


def test_forwarding_table_survives_a_flood_of_addresses(pair: Any) -> None:
    """One port flooding 2048 new source addresses learns at most its limit
    and, in a full set, only ever evicts its own entries: another port's
    entry stays (the keyed hash keeps a guest from aiming at its set)."""
    sw, a, b = pair(learn_limit=0)
    sw.inject(sw.ports[1], eth(BCAST, MACS[1], b"B"))
    sent = 0
    for _ in range(2048 // 32):
        for _ in range(32):
            a.send(eth(BCAST, bytes([2, 0, 0, 2, sent >> 8, sent & 0xFF]), b"x"))
            sent += 1
        sw.tx_burst(sw.ports[0], 0)
        a.tx.get_used()
    assert sw.lookup(MACS[1]) == 1
    assert len(sw.fdb()) > 1900  # a few of A's own evicted each other in full sets


def test_software_segmentation_spends_the_budget(pair: Any) -> None:
    """A 62 KiB TCP frame with gso_size 32 becomes ~1900 segments for a
    port without GSO: each one, to each port, spends a unit of the call's
    budget, so one call stops after a few such frames and gives the rest of
    the batch back (vhost-net bounds its runs the same way)."""
    sw, a, b = pair(a={"tx_offloads": OFF_ALL}, b={"rx_offloads": 0})
    frame = tcp_frame(os.urandom(62000), partial=True)
    for _ in range(8):
        a.send(frame, hdr=offload_hdr(frame, gso_size=32).pack(), split=False)
    taken = sw.tx_burst(sw.ports[0], 0, 4096)
    assert 1 <= taken <= 3
    assert a.vq_tx.last_avail_idx == taken          # the others are still the guest's to give
    total = taken
    while total < 8:
        n = sw.tx_burst(sw.ports[0], 0, 4096)
        assert n >= 1
        total += n
    assert sw.stats()["segmented"] == 8
