"""One connection is one fault domain (issue 9).

Each hostile case runs against one ``vuser run net`` process with three
ports: the attacker on port A, and two well-behaved harness guests on B and
C that keep exchanging frames the whole time.  After each case: the process
is alive, B and C kept moving frames, A's socket serves the next front-end,
the back-end logged one line naming the request and the fault, and the
process holds no more fds than before the attack.
"""

from __future__ import annotations

import os
import socket
import struct
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest
import trio

from vuser import wire
from vuser.frontend import Frontend, GuestRam
from vuser.frontend.netdriver import BCAST, eth, net_frontend, net_probe
from vuser.testing.poll import wait_until
from vuser.testing.process import VuserProcess
from vuser.wire import Request as R

MAC_B = bytes.fromhex("020000000002")
MAC_C = bytes.fromhex("020000000003")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Traffic:
    """B floods frames that C receives, continuously."""

    def __init__(self) -> None:
        self.received = 0

    async def run(self, path_b: str, path_c: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with net_frontend(path_b) as fb, net_frontend(path_c) as fc:
            b, c = await net_probe(fb), await net_probe(fc)
            c.fill_rx(count=64)
            task_status.started()
            n = 0
            while True:
                b.send(eth(BCAST, MAC_B, struct.pack("!I", n) + bytes(60)))
                await b.wait_sent(1)
                await c.recv(1)
                self.received += 1
                n += 1
                c.fill_rx(count=1)
                await trio.sleep(0.002)

    async def moving(self, frames: int = 20, timeout: float = 10) -> None:
        start = self.received
        await wait_until(lambda: self.received >= start + frames, timeout, f"{frames} more frames B -> C")


@asynccontextmanager
async def switch(tmp_path: Path) -> AsyncIterator[tuple[VuserProcess, list[str], Traffic]]:
    paths = [str(tmp_path / f"{p}.sock") for p in "abc"]
    async with VuserProcess("net", paths, control=tmp_path / "ctl", args=["--queue-pairs", "1"],
                            log_path=tmp_path / "vuser.log") as vp:
        traffic = Traffic()
        async with trio.open_nursery() as nursery:
            await nursery.start(traffic.run, paths[1], paths[2])
            await traffic.moving()
            yield vp, paths, traffic
            nursery.cancel_scope.cancel()


async def port_a_tx(vp: VuserProcess) -> int:
    return int((await vp.status())["device_status"]["ports"][0]["tx_packets"])


async def served_after(vp: VuserProcess, path: str, fds_before: int) -> None:
    """The attacked socket serves the next front-end (the switch takes its
    frame); afterwards the process holds no more fds than before."""
    before = await port_a_tx(vp)
    async with net_frontend(path) as fa:
        a = await net_probe(fa)
        a.send(eth(BCAST, bytes.fromhex("020000000001"), b"hello" * 12))
        await a.wait_sent(1)
        assert await port_a_tx(vp) == before + 1
        assert (await vp.status())["sockets"][0]["connected"]
    assert vp.returncode is None

    async def fds_back() -> bool:
        return fd_count(vp.pid) <= fds_before
    await wait_until(fds_back, 5, f"the back-end to close what the attacker sent (fds before: {fds_before})")


def closing_line(vp: VuserProcess, *needles: str) -> str:
    """The one log line that closed the attacker's connection."""
    lines = [line for line in vp.log_text().splitlines() if "closing connection" in line]
    found = [line for line in lines if all(n in line for n in needles)]
    assert len(found) == 1 and len(lines) == 1, (needles, lines[-5:])
    return found[0]


# ------------------------------------------------------------------ hostile fds

def o_path_fd() -> int:
    return os.open("/", os.O_PATH | os.O_CLOEXEC)


def memfd() -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    return fd


def pipe_reader_gone() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def udp_socket() -> int:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()


def socketpair_end() -> int:
    a, b = socket.socketpair()
    b.close()
    return a.detach()


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def msg(req: int, payload: bytes, flags: int = 0) -> bytes:
    return wire.encode_header(req, flags, len(payload)) + payload


FD_CASES: list[tuple[str, R, Callable[[], int], str]] = [
    ("O_PATH kick fd as the first message", R.SET_VRING_KICK, o_path_fd, "O_PATH"),
    ("memfd kick fd", R.SET_VRING_KICK, memfd, "a memfd, not an eventfd"),
    ("UDP socket kick fd", R.SET_VRING_KICK, udp_socket, "a socket, not an eventfd"),
    ("socketpair end kick fd", R.SET_VRING_KICK, socketpair_end, "a socket, not an eventfd"),
    ("pipe without reader kick fd", R.SET_VRING_KICK, pipe_reader_gone, "a pipe, not an eventfd"),
    ("pipe without reader call fd", R.SET_VRING_CALL, pipe_reader_gone, "a pipe, not an eventfd"),
    ("O_PATH err fd", R.SET_VRING_ERR, o_path_fd, "O_PATH"),
    ("memfd back-end channel", R.SET_BACKEND_REQ_FD, memfd, "a memfd, not a socket"),
    ("UDP back-end channel", R.SET_BACKEND_REQ_FD, udp_socket, "not a unix stream socket"),
    ("O_PATH memory region", R.SET_MEM_TABLE, o_path_fd, "O_PATH"),
    ("eventfd memory region", R.SET_MEM_TABLE, eventfd, "an eventfd, not a file"),
]


async def send_hostile(path: str, req: int, make_fd: Callable[[], int]) -> None:
    """The message carrying the wrong fd, as the first thing on the socket
    (SET_BACKEND_REQ_FD needs the protocol feature negotiated first)."""
    fd = make_fd()
    try:
        handshake = req == R.SET_BACKEND_REQ_FD
        async with Frontend.connect(path, handshake=False, num_queues=2) as fe:
            if handshake:
                await fe.get_features()
                await fe.get_protocol_features()
                await fe.set_protocol_features(1 << wire.ProtocolFeature.BACKEND_REQ)
            if req == R.SET_MEM_TABLE:
                payload = struct.pack("=IIQQQQ", 1, 0, 0, 1 << 20, 0x7F0000000000, 0)
            elif req == R.SET_BACKEND_REQ_FD:
                payload = b""
            else:
                payload = struct.pack("=Q", 0)
            await fe.send_raw(msg(req, payload), [fd])
            await fe.expect_disconnect(5)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name, req, make_fd, fault", FD_CASES, ids=[c[0] for c in FD_CASES])
async def test_wrong_kind_of_fd_closes_that_connection_only(tmp_path: Path, name: str, req: R,
                                                           make_fd: Callable[[], int], fault: str) -> None:
    with trio.fail_after(60):
        async with switch(tmp_path) as (vp, paths, traffic):
            fds = fd_count(vp.pid)
            await send_hostile(paths[0], req, make_fd)
            line = closing_line(vp, req.name, fault)
            assert "Traceback" not in vp.log_text()
            await traffic.moving()
            await served_after(vp, paths[0], fds)
            print(f"{name}: {line.split('closing connection: ', 1)[1]}")


# ------------------------------------------------------------------ memory that shrinks

@pytest.mark.parametrize("sealable", [False, True], ids=["unsealable", "sealable"])
async def test_truncated_guest_memory(tmp_path: Path, sealable: bool) -> None:
    """The front-end truncates its memory after SET_MEM_TABLE.  A memfd
    that allows seals was sealed against shrinking by vuser (the truncate
    fails); one that does not (like a tmpfs or hugetlbfs file) faults at
    the next access, which the SIGBUS guard turns into a closed connection."""
    with trio.fail_after(60):
        async with switch(tmp_path) as (vp, paths, traffic):
            fds = fd_count(vp.pid)
            ram = GuestRam.create(16 << 20, regions=1, sealable=sealable)
            async with net_frontend(paths[0], memory=ram) as fa:
                a = await net_probe(fa)
                a.fill_rx(count=8)
                fd = ram.regions[0].fd
                if sealable:
                    with pytest.raises(PermissionError):
                        os.ftruncate(fd, 0)
                    a.send(eth(BCAST, bytes.fromhex("020000000001"), bytes(50)))
                    await a.wait_sent(1)
                else:
                    os.ftruncate(fd, 0)
                    # Kick A's tx ring (the harness must not touch its RAM now):
                    # vuser reads the ring, B's floods are delivered into A's.
                    fa.queues[1].notify()
                    await fa.expect_disconnect(10)
                    closing_line(vp, "guest memory faulted")
            await traffic.moving()
            assert vp.returncode is None
            await served_after(vp, paths[0], fds)


# ------------------------------------------------------------------ the control socket

async def test_control_socket_deep_json(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with switch(tmp_path) as (vp, paths, traffic):
            assert vp.control is not None
            stream = await trio.open_unix_socket(str(vp.control))
            async with stream:
                await stream.send_all(b"[" * 50_000 + b"\n")
                answer = await stream.receive_some(4096)
            assert b'"ok": false' in answer and b"RecursionError" in answer
            # A request that never ends is cut off; silent clients do not pile up.
            stream = await trio.open_unix_socket(str(vp.control))
            async with stream:
                await stream.send_all(b"x" * (70 * 1024))
                assert b"too long" in await stream.receive_some(4096)
            await traffic.moving()
            assert (await vp.status())["sockets"][1]["connected"]

