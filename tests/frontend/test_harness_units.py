"""Unit tests of the front-end harness pieces, without a real back-end.

Memory translation and allocation, the driver ring layout against the
virtio spec's offsets, chain building and notification suppression,
message encoding with fds over a socketpair, reply validation, and the
personalities' sequences against a tiny fake back-end defined here (it
decodes every message with vuser.wire and walks the rings through its own
mappings of the memory fds, independently of the harness's ring code).
"""

from __future__ import annotations

import array
import dataclasses
import mmap
import os
import socket
import struct
from typing import Any

import pytest
import trio

from vuser import wire
from vuser.frontend import (
    DPDK,
    BackendDisconnected,
    BackendRefused,
    BackendTimeout,
    BadReply,
    Driver,
    DriverQueue,
    FeaturesRefused,
    Frontend,
    GuestRam,
    GuestRamError,
    RamRegionSpec,
    SplitLayout,
    UsedRingError,
    default_layout,
)
from vuser.frontend.connection import FrontendChannel
from vuser.frontend.vring import vring_need_event
from vuser.stream import MessageStream
from vuser.virtio import AvailFlag, DescFlag, UsedFlag
from vuser.wire import BackendRequest, Request
from vuser.wire import ProtocolFeature as PF

MiB = 1024 * 1024
F_INDIRECT, F_EVENT_IDX, F_PROTOCOL, F_VERSION_1 = 28, 29, 30, 32
ALL_PF = sum(1 << b for b in (PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.STATUS,
                              PF.RESET_DEVICE))


def bit(*bits: int) -> int:
    return sum(1 << b for b in bits)


# ====================================================================== memory


def test_default_layout_is_q35_like() -> None:
    specs = default_layout(64 * MiB, 2)
    assert specs == [RamRegionSpec(0, 0xA0000, 0), RamRegionSpec(0xC0000, 64 * MiB - 0xC0000, 0xC0000)]
    four = default_layout(64 * MiB, 4)
    assert [s.gpa for s in four] == [0, 0xC0000, 1 << 32, 2 << 32]
    assert sum(s.size for s in four) == 64 * MiB - 0xC0000 + 0xA0000
    offsets = [s.mmap_offset or 0 for s in four]
    assert offsets == sorted(offsets) and len(set(offsets)) == 4


def test_memory_translation_and_gaps() -> None:
    with GuestRam.create(8 * MiB, regions=3) as mem:
        r0, r1, r2 = mem.regions
        assert r1.mmap_offset != 0 and r2.mmap_offset != 0
        assert len({r.uva for r in mem.regions}) == 3
        assert all(r.uva != r.gpa for r in mem.regions)
        assert mem.fds() == [r0.fd] * 3  # one memfd, sent once per region as QEMU does
        for r in mem.regions:
            mem.write(r.gpa + r.size - 4, b"abcd")
            assert mem.read(r.gpa + r.size - 4, 4) == b"abcd"
            assert mem.uva_to_gpa(mem.gpa_to_uva(r.gpa + 5)) == r.gpa + 5
        with pytest.raises(GuestRamError):
            mem.read(r0.gpa_end - 2, 4)  # crosses into the hole
        with pytest.raises(GuestRamError):
            mem.read(0xB0000, 1)  # inside the hole
        with pytest.raises(GuestRamError):
            mem.uva_to_gpa(1)
        # The bytes are really in the memfd at mmap_offset.
        mem.write(r1.gpa + 16, b"xyz")
        assert os.pread(r1.fd, 3, r1.mmap_offset + 16) == b"xyz"


def test_memory_separate_fds_and_identity() -> None:
    with GuestRam.create(4 * MiB, regions=2, separate_fds=True, identity=True) as mem:
        r0, r1 = mem.regions
        assert r0.fd != r1.fd
        assert r1.mmap_offset % mmap.PAGESIZE == 0 and r1.mmap_offset > 0
        assert all(r.uva == r.gpa for r in mem.regions)
        mem.write(r1.gpa, b"hi")
        assert os.pread(r1.fd, 2, r1.mmap_offset) == b"hi"
        hot = mem.add_region(MiB)
        assert hot.gpa >= (1 << 32) and hot.fd not in (r0.fd, r1.fd)
    assert r0.fd == -1


def test_alloc_round_robin_and_free() -> None:
    with GuestRam.create(4 * MiB, regions=2) as mem:
        a = mem.alloc(100)
        b = mem.alloc(100)
        assert mem.region_of(a).index != mem.region_of(b).index
        mem.free(a)
        mem.free(b)
        big = mem.alloc(3 * MiB)
        assert mem.region_of(big, 3 * MiB).index == 1
        with pytest.raises(GuestRamError):
            mem.alloc(8 * MiB)
        with pytest.raises(GuestRamError):
            mem.free(big + 8)


# ====================================================================== ring layout


