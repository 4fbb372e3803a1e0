"""A front-end that breaks the protocol, and a guest that puts garbage in a
ring (style.md, "two error families").

Protocol faults: the back-end closes *that* connection with one log line
naming the request and the fault, closes every fd it received, and serves
the next connection normally.  Ring faults: the device is marked as needing
reset (GET_STATUS has DEVICE_NEEDS_RESET, the status shows the ring error),
the connection stays up, and nothing else in the process is disturbed.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import pytest
import trio

from conftest import (
    STATUS_NEEDS_RESET,
    RngDevice,
    check_rng_data,
    closing_lines,
    fd_count,
    probe_and_serve,
    served,
    submit_mixed,
    wait_idle,
    wait_until,
)
from vuser import wire
from vuser.frontend import Driver, DriverQueue, Frontend
from vuser.virtio import DescFlag
from vuser.runner import Runner
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request as R

MiB = 1 << 20


def msg(code: int, payload: bytes = b"", flags: int = 0, size: int | None = None) -> bytes:
    """A raw message: header (version 1 | flags) and payload as given."""
    return wire.encode_header(code, flags, len(payload) if size is None else size) + payload


def u64(value: int) -> bytes:
    return struct.pack("=Q", value)


def vring_state(index: int, num: int) -> bytes:
    return struct.pack("=II", index, num)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def region_entry(gpa: int, size: int, uva: int, offset: int) -> bytes:
    return struct.pack("=QQQQ", gpa, size, uva, offset)


def mem_table(*entries: bytes) -> bytes:
    return struct.pack("=II", len(entries), 0) + b"".join(entries)


def config_req(offset: int, size: int) -> bytes:
    return struct.pack("=III", offset, size, 0) + bytes(size)


# ------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Bad:
    """One malformed conversation: ``send`` is run on a connected front-end
    (after the connect-phase handshake unless ``handshake`` is False); the
    back-end must log ``closing connection: {request}: ...{fault}...``."""

    name: str
    request: str
    fault: str
    send: Callable[[Frontend], Awaitable[None]]
    handshake: bool = True


def raw(data: bytes, nfds: int = 0) -> Callable[[Frontend], Awaitable[None]]:
    async def send(fe: Frontend) -> None:
        fds = [eventfd() for _ in range(nfds)]
        try:
            await fe.send_raw(data, fds)
        finally:
            for fd in fds:
                os.close(fd)
    return send


def raw_with_fds(data: bytes, make_fds: Callable[[Frontend], list[int]]) -> Callable[[Frontend], Awaitable[None]]:
    async def send(fe: Frontend) -> None:
        fds = make_fds(fe)
        await fe.send_raw(data, fds)
    return send


def truncated_then_eof(data: bytes) -> Callable[[Frontend], Awaitable[None]]:
    async def send(fe: Frontend) -> None:
        await fe.send_raw(data)
        fe.conn.stream.sock.shutdown(socket.SHUT_WR)
    return send


def memfd(size: int) -> int:
    fd = os.memfd_create("bad-region", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fds_of_memory(fe: Frontend) -> list[int]:
    return [r.fd for r in fe.memory.regions]


async def bad_ring_address(fe: Frontend) -> None:
    await fe.set_mem_table()
    await fe.set_vring_num(0, 256)
    await fe.set_vring_base(0, 0)
    # An address no region covers (and a used ring that would straddle the end).
    top = max(r.uva + r.size for r in fe.memory.regions)
    await fe.set_vring_addr(0, desc=0xDEAD_0000_0000, used=top - 8, avail=top + 4096)
    fd = eventfd()
    try:
        await fe.send_raw(msg(R.SET_VRING_KICK, u64(0)), [fd])
    finally:
        os.close(fd)


async def kick_without_rings(fe: Frontend) -> None:
    fd = eventfd()
    try:
        await fe.send_raw(msg(R.SET_VRING_KICK, u64(0)), [fd])
    finally:
        os.close(fd)


async def region_beyond_its_fd(fe: Frontend) -> None:
    fd = memfd(1 * MiB)
    try:
        await fe.send_raw(msg(R.SET_MEM_TABLE, mem_table(region_entry(0, 4 * MiB, 0x7000_0000_0000, 0))), [fd])
    finally:
        os.close(fd)


async def region_not_mappable(fe: Frontend) -> None:
    r, w = os.pipe()
    try:
        await fe.send_raw(msg(R.SET_MEM_TABLE, mem_table(region_entry(0, 1 * MiB, 0x7000_0000_0000, 0))), [r])
    finally:
        os.close(r)
        os.close(w)


async def overlapping_regions(fe: Frontend) -> None:
    fds = [memfd(2 * MiB), memfd(2 * MiB)]
    try:
        table = mem_table(region_entry(0, 2 * MiB, 0x7000_0000_0000, 0),
                          region_entry(1 * MiB, 2 * MiB, 0x7100_0000_0000, 0))
        await fe.send_raw(msg(R.SET_MEM_TABLE, table), fds)
    finally:
        for fd in fds:
            os.close(fd)


async def features_changed_after_ok(fe: Frontend) -> None:
    feats = fe.backend_features or 0
    await fe.set_features(feats & ~(1 << 29))
    await fe.set_status(0x0B)  # ACKNOWLEDGE | DRIVER | FEATURES_OK
    assert await fe.get_status() & 0x08
    await fe.send_raw(msg(R.SET_FEATURES, u64(feats)))


_rng = random.Random(0x5EED)
GARBAGE = [bytes(_rng.randrange(256) for _ in range(n)) for n in (12, 40, 300)]

CASES: list[Bad] = [
    Bad("payload-size", "SET_FEATURES", "payload is 4 bytes", raw(msg(R.SET_FEATURES, b"\0" * 4))),
    Bad("payload-size-vring", "GET_VRING_BASE", "payload is 12 bytes",
        raw(msg(R.GET_VRING_BASE, b"\0" * 12))),
    Bad("payload-too-big", "SET_CONFIG", "exceeds 4096", raw(msg(R.SET_CONFIG, size=100000))),
    Bad("unknown-request", "request 99", "unknown request", raw(msg(99, u64(0)))),
    Bad("request-zero", "request 0", "unknown request", raw(msg(0))),
    Bad("unsupported-request", "POSTCOPY_ADVISE", "not supported", raw(msg(R.POSTCOPY_ADVISE))),
    Bad("device-state-refused", "SET_DEVICE_STATE_FD", "not supported",
        raw(msg(R.SET_DEVICE_STATE_FD, b"\0" * 8), 1)),
    Bad("log-base-without-shmfd", "SET_LOG_BASE", "LOG_SHMFD not negotiated",
        raw(msg(R.SET_LOG_BASE, b"\0" * 16), 1), handshake=False),
    Bad("kick-two-fds", "SET_VRING_KICK", "carries 2 fds", raw(msg(R.SET_VRING_KICK, u64(0)), 2)),
    Bad("kick-no-fd", "SET_VRING_KICK", "no fd attached", raw(msg(R.SET_VRING_KICK, u64(0)))),
    Bad("call-fd-and-nofd-flag", "SET_VRING_CALL", "no-fd flag",
        raw(msg(R.SET_VRING_CALL, u64(wire.VRING_NOFD_MASK)), 1)),
    Bad("owner-with-fd", "SET_OWNER", "carries 1 fds", raw(msg(R.SET_OWNER), 1)),
    Bad("mem-table-fewer-fds", "SET_MEM_TABLE", "2 regions but 1 fds",
        raw_with_fds(msg(R.SET_MEM_TABLE, mem_table(region_entry(0, MiB, 1 << 40, 0),
                                                    region_entry(2 * MiB, MiB, 2 << 40, 0))),
                     lambda fe: fds_of_memory(fe)[:1])),
    Bad("mem-table-nine-regions", "SET_MEM_TABLE", "9 regions",
        raw(msg(R.SET_MEM_TABLE, struct.pack("=II", 9, 0) + b"\0" * 32 * 9))),
    Bad("add-mem-reg-no-fd", "ADD_MEM_REG", "carries 0 fds",
        raw(msg(R.ADD_MEM_REG, b"\0" * 8 + region_entry(0, MiB, 1 << 40, 0)))),
    Bad("vring-index", "SET_VRING_NUM", "vring index 7 out of range", raw(msg(R.SET_VRING_NUM, vring_state(7, 256)))),
    Bad("vring-index-call", "SET_VRING_CALL", "vring index 200 out of range",
        raw(msg(R.SET_VRING_CALL, u64(200)), 1)),
    Bad("vring-index-get-base", "GET_VRING_BASE", "out of range", raw(msg(R.GET_VRING_BASE, vring_state(1, 0)))),
    Bad("vring-size", "SET_VRING_NUM", "queue size 3", raw(msg(R.SET_VRING_NUM, vring_state(0, 3)))),
    Bad("vring-base", "SET_VRING_BASE", "does not fit", raw(msg(R.SET_VRING_BASE, vring_state(0, 0x10000)))),
    Bad("reserved-flag-bits", "SET_OWNER", "reserved flag bits", raw(msg(R.SET_OWNER, flags=0x20))),
    Bad("bad-version", "GET_FEATURES", "unsupported version",
        raw(struct.pack("=III", R.GET_FEATURES, 0x2, 0))),
    Bad("reply-flag-on-request", "GET_FEATURES", "reply flag", raw(msg(R.GET_FEATURES, flags=wire.FLAG_REPLY))),
    Bad("kick-reserved-bits", "SET_VRING_KICK", "reserved bits", raw(msg(R.SET_VRING_KICK, u64(1 << 12)), 1)),
    Bad("status-too-wide", "SET_STATUS", "does not fit 8 bits", raw(msg(R.SET_STATUS, u64(0x1FF)))),
    Bad("protocol-features-not-offered", "SET_PROTOCOL_FEATURES", "not offered",
        raw(msg(R.SET_PROTOCOL_FEATURES, u64(1 << PF.INFLIGHT_SHMFD)))),
    Bad("backend-req-fd-not-negotiated", "SET_BACKEND_REQ_FD", "BACKEND_REQ not negotiated",
        raw(msg(R.SET_BACKEND_REQ_FD), 1), handshake=False),
    Bad("get-config-beyond-256", "GET_CONFIG", "beyond config space", raw(msg(R.GET_CONFIG, config_req(250, 16)))),
    Bad("get-config-size-300", "GET_CONFIG", "exceeds 256", raw(msg(R.GET_CONFIG, config_req(0, 300)))),
    Bad("get-config-size-mismatch", "GET_CONFIG", "header says 16",
        raw(msg(R.GET_CONFIG, struct.pack("=III", 0, 16, 0) + bytes(8)))),
    Bad("truncated-payload-eof", "SET_FEATURES", "connection closed after 4 of 8 payload bytes", truncated_then_eof(msg(R.SET_FEATURES, b"\0" * 4, size=8))),
    Bad("truncated-header-eof", "header", "connection closed after 5 of 12 header bytes", truncated_then_eof(b"\x01\x00\x00\x00\x01"), handshake=False),
    Bad("garbage-12", "request", "", raw(GARBAGE[0]), handshake=False),
    Bad("garbage-40", "request", "", raw(GARBAGE[1])),
    Bad("garbage-300", "request", "", raw(GARBAGE[2])),
    Bad("ring-not-in-memory", "SET_VRING_KICK", "not in guest memory", bad_ring_address),
    Bad("kick-without-ring", "SET_VRING_KICK", "without size or addresses", kick_without_rings),
    Bad("region-beyond-fd", "SET_MEM_TABLE", "cannot map region", region_beyond_its_fd),
    Bad("region-not-mappable", "SET_MEM_TABLE", "cannot map region", region_not_mappable),
    Bad("regions-overlap", "SET_MEM_TABLE", "overlap", overlapping_regions),
    Bad("region-size-0", "SET_MEM_TABLE", "size 0",
        raw_with_fds(msg(R.SET_MEM_TABLE, mem_table(region_entry(0, 0, 1 << 40, 0))),
                     lambda fe: fds_of_memory(fe)[:1])),
    Bad("features-changed-after-features-ok", "SET_FEATURES", "after FEATURES_OK", features_changed_after_ok),
]


async def run_bad(path: str, case: Bad) -> None:
    async with Frontend.connect(path, handshake=case.handshake, timeout=5) as fe:
        await case.send(fe)
        await fe.expect_disconnect(timeout=5)


def check_logged(caplog: pytest.LogCaptureFixture, case: Bad) -> None:
    lines = closing_lines(caplog)
    assert len(lines) == 1, f"expected one 'closing connection' line, got {lines}"
    line = lines[0]
    assert f"closing connection: {case.request}" in line, line
    assert case.fault in line, line
    if not case.fault:  # truncated or garbage: the line must still say what was wrong
        assert len(line.split("closing connection: ", 1)[1].split(": ", 1)) == 2, line


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_malformed_message_closes_only_that_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: Bad) -> None:
    caplog.set_level(logging.INFO, logger="vuser")
    path = str(tmp_path / "rng.sock")
    with trio.fail_after(30):
        async with served(RngDevice(), path) as runner:
            await run_bad(path, case)
            await wait_idle(runner, 1)
            check_logged(caplog, case)
            caplog.clear()
            # The next front-end gets the whole service.
            async with Frontend.connect(path) as fe:
                drv = await probe_and_serve(fe, chains=8)
                assert await fe.stop() == {0: 8}
                assert drv.negotiated_features is not None
            await wait_idle(runner, 2)
            assert closing_lines(caplog) == []


async def test_no_fd_leak_across_bad_connections(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every fd a broken conversation brought (memfds, eventfds, the
    back-end channel, pipe ends) is closed by the back-end."""
    caplog.set_level(logging.INFO, logger="vuser")
    path = str(tmp_path / "rng.sock")
    # Cases that leave fds behind if anything leaks: memory tables, ADD_MEM_REG,
    # kick/call fds, the back-end channel, fds on requests that take none.
    picked = [c for c in CASES if c.name in {
        "kick-two-fds", "owner-with-fd", "mem-table-fewer-fds", "unsupported-request",
        "call-fd-and-nofd-flag", "ring-not-in-memory", "region-beyond-fd", "region-not-mappable",
        "regions-overlap", "region-size-0", "vring-index-call", "kick-without-ring",
        "truncated-payload-eof", "garbage-300", "backend-req-fd-not-negotiated",
        "features-changed-after-features-ok", "kick-reserved-bits", "payload-too-big",
    }]
    with trio.fail_after(120):
        async with served(RngDevice(), path) as runner:
            # Warm up (lazy imports, first mappings) with one good and one bad run.
            async with Frontend.connect(path) as fe:
                await probe_and_serve(fe)
            await run_bad(path, CASES[0])
            await wait_idle(runner, 2)
            before = fd_count()
            n = 2
            for i in range(24):
                case = picked[i % len(picked)]
                await run_bad(path, case)
                n += 1
                await wait_idle(runner, n)
            # A bad conversation after a fully started device: rings, memory,
            # call/kick fds and the back-end channel are all held then.
            for _ in range(3):
                async with Frontend.connect(path) as fe:
                    await probe_and_serve(fe)
                    await fe.send_raw(msg(R.SET_VRING_NUM, vring_state(9, 256)))
                    await fe.expect_disconnect(timeout=5)
                n += 1
                await wait_idle(runner, n)
            assert fd_count() == before, "the back-end leaked fds"
            assert len(closing_lines(caplog)) == n - 1
            async with Frontend.connect(path) as fe:
                await probe_and_serve(fe)


