"""Files and sockets a local user could turn against vuser (issue 9): a
pcap path that is a symlink, a socket path another vuser serves, a
socket path replaced while vuser runs, a client-mode front-end of another
uid."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from conftest import probe_and_serve
from vuser.frontend import Frontend
from vuser.testing.poll import wait_until
from vuser.testing.process import VuserProcess, vuser_command

NOBODY = 65534


async def vuser_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([*vuser_command(), *args], capture_stdout=True, capture_stderr=True,
                                  check=False)


async def test_pcap_never_follows_a_symlink_and_is_private(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    link = tmp_path / "trap.pcap"
    link.symlink_to(target)
    result = await vuser_cli("run", "net", "--socket", str(tmp_path / "n.sock"), "--pcap", str(link))
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert str(link).encode() in result.stderr
    assert target.read_bytes() == b"precious"

    pcap = tmp_path / "ok.pcap"
    async with VuserProcess("net", tmp_path / "n.sock", args=["--pcap", str(pcap)]):
        assert stat.S_IMODE(pcap.stat().st_mode) == 0o600


async def test_a_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    async with VuserProcess("rng", sock, control=tmp_path / "ctl") as first:
        result = await vuser_cli("run", "rng", "--socket", str(sock))
        assert result.returncode == 2
        assert b"another process is listening there" in result.stderr
        async with Frontend.connect(str(sock)) as fe:   # the first one still serves
            await probe_and_serve(fe)
        assert first.returncode is None


async def test_exit_leaves_a_replaced_socket_path_alone(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    async with VuserProcess("rng", sock) as vp:
        os.unlink(sock)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(sock))                         # someone else's now
        assert await vp.stop() == 0
    assert sock.exists()
    other.close()
    # A stale socket (nobody listening) is replaced.
    async with VuserProcess("rng", sock):
        async with Frontend.connect(str(sock)) as fe:
            await probe_and_serve(fe)
    assert not sock.exists()


def listen_as(uid: int, path: Path) -> socket.socket:
    """A listening socket whose credentials (SO_PEERCRED: those in effect
    at listen()) are ``uid``'s."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.seteuid(uid)
    try:
        sock.bind(str(path))
        sock.listen(1)
    finally:
        os.seteuid(0)
    return sock


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to listen as another uid")
@pytest.mark.parametrize("allowed", [False, True])
async def test_client_mode_checks_the_front_ends_uid(allowed: bool) -> None:
    """A socket a front-end listens on can be created by anyone who can
    write the folder: vuser --client serves only its own uid (and root)
    unless --allow-peer-uid says otherwise."""
    folder = Path(tempfile.mkdtemp(prefix="vuser-peer-"))
    try:
        folder.chmod(0o777)
        sock = folder / "fe.sock"
        listener = trio.socket.from_stdlib_socket(listen_as(NOBODY, sock))
        args = ["--allow-peer-uid", str(NOBODY)] if allowed else []
        with listener, trio.fail_after(30):
            async with VuserProcess("rng", sock, client=True, args=args,
                                    log_path=folder / "vuser.log") as vp:
                conn, _ = await listener.accept()
                with conn:
                    if allowed:
                        async with Frontend.over_socket(conn) as fe:
                            await probe_and_serve(fe)
                    else:
                        assert await conn.recv(1) == b""   # vuser hung up
                        await wait_until(lambda: "uid 65534" in vp.log_text(), 10, "the refusal")
                        assert "not served" in vp.log_text()
    finally:
        shutil.rmtree(folder)