def test_split_layout_matches_spec() -> None:
    # Linux vring_size(num, align) and virtio 1.x 2.7 offsets.
    lay = SplitLayout(256, 4096)
    assert lay.desc_size == 4096
    assert lay.avail_offset == 4096
    assert lay.avail_size == 2 * (3 + 256)
    assert lay.used_offset == 8192
    assert lay.used_size == 6 + 8 * 256
    assert lay.size == 10246
    assert lay.avail_entry(3) == 10 and lay.used_event == 4 + 2 * 256
    assert lay.used_entry(3) == 28 and lay.avail_event == 4 + 8 * 256
    small = SplitLayout(8, 64)
    assert small.used_offset == 192 and small.size == 192 + 6 + 64


def test_vring_need_event() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(5, 7, 3)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # wraps
    assert not vring_need_event(10, 10, 10)


def test_chains_direct_and_indirect() -> None:
    with GuestRam.create(8 * MiB) as mem:
        q = DriverQueue(mem, 0, 8, indirect=True)
        assert q.desc_gpa % 16 == 0
        head = q.add_chain(out=[b"hello", b"wo"], in_=[16], indirect=False, token="t")
        d0 = q.read_desc(head)
        assert d0[1] == 5 and d0[2] == DescFlag.NEXT and mem.read(d0[0], 5) == b"hello"
        d1 = q.read_desc(d0[3])
        assert d1[1] == 2 and d1[2] == DescFlag.NEXT
        d2 = q.read_desc(d1[3])
        assert d2[1] == 16 and d2[2] == DescFlag.WRITE
        assert mem.unpack("<H", q.avail_gpa + 2)[0] == 1
        assert mem.unpack("<H", q.avail_gpa + 4)[0] == head
        # Linux's rule: indirect when negotiated and more than one buffer.
        h2 = q.add_chain(out=[b"a"], in_=[4])
        addr, length, flags, _ = q.read_desc(h2)
        assert flags == DescFlag.INDIRECT and length == 32
        t0 = mem.unpack("<QIHH", addr)
        t1 = mem.unpack("<QIHH", addr + 16)
        assert t0[1:] == (1, DescFlag.NEXT, 1) and t1[1:3] == (4, DescFlag.WRITE)
        assert q.num_free == 8 - 3 - 1
        q.close()


def test_used_collection_and_validation() -> None:
    with GuestRam.create(8 * MiB) as mem:
        q = DriverQueue(mem, 0, 4)
        head = q.add_inbuf(8, token="x")
        # Play the device: write data and a used element.
        addr = q.read_desc(head)[0]
        mem.write(addr, b"12345678")
        mem.pack("<II", q.used_gpa + 4, head, 5)
        mem.pack("<H", q.used_gpa + 2, 1)
        (elem,) = q.get_used()
        assert (elem.head, elem.length, elem.data, elem.token) == (head, 5, b"12345", "x")
        assert q.num_free == 4 and q.in_flight == 0
        h = q.add_inbuf(4)
        mem.pack("<II", q.used_gpa + 12, h, 99)  # longer than the buffer
        mem.pack("<H", q.used_gpa + 2, 2)
        with pytest.raises(UsedRingError, match="exceeds"):
            q.get_used()
        mem.pack("<II", q.used_gpa + 12, 3, 0)  # not a head in flight
        with pytest.raises(UsedRingError, match="not the head"):
            q.get_used()
        mem.pack("<H", q.used_gpa + 2, 40)
        with pytest.raises(UsedRingError, match="more than the queue size"):
            q.get_used()
        q.close()


def test_kick_suppression_and_event_idx() -> None:
    with GuestRam.create(8 * MiB) as mem:
        q = DriverQueue(mem, 0, 8)
        q.add_outbuf(b"x")
        assert q.kick() and os.eventfd_read(q.kick_fd) == 1
        mem.pack("<H", q.used_gpa, UsedFlag.NO_NOTIFY)
        q.add_outbuf(b"y")
        assert not q.kick() and q.stats.kicks_suppressed == 1
        q.close()

        e = DriverQueue(mem, 1, 8, event_idx=True)
        e.add_outbuf(b"a")
        assert e.kick()                  # avail_event 0: old 0 -> new 1 crosses it
        e.add_outbuf(b"b")
        assert not e.kick()              # device still asks for idx 0
        mem.pack("<H", e.used_gpa + e.layout.avail_event, 2)
        e.add_outbuf(b"c")
        assert e.kick()                  # 2 -> 3 crosses event 2
        # used_event follows last_used while callbacks are on; disable writes 0.
        mem.pack("<II", e.used_gpa + 4, 0, 0)
        mem.pack("<H", e.used_gpa + 2, 1)
        assert len(e.get_used()) == 1 and e.read_used_event() == 1
        e.disable_callbacks()
        assert e.read_used_event() == 0
        assert not e.enable_callbacks() or e.read_used_event() == 1
        e.close()

        n = DriverQueue(mem, 2, 8, callbacks=False)
        assert mem.unpack("<H", n.avail_gpa)[0] == AvailFlag.NO_INTERRUPT
        n.close()