# ------------------------------------------------------------------ hostile rings


@dataclass(frozen=True)
class Hostile:
    """Garbage a guest puts in a ring.  ``build`` writes it after a good
    chain was added; ``good_served`` says whether that earlier chain must
    still be completed (chains before the bad one are good)."""

    name: str
    build: Callable[[DriverQueue], None]
    error: str
    good_served: bool = True


def _buf(q: DriverQueue, size: int = 64) -> int:
    return q.memory.alloc(size, 16)


def loop(q: DriverQueue) -> None:
    b = _buf(q)
    q.write_desc(250, b, 64, DescFlag.WRITE | DescFlag.NEXT, 251)
    q.write_desc(251, b, 64, DescFlag.WRITE | DescFlag.NEXT, 250)
    q.push_avail(250)


def self_loop(q: DriverQueue) -> None:
    q.write_desc(250, _buf(q), 64, DescFlag.WRITE | DescFlag.NEXT, 250)
    q.push_avail(250)


def next_out_of_range(q: DriverQueue) -> None:
    q.write_desc(250, _buf(q), 64, DescFlag.WRITE | DescFlag.NEXT, 4000)
    q.push_avail(250)


def head_out_of_range(q: DriverQueue) -> None:
    q.push_avail(q.num + 3)


def addr_outside_memory(q: DriverQueue) -> None:
    q.add_segments([(0x7000_0000_0000, 64, True)])