# ====================================================================== connection


def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def _recv_with_fds(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    data, anc, _, _ = await sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
    fds: list[int] = []
    for level, kind, raw in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(raw)
            fds.extend(arr)
    return data, fds


async def test_request_encoding_with_fds_and_ack() -> None:
    ours, theirs = _pair()
    conn = FrontendChannel(ours, timeout=2)
    efd = os.eventfd(0)
    try:
        async def peer() -> None:
            data, fds = await _recv_with_fds(theirs)
            hdr = wire.Header.parse(data[:12])
            assert (hdr.request, hdr.flags, hdr.size) == (Request.SET_VRING_KICK, 0x9, 8)
            assert struct.unpack("<Q", data[12:20])[0] == 3
            assert len(fds) == 1
            os.eventfd_write(fds[0], 7)  # the received fd is the same eventfd
            os.close(fds[0])
            await theirs.send(wire.encode_u64_reply(Request.SET_VRING_KICK, 0))

        async with trio.open_nursery() as n:
            n.start_soon(peer)
            reply = await conn.request(Request.SET_VRING_KICK, {"u64": 3}, [efd], need_reply=True)
        assert reply is not None and reply.u64 == 0
        assert os.eventfd_read(efd) == 7
        entry = conn.trace[-1]
        assert entry.request == "SET_VRING_KICK" and entry.need_reply and entry.nfds == 1
        assert entry.fields.u64 == 3
    finally:
        os.close(efd)
        conn.close()
        theirs.close()


@pytest.mark.parametrize("reply, error", [
    (wire.encode_u64_reply(Request.SET_OWNER, 5), BackendRefused),
    (wire.Header.build(dict(request=Request.SET_OWNER, flags=0x1, size=8)) + bytes(8), BadReply),
    (wire.encode_u64_reply(Request.SET_FEATURES, 0), BadReply),
    (wire.encode_header(Request.SET_OWNER, wire.FLAG_REPLY, 4) + bytes(4), BadReply),
    (b"", BackendDisconnected),
    (None, BackendTimeout),
])
async def test_bad_replies(reply: bytes | None, error: type[Exception]) -> None:
    ours, theirs = _pair()
    conn = FrontendChannel(ours, timeout=0.3)

    async def peer() -> None:
        await theirs.recv(4096)
        if reply == b"":
            theirs.close()
        elif reply is not None:
            await theirs.send(reply)

    try:
        async with trio.open_nursery() as n:
            n.start_soon(peer)
            with pytest.raises(error, match="^SET_OWNER: "):
                await conn.request(Request.SET_OWNER, need_reply=True)
    finally:
        conn.close()
        theirs.close()


async def test_natural_reply_size_checked() -> None:
    ours, theirs = _pair()
    conn = FrontendChannel(ours, timeout=1)

    async def peer() -> None:
        await theirs.recv(4096)
        await theirs.send(wire.encode_header(Request.GET_FEATURES, wire.FLAG_REPLY, 4) + bytes(4))

    try:
        async with trio.open_nursery() as n:
            n.start_soon(peer)
            with pytest.raises(BadReply, match="GET_FEATURES: reply payload is 4 bytes"):
                await conn.request(Request.GET_FEATURES)
    finally:
        conn.close()
        theirs.close()


# ====================================================================== fake back-end


class FakeBackend:
    """Answers the requests the harness sends; maps memory and walks rings
    with its own code.  Every message is decoded with vuser.wire."""

    def __init__(self, *, features: int, protocol_features: int = ALL_PF, queue_num: int = 2,
                 config: bytes = b"", refuse_bits: int = 0,
                 refuse: dict[int, int] | None = None) -> None:
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.config = bytearray(config)
        self.refuse_bits = refuse_bits
        self.refuse = refuse or {}
        self.received: list[tuple[str, int, Any, int]] = []
        self.set_features_values: list[int] = []
        self.acked_protocol = 0
        self.status = 0
        self.regions: list[tuple[int, int, int, mmap.mmap, int]] = []  # gpa, size, uva, map, off
        self.vrings: dict[int, dict[str, Any]] = {}
        self.backend_chan: MessageStream | None = None
        self.fds: list[int] = []
        self.connection_closed = trio.Event()

    # ---------------------------------------------------------- memory

    def _map(self, region: Any, fd: int) -> None:
        mm = mmap.mmap(fd, region.memory_size + region.mmap_offset, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        self.regions.append((region.guest_phys_addr, region.memory_size, region.userspace_addr,
                             mm, region.mmap_offset))

    def _at(self, addr: int, length: int, *, uva: bool) -> tuple[mmap.mmap, int]:
        for gpa, size, user, mm, off in self.regions:
            base = user if uva else gpa
            if base <= addr and addr + length <= base + size:
                return mm, off + addr - base
        raise AssertionError(f"{'uva' if uva else 'gpa'} {addr:#x}+{length} not mapped")

    def rd(self, addr: int, n: int, uva: bool = False) -> bytes:
        mm, o = self._at(addr, n, uva=uva)
        return mm[o:o + n]

    def wr(self, addr: int, data: bytes, uva: bool = False) -> None:
        mm, o = self._at(addr, len(data), uva=uva)
        mm[o:o + len(data)] = data

    # ---------------------------------------------------------- ring walking

    def process(self, index: int) -> int:
        """Complete every available chain: the device writes b"ECHO:" + the
        readable bytes (or 0xab filler) into the writable buffers."""
        vr = self.vrings[index]
        num, desc, avail, used = vr["num"], vr["desc"], vr["avail"], vr["used"]
        avail_idx = struct.unpack("<H", self.rd(avail + 2, 2, uva=True))[0]
        done = 0
        used_idx = struct.unpack("<H", self.rd(used + 2, 2, uva=True))[0]
        old_used = used_idx
        while vr["last_avail"] != avail_idx:
            slot = vr["last_avail"] % num
            head = struct.unpack("<H", self.rd(avail + 4 + 2 * slot, 2, uva=True))[0]
            table: int | None = None
            tnum, i = num, head
            readable, writable = b"", []
            while True:
                if table is not None:  # indirect tables are guest-physical
                    raw = self.rd(table + 16 * i, 16)
                else:                  # the ring itself was given as a uva
                    raw = self.rd(desc + 16 * i, 16, uva=True)
                addr, length, flags, nxt = struct.unpack("<QIHH", raw)
                if flags & DescFlag.INDIRECT:
                    table, tnum, i = addr, length // 16, 0
                    continue
                if flags & DescFlag.WRITE:
                    writable.append((addr, length))
                else:
                    readable += self.rd(addr, length)
                if not flags & DescFlag.NEXT:
                    break
                i = nxt
                assert i < tnum
            out = b"ECHO:" + readable if readable else b"\xab" * sum(n for _, n in writable)
            written = 0
            for addr, n in writable:
                chunk = out[written:written + n]
                self.wr(addr, chunk)
                written += len(chunk)
            self.wr(used + 4 + 8 * (used_idx % num), struct.pack("<II", head, written), uva=True)
            used_idx = (used_idx + 1) & 0xFFFF
            vr["last_avail"] = (vr["last_avail"] + 1) & 0xFFFF
            done += 1
        self.wr(used + 2, struct.pack("<H", used_idx), uva=True)
        event_idx = bool(self.set_features_values and self.set_features_values[-1] & (1 << F_EVENT_IDX))
        if event_idx:
            self.wr(used + 4 + 8 * num, struct.pack("<H", avail_idx), uva=True)
            used_event = struct.unpack("<H", self.rd(avail + 4 + 2 * num, 2, uva=True))[0]
            signal = vring_need_event(used_event, used_idx, old_used)
        else:
            signal = not struct.unpack("<H", self.rd(avail, 2, uva=True))[0] & AvailFlag.NO_INTERRUPT
        if done and signal and vr.get("call") is not None:
            os.eventfd_write(vr["call"], 1)
        return done

    # ---------------------------------------------------------- serving

    def _set_fd(self, index: int, key: str, fds: list[int]) -> None:
        vr = self.vrings.setdefault(index, {"last_avail": 0})
        if vr.get(key) is not None:
            os.close(vr[key])
        vr[key] = fds[0] if fds else None

    async def serve(self, sock: trio.socket.SocketType) -> None:
        chan = MessageStream(sock, strict=False)
        try:
            while True:
                msg = await chan.recv()
                if msg is None:
                    return
                header = wire.decode_header(wire.encode_header(msg.request, msg.flags & ~wire.VERSION,
                                                               len(msg.payload)))
                try:
                    fields = wire.decode_payload(msg.request, msg.payload, len(msg.fds))
                except wire.WireError:
                    msg.close_fds()
                    return  # a real back-end closes the connection
                name = wire.request_name(msg.request)
                self.received.append((name, msg.flags, fields, len(msg.fds)))
                reply = self.handle(Request(msg.request), fields, list(msg.fds))
                if reply is not None:
                    await chan.send(reply)
                elif header.need_reply:
                    await chan.send(wire.encode_u64_reply(msg.request, self.refuse.get(msg.request, 0)))
        finally:
            chan.close()  # a back-end that gives up on a connection closes it
            self.connection_closed.set()

    def handle(self, req: Request, f: Any, fds: list[int]) -> bytes | None:
        u64 = wire.encode_u64_reply
        if req == Request.GET_FEATURES:
            return u64(req, self.features)
        if req == Request.GET_PROTOCOL_FEATURES:
            return u64(req, self.protocol_features)
        if req == Request.SET_PROTOCOL_FEATURES:
            self.acked_protocol = f.u64
        elif req == Request.GET_QUEUE_NUM:
            return u64(req, self.queue_num)
        elif req == Request.GET_MAX_MEM_SLOTS:
            return u64(req, 32)
        elif req == Request.SET_BACKEND_REQ_FD:
            self.backend_chan = MessageStream(trio.socket.from_stdlib_socket(
                socket.socket(fileno=fds[0])), strict=False)
        elif req == Request.SET_FEATURES:
            self.set_features_values.append(f.u64)
        elif req == Request.SET_MEM_TABLE:
            for *_, mm, _off in self.regions:
                mm.close()
            self.regions = []
            for region, fd in zip(f.regions, fds):
                self._map(region, fd)
        elif req == Request.ADD_MEM_REG:
            self._map(f.region, fds[0])
        elif req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ENABLE):
            vr = self.vrings.setdefault(f.index, {"last_avail": 0})
            key = {Request.SET_VRING_NUM: "num", Request.SET_VRING_BASE: "last_avail",
                   Request.SET_VRING_ENABLE: "enabled"}[req]
            vr[key] = f.num
        elif req == Request.SET_VRING_ADDR:
            vr = self.vrings.setdefault(f.index, {"last_avail": 0})
            vr.update(desc=f.desc_user_addr, avail=f.avail_user_addr, used=f.used_user_addr)
        elif req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            key = {Request.SET_VRING_KICK: "kick", Request.SET_VRING_CALL: "call",
                   Request.SET_VRING_ERR: "err"}[req]
            self._set_fd(f.u64 & 0xFF, key, fds)
        elif req == Request.GET_VRING_BASE:
            vr = self.vrings[f.index]
            return wire.encode_reply(req, wire.VringState, {"index": f.index, "num": vr["last_avail"]})
        elif req == Request.GET_CONFIG:
            data = bytes(self.config[f.offset:f.offset + f.size]).ljust(f.size, b"\0")
            return wire.encode_reply(req, wire.Config, {"offset": f.offset, "size": f.size,
                                                        "flags": f.flags, "payload": data})
        elif req == Request.SET_CONFIG:
            self.config[f.offset:f.offset + f.size] = f.payload
        elif req == Request.SET_STATUS:
            value = f.u64
            if value & 8 and self.set_features_values and self.set_features_values[-1] & self.refuse_bits:
                value &= ~8
            self.status = value
        elif req == Request.GET_STATUS:
            return u64(req, self.status)
        else:
            for fd in fds:
                os.close(fd)
        return None

    def close(self) -> None:
        for *_, mm, _off in self.regions:
            mm.close()
        for vr in self.vrings.values():
            for key in ("kick", "call", "err"):
                if vr.get(key) is not None:
                    os.close(vr[key])
                    vr[key] = None
        if self.backend_chan is not None:
            self.backend_chan.close()

    def names(self) -> list[str]:
        return [n for n, *_ in self.received]


DEVICE_FEATURES = bit(F_VERSION_1, F_EVENT_IDX, F_INDIRECT, F_PROTOCOL, 0, 3, 5)


async def _with_backend(backend: FakeBackend, body: Any, **options: Any) -> None:
    ours, theirs = _pair()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.serve, theirs)
            with trio.fail_after(10):
                async with Frontend.over_socket(ours, timeout=2, **options) as fe:
                    await body(fe)
            nursery.cancel_scope.cancel()
    finally:
        theirs.close()
        backend.close()


# ====================================================================== personalities


async def test_qemu_11_1_connect_start_stop_sequence() -> None:
    be = FakeBackend(features=DEVICE_FEATURES, config=bytes(range(16)))

    async def body(fe: Frontend) -> None:
        assert fe.sent() == [
            "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
            "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES",
            "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL", "SET_VRING_ERR"]
        assert be.acked_protocol == ALL_PF
        n0 = len(fe.trace)
        drv = Driver(fe, features=[0, 5], queues=[0])   # queue 1 exists but is never set up
        await drv.probe()
        start = fe.sent()[n0:]
        assert start == [
            "SET_FEATURES", "GET_STATUS", "SET_STATUS", "GET_STATUS", "SET_MEM_TABLE",
            "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL",
            "SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_STATUS", "SET_STATUS",
            "SET_VRING_CALL", "GET_CONFIG"]
        assert be.set_features_values == [bit(F_VERSION_1, F_EVENT_IDX, F_INDIRECT, F_PROTOCOL, 0, 5)]
        assert drv.negotiated_features == bit(F_VERSION_1, F_EVENT_IDX, F_INDIRECT, 0, 5)
        assert be.status == 1 | 2 | 4 | 8
        need = {e.request for e in fe.trace if e.need_reply}
        assert need == {"SET_BACKEND_REQ_FD", "SET_MEM_TABLE", "SET_VRING_KICK", "SET_VRING_CALL",
                        "SET_VRING_ERR", "SET_VRING_ENABLE"}
        enables = [(e.fields.index, e.fields.num) for e in fe.trace if e.request == "SET_VRING_ENABLE"]
        assert enables == [(0, 1), (1, 1)]
        table = next(e for e in fe.trace if e.request == "SET_MEM_TABLE")
        assert table.nfds == 2 and [r.mmap_offset for r in table.fields.regions] == [0, 0xC0000]
        addr = next(e for e in fe.trace if e.request == "SET_VRING_ADDR").fields
        q = drv.queue(0)
        assert addr.desc_user_addr == fe.memory.gpa_to_uva(q.desc_gpa) != q.desc_gpa

        n1 = len(fe.trace)
        bases = await drv.remove()
        assert fe.sent()[n1:] == ["SET_VRING_ENABLE", "SET_VRING_ENABLE", "GET_VRING_BASE", "SET_STATUS"]
        assert bases == {0: 0}

    await _with_backend(be, body, num_queues=2, config_size=16)