def addr_wraps(q: DriverQueue) -> None:
    q.add_segments([(0xFFFF_FFFF_FFFF_FFC0, 0x100, True)])


def addr_into_hole(q: DriverQueue) -> None:
    # Region 0 ends at 0xa0000 (q35's hole follows): the buffer crosses it.
    q.add_segments([(0xA0000 - 32, 64, True)])


def len_huge(q: DriverQueue) -> None:
    q.add_segments([(_buf(q), 0xFFFF_FFFF, True)])


def readable_after_writable(q: DriverQueue) -> None:
    q.add_segments([(_buf(q), 64, True), (_buf(q), 64, False)])


def nested_indirect(q: DriverQueue) -> None:
    inner = q.memory.alloc(16, 16)
    q.memory.pack("<QIHH", inner, _buf(q), 64, DescFlag.WRITE, 0)
    outer = q.memory.alloc(16, 16)
    q.memory.pack("<QIHH", outer, inner, 16, DescFlag.INDIRECT, 0)
    q.write_desc(250, outer, 16, DescFlag.INDIRECT, 0)
    q.push_avail(250)


def indirect_loop(q: DriverQueue) -> None:
    t = q.memory.alloc(32, 16)
    b = _buf(q)
    q.memory.pack("<QIHH", t, b, 64, DescFlag.WRITE | DescFlag.NEXT, 1)
    q.memory.pack("<QIHH", t + 16, b, 64, DescFlag.WRITE | DescFlag.NEXT, 0)
    q.write_desc(250, t, 32, DescFlag.INDIRECT, 0)
    q.push_avail(250)