async def test_qemu_7_2_and_mem_slots() -> None:
    be = FakeBackend(features=DEVICE_FEATURES, protocol_features=ALL_PF | bit(PF.CONFIGURE_MEM_SLOTS))

    async def body(fe: Frontend) -> None:
        assert "SET_VRING_ERR" not in fe.sent()
        assert "GET_MAX_MEM_SLOTS" in fe.sent() and fe.max_mem_slots == 32
        drv = Driver(fe, queues=[0])
        await drv.probe()
        assert "SET_MEM_TABLE" not in fe.sent()
        adds = [e for e in fe.trace if e.request == "ADD_MEM_REG"]
        assert len(adds) == 2 and all(e.nfds == 1 and e.need_reply for e in adds)
        need = {e.request for e in fe.trace if e.need_reply}
        assert need == {"SET_BACKEND_REQ_FD", "ADD_MEM_REG"}

    await _with_backend(be, body, personality="qemu-7.2", num_queues=1)


async def test_dpdk_sequence_without_protocol_features() -> None:
    be = FakeBackend(features=bit(F_VERSION_1, F_EVENT_IDX, 0))

    async def body(fe: Frontend) -> None:
        assert fe.sent() == ["SET_OWNER", "GET_FEATURES"]
        assert all(r.uva == r.gpa for r in fe.memory.regions)
        drv = Driver(fe)
        await drv.probe()
        assert fe.sent()[2:] == [
            "SET_VRING_CALL", "SET_VRING_CALL", "SET_FEATURES", "SET_MEM_TABLE",
            "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
            "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
            "SET_VRING_ENABLE", "SET_VRING_ENABLE",
            *(["SET_VRING_ENABLE"] * 2 + ["SET_MEM_TABLE"] + ["SET_VRING_ENABLE"] * 2) * 2]
        assert be.set_features_values == [bit(F_VERSION_1, 0)]  # no EVENT_IDX
        assert not drv.queue(0).event_idx and not drv.offers(F_EVENT_IDX)
        assert min(r.gpa for r in fe.memory.regions) == 0x1_0000_0000
        assert not any(e.need_reply for e in fe.trace)

    await _with_backend(be, body, personality=DPDK, num_queues=2)