def indirect_bad_len(q: DriverQueue) -> None:
    t = q.memory.alloc(32, 16)
    q.memory.pack("<QIHH", t, _buf(q), 64, DescFlag.WRITE, 0)
    q.write_desc(250, t, 15, DescFlag.INDIRECT, 0)
    q.push_avail(250)


def indirect_table_outside(q: DriverQueue) -> None:
    q.write_desc(250, 0x7000_0000_0000, 32, DescFlag.INDIRECT, 0)
    q.push_avail(250)


def indirect_next_out_of_table(q: DriverQueue) -> None:
    t = q.memory.alloc(32, 16)
    q.memory.pack("<QIHH", t, _buf(q), 64, DescFlag.WRITE | DescFlag.NEXT, 7)
    q.write_desc(250, t, 16, DescFlag.INDIRECT, 0)
    q.push_avail(250)


def avail_idx_jump(q: DriverQueue) -> None:
    q.set_avail_idx(q.avail_idx + q.num + 5)


HOSTILE: list[Hostile] = [
    Hostile("desc-loop", loop, "VU_ERR_LOOP"),
    Hostile("desc-self-loop", self_loop, "VU_ERR_LOOP"),
    Hostile("next-out-of-range", next_out_of_range, "VU_ERR_NEXT"),
    Hostile("head-out-of-range", head_out_of_range, "VU_ERR_HEAD"),
    Hostile("addr-outside-memory", addr_outside_memory, "VU_ERR_DESC_ADDR"),
    Hostile("addr-wraps-2^64", addr_wraps, "VU_ERR_DESC_ADDR"),
    Hostile("addr-crosses-hole", addr_into_hole, "VU_ERR_DESC_ADDR"),
    Hostile("len-4GiB", len_huge, "VU_ERR_DESC_ADDR"),
    Hostile("readable-after-writable", readable_after_writable, "VU_ERR_ORDER"),
    Hostile("nested-indirect", nested_indirect, "VU_ERR_INDIRECT_NESTED"),
    Hostile("indirect-loop", indirect_loop, "VU_ERR_LOOP"),
    Hostile("indirect-len-15", indirect_bad_len, "VU_ERR_INDIRECT_LEN"),
    Hostile("indirect-table-outside", indirect_table_outside, "VU_ERR_INDIRECT_ADDR"),
    Hostile("indirect-next-beyond-table", indirect_next_out_of_table, "VU_ERR_NEXT"),
    Hostile("avail-idx-jump", avail_idx_jump, "VU_ERR_AVAIL_IDX", good_served=False),
]