async def test_dpdk_status_and_refused_features() -> None:
    be = FakeBackend(features=DEVICE_FEATURES, refuse_bits=bit(5))

    async def body(fe: Frontend) -> None:
        assert fe.protocol_features == bit(PF.MQ, PF.REPLY_ACK, PF.STATUS)
        with pytest.raises(FeaturesRefused):
            await Driver(fe, queues=[0]).probe()
        assert [e.fields.u64 for e in fe.trace if e.request == "SET_STATUS"] == [1, 3, 11]

    await _with_backend(be, body, personality="dpdk", num_queues=1)


# ====================================================================== driver


async def test_each_mode_feature_writes_validate_and_early_config() -> None:
    # MTU-like case: config read before any feature write, validate clears bit 3.
    be = FakeBackend(features=DEVICE_FEATURES, config=b"\x00" * 10 + (40).to_bytes(2, "little"))
    seen: list[bytes] = []

    async def validate(drv: Driver) -> None:
        if drv.has_feature(3):
            mtu = await drv.read_config(10, 2)
            seen.append(mtu)
            if int.from_bytes(mtu, "little") < 68:
                drv.clear_feature(3)

    async def body(fe: Frontend) -> None:
        assert await fe.get_config(10, 2) == (40).to_bytes(2, "little")
        assert be.set_features_values == []
        drv = Driver(fe, features=[0, 3], decline=[F_INDIRECT], validate=validate,
                     feature_writes="each", pre_feature_writes=[0], queues=[0, 1])
        await drv.probe()
        base = bit(F_PROTOCOL)
        full = bit(F_VERSION_1, F_EVENT_IDX, 0, 3)
        assert be.set_features_values == [base, full | base, (full & ~bit(3)) | base]
        assert seen == [(40).to_bytes(2, "little")]
        assert drv.negotiated_features == full & ~bit(3)
        # Status writes are forwarded one by one in "each" mode.
        assert [e.fields.u64 for e in fe.trace if e.request == "SET_STATUS"] == [0, 1, 3, 11, 15]
        i_fok = fe.sent().index("GET_STATUS")
        assert fe.sent().index("SET_MEM_TABLE") > i_fok
        assert fe.sent().count("SET_FEATURES") == 3

    await _with_backend(be, body, num_queues=2, config_size=12)