async def serve_some(drv: Driver) -> int:
    q = drv.queue(0)
    added = submit_mixed(q)
    q.kick()
    check_rng_data(added, await q.wait_used(len(added), timeout=10))
    return len(added)


@pytest.mark.parametrize("ring_impl", ["native", "python"])
@pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
async def test_hostile_ring_marks_device_needs_reset(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, case: Hostile, ring_impl: str) -> None:
    caplog.set_level(logging.INFO, logger="vuser")
    path_a, path_b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    dev_a, dev_b = RngDevice(), RngDevice()
    with trio.fail_after(60):
        async with served(dev_a, path_a, ring_impl=ring_impl) as runner_a, \
                served(dev_b, path_b, ring_impl=ring_impl) as runner_b:
            async with Frontend.connect(path_a) as fe_a, Frontend.connect(path_b) as fe_b:
                drv_a, drv_b = Driver(fe_a), Driver(fe_b)
                await drv_a.probe()
                await drv_b.probe()
                served_b = await serve_some(drv_b)
                await serve_some(drv_a)

                # The other device keeps serving, concurrently, all along.
                rounds_b = 0
                stop_b = trio.Event()

                async def keep_b_busy() -> None:
                    nonlocal served_b, rounds_b
                    while not stop_b.is_set():
                        served_b += await serve_some(drv_b)
                        rounds_b += 1
                        await trio.sleep(0)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_b_busy)
                    await break_ring(drv_a, runner_a, case)
                    rounds_at_break = rounds_b
                    await wait_until(lambda: rounds_b >= rounds_at_break + 2, 10, "device B to keep serving")
                    stop_b.set()
                conn_a = runner_a.connection
                assert conn_a is not None
                conn_b = runner_b.connection
                assert conn_b is not None and runner_b.status()["ring_error"] is None
                assert not await fe_b.get_status() & STATUS_NEEDS_RESET
                assert await fe_a.get_status() & STATUS_NEEDS_RESET
                warnings = [r.getMessage() for r in caplog.records
                            if r.levelno == logging.WARNING and "ring error" in r.getMessage()]
                assert len(warnings) == 1, warnings

                # The driver resets the device and probes again: served again.
                await fe_a.stop()
                assert not await fe_a.get_status() & STATUS_NEEDS_RESET
                fe_a.vring_bases.clear()
                drv_a = Driver(fe_a)
                await drv_a.probe()
                assert runner_a.status()["ring_error"] is None
                n = await serve_some(drv_a)
                assert await fe_a.stop() == {0: n}
                assert await fe_b.stop() == {0: served_b}
            assert closing_lines(caplog) == []


async def break_ring(drv_a: Driver, runner_a: Runner, case: Hostile) -> None:
    """Put ``case``'s garbage in device A's ring after one good chain and
    check what the guest and the back-end see."""
    fe_a = drv_a.fe
    q = drv_a.queue(0)
    good = q.add_inbuf(64)
    case.build(q)
    q.kick(force=True)
    conn_a = runner_a.connection
    assert conn_a is not None
    await wait_until(lambda: runner_a.status()["ring_error"], 5, "the ring error")
    status = runner_a.status()
    assert status["needs_reset"] is True
    assert case.error in status["ring_error"], status["ring_error"]
    if case.good_served:
        (elem,) = await q.wait_used(1, timeout=5)
        assert elem.head == good and elem.length == 64

    # The connection is up and the driver can see the device
    # needs a reset (virtio 2.1.2).
    assert await fe_a.get_status() & STATUS_NEEDS_RESET
    assert await fe_a.get_features() == fe_a.backend_features
    # Nothing more is served from the broken ring.
    q.add_inbuf(64)
    q.kick(force=True)
    await trio.sleep(0.05)
    assert q.get_used() == []
    assert runner_a.status()["ring_error"] is not None