async def test_qemu_mode_refusal_surfaces_at_driver_ok() -> None:
    be = FakeBackend(features=DEVICE_FEATURES, refuse_bits=bit(5))

    async def body(fe: Frontend) -> None:
        drv = Driver(fe, queues=[0])
        with pytest.raises(FeaturesRefused, match="FEATURES_OK not set"):
            await drv.probe()
        assert "SET_MEM_TABLE" not in fe.sent()
        assert drv.negotiated_features is None

    await _with_backend(be, body, num_queues=1)


async def test_data_path_event_idx_and_vring_base() -> None:
    be = FakeBackend(features=DEVICE_FEATURES)

    async def body(fe: Frontend) -> None:
        drv = Driver(fe, queues=[0, 1], queue_size=8)
        await drv.probe()
        q = drv.queue(0)
        assert q.event_idx and q.indirect
        kicked = q.kick() if q.add_outbuf(b"ping") is not None else False
        assert kicked
        h_in = q.add_inbuf(6)
        h_chain = q.add_chain(out=[b"ab", b"cd"], in_=[3, 20])
        q.kick()
        assert be.process(0) == 3
        used = await q.wait_used(3, timeout=2)
        by_head = {u.head: u for u in used}
        assert by_head[h_in].data == b"\xab" * 6
        assert by_head[h_chain].data == b"ECHO:abcd" and by_head[h_chain].length == 9
        assert q.stats.calls >= 1
        # Many more chains than the ring holds, reusing descriptors.
        for round_ in range(5):
            heads = [q.add_inbuf(4) for _ in range(8)]
            assert q.num_free == 0
            q.kick(force=True)
            be.process(0)
            assert len(await q.wait_used(8, timeout=2)) == 8
            assert len(set(heads)) == 8
        bases = await fe.stop()
        assert bases == {0: q.avail_idx, 1: 0} and q.avail_idx == 43
        # Restart resumes from the saved base.
        n = len(fe.trace)
        await fe.start(drv.queues, features=drv.features)
        base_msgs = [e.fields.num for e in fe.trace[n:] if e.request == "SET_VRING_BASE"]
        assert base_msgs == [43, 0]

    await _with_backend(be, body, num_queues=2)


async def test_whole_config_write_uses_stale_copy() -> None:
    be = FakeBackend(features=DEVICE_FEATURES, config=bytes(8))

    async def body(fe: Frontend) -> None:
        drv = Driver(fe, queues=[])
        assert await drv.read_config(0, 4) == bytes(4)
        be.config[0:4] = b"\x10\x00\x00\x00"     # the back-end changes num_pages
        await drv.write_config(4, b"\x05\x00\x00\x00")  # guest writes `actual`
        cfg = next(e for e in reversed(fe.trace) if e.request == "SET_CONFIG").fields
        assert (cfg.offset, cfg.size) == (0, 8)
        assert bytes(be.config) == bytes(4) + b"\x05\x00\x00\x00"  # stale num_pages written back

    await _with_backend(be, body, num_queues=1, config_size=8)


async def test_backend_channel_config_change() -> None:
    be = FakeBackend(features=DEVICE_FEATURES)
    seen: list[str] = []

    async def body(fe: Frontend) -> None:
        assert be.backend_chan is not None
        before = fe.config_changes
        await be.backend_chan.send(wire.encode_header(BackendRequest.CONFIG_CHANGE_MSG,
                                                      wire.FLAG_NEED_REPLY, 0))
        ack = await be.backend_chan.recv()
        assert ack is not None and ack.flags == 0x5 and ack.payload == bytes(8)
        assert await fe.wait_config_change(since=before, timeout=1) == before + 1
        await be.backend_chan.send(wire.encode_header(BackendRequest.VRING_CALL,
                                                      wire.FLAG_NEED_REPLY, 8) + bytes(8))
        nack = await be.backend_chan.recv()
        assert nack is not None and nack.payload == (1).to_bytes(8, "little")
        assert [m.request for m in fe.backend_messages] == ["CONFIG_CHANGE_MSG", "VRING_CALL"]
        assert seen == ["CONFIG_CHANGE_MSG", "VRING_CALL"]

    await _with_backend(be, body, num_queues=1, on_backend_message=lambda m: seen.append(m.request))


async def test_refusal_raises_named_error() -> None:
    be = FakeBackend(features=DEVICE_FEATURES, refuse={Request.SET_VRING_ENABLE: 1})

    async def body(fe: Frontend) -> None:
        with pytest.raises(BackendRefused, match="^SET_VRING_ENABLE: refused"):
            await fe.set_vring_enable(0, True)

    await _with_backend(be, body, num_queues=1)


async def test_raw_messages_and_disconnect() -> None:
    be = FakeBackend(features=DEVICE_FEATURES)

    async def body(fe: Frontend) -> None:
        # Wrong size for SET_VRING_NUM: the fake back-end closes the connection.
        await fe.send_raw(wire.encode_header(Request.SET_VRING_NUM, 0, 4) + bytes(4))
        assert fe.trace[-1].request == "SET_VRING_NUM"
        await fe.expect_disconnect(timeout=1)
        with pytest.raises(BackendDisconnected, match="^GET_FEATURES: "):
            await fe.get_features()

    await _with_backend(be, body, num_queues=1, handshake=False)


async def test_request_raw_and_protocol_override() -> None:
    be = FakeBackend(features=DEVICE_FEATURES)

    async def body(fe: Frontend) -> None:
        assert fe.protocol_features == bit(PF.MQ, PF.REPLY_ACK)
        assert "SET_BACKEND_REQ_FD" not in fe.sent()
        reply = await fe.request(Request.GET_QUEUE_NUM)
        assert reply is not None and reply.u64 == 2
        reply = await fe.request(Request.SET_OWNER, need_reply=True)
        assert reply is not None and reply.u64 == 0

    await _with_backend(be, body, protocol_features=bit(PF.MQ, PF.REPLY_ACK))


async def test_listen_and_connect_modes(tmp_path: Any) -> None:
    path = str(tmp_path / "vu.sock")
    be = FakeBackend(features=DEVICE_FEATURES)

    async def backend_client() -> None:
        while True:
            s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await s.connect(path)
                break
            except OSError:
                s.close()
                await trio.sleep(0.01)
        with s:
            await be.serve(s)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(backend_client)
            async with Frontend.listen(path, timeout=2, num_queues=1) as fe:
                assert fe.backend_features == DEVICE_FEATURES
                assert not os.path.exists(path)
    be.close()

    be2 = FakeBackend(features=DEVICE_FEATURES)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)

    async def backend_server() -> None:
        conn, _ = await listener.accept()
        with conn:
            await be2.serve(conn)

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(backend_server)
                async with Frontend.connect(path, timeout=2, num_queues=1,
                                            personality=dataclasses.replace(DPDK, name="x")) as fe:
                    assert fe.sent()[0] == "SET_OWNER"
                await be2.connection_closed.wait()
    finally:
        listener.close()
        be2.close()


async def test_fds_closed_on_exit() -> None:
    be = FakeBackend(features=DEVICE_FEATURES)
    held: list[int] = []

    async def body(fe: Frontend) -> None:
        drv = Driver(fe, queues=[0])
        await drv.probe()
        held.extend([drv.queue(0).kick_fd, drv.queue(0).call_fd, *fe.memory.fds()])

    before = set(os.listdir("/proc/self/fd"))
    await _with_backend(be, body, num_queues=1)
    for fd in held:
        with pytest.raises(OSError):
            os.fstat(fd)
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert not leaked


async def test_qemu_enable_without_reply_ack_syncs_with_get_features() -> None:
    be = FakeBackend(features=DEVICE_FEATURES, protocol_features=bit(PF.MQ, PF.STATUS))

    async def body(fe: Frontend) -> None:
        assert not fe.conn.reply_ack
        n = len(fe.trace)
        await fe.set_vring_enable(0, True)
        assert fe.sent()[n:] == ["SET_VRING_ENABLE", "GET_FEATURES"]
        assert not fe.trace[n].need_reply

    await _with_backend(be, body, num_queues=1)


async def test_forced_features_like_qemu_7_2_rng() -> None:
    be = FakeBackend(features=bit(F_VERSION_1, F_PROTOCOL))

    async def body(fe: Frontend) -> None:
        drv = Driver(fe, force_features=[F_EVENT_IDX, F_INDIRECT], queues=[0])
        await drv.probe()
        assert be.set_features_values == [bit(F_VERSION_1, F_PROTOCOL, F_EVENT_IDX, F_INDIRECT)]
        assert drv.queue(0).event_idx and drv.queue(0).indirect

    await _with_backend(be, body, personality="qemu-7.2", num_queues=1)


async def test_backend_channel_replaced() -> None:
    be = FakeBackend(features=DEVICE_FEATURES)

    async def body(fe: Frontend) -> None:
        first = be.backend_chan
        await fe.set_backend_req_fd()   # a second channel replaces the first
        second = be.backend_chan
        assert second is not None and second is not first and first is not None
        assert await first.recv() is None  # the front-end closed the old one
        await second.send(wire.encode_header(BackendRequest.CONFIG_CHANGE_MSG, 0, 0))
        assert await fe.wait_config_change(since=0, timeout=1) == 1
        first.close()

    await _with_backend(be, body, num_queues=1)
