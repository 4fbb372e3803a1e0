"""vuser as a separate process over a real socket: ``vuser run`` serving the
harness in server and client mode, ``vuser ctl`` on its control socket,
SIGTERM, ``vuser devices``, ``vuser qemu-args`` and DEBUG logs.

The ``vuser`` console script of the running interpreter is used (installed
by ``pip install -e .``); every process is killed if a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from conftest import check_rng_data, submit_mixed
from vuser.frontend import Driver, Frontend

SCRIPT = Path(sys.executable).parent / "vuser"
VUSER = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "vuser.cli"]
# Starting a Python process on a loaded 2-core machine can take seconds.
START_TIMEOUT = 30


def test_console_script_installed() -> None:
    assert SCRIPT.exists(), f"{SCRIPT} missing: run pip install -e ."


@asynccontextmanager
async def vuser_run(tmp_path: Path, *args: str, log_name: str = "vuser.log") -> AsyncIterator[trio.Process]:
    """``vuser [global args] run ...`` in the background; its stderr goes to
    ``tmp_path/log_name``.  Killed on the way out if still running."""
    log = open(tmp_path / log_name, "wb")
    proc = await trio.lowlevel.open_process([*VUSER, *args], stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, cwd=str(tmp_path))
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()
        log.close()


async def vuser_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(START_TIMEOUT):
        return await trio.run_process([*VUSER, *args], capture_stdout=True, capture_stderr=True,
                                      check=check, stdin=subprocess.DEVNULL)


async def ctl(control: Path, command: str, *args: str) -> Any:
    result = await vuser_cmd("ctl", str(control), command, *args)
    return json.loads(result.stdout)


async def terminate(proc: trio.Process, timeout: float = 10) -> int:
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(timeout):
        return await proc.wait()


async def serve_rng(fe: Frontend, rounds: int = 2) -> tuple[Driver, int]:
    drv = Driver(fe)
    await drv.probe()
    q = drv.queue(0)
    total = 0
    for _ in range(rounds):
        added = submit_mixed(q)
        q.kick()
        check_rng_data(added, await q.wait_used(len(added), timeout=10))
        total += len(added)
    return drv, total


@pytest.mark.parametrize("ring", ["native", "python"])
async def test_run_serves_harness_and_ctl_reports(tmp_path: Path, ring: str) -> None:
    sock, control = tmp_path / "rng.sock", tmp_path / "rng.ctl"
    with trio.fail_after(90):
        async with vuser_run(tmp_path, "run", "rng", "--socket", str(sock), "--control", str(control),
                             "--ring", ring) as proc:
            async with Frontend.connect(str(sock), connect_timeout=START_TIMEOUT) as fe:
                assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
                drv, total = await serve_rng(fe)
                st = await ctl(control, "status")
                assert st["device"] == "rng" and st["connected"] is True and st["mode"] == "server"
                names = st["negotiated_features"]
                assert {"VIRTIO_F_VERSION_1", "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_RING_F_INDIRECT_DESC"} <= set(names)
                assert "REPLY_ACK" in st["protocol_features"]
                (q0,) = st["queues"]
                assert q0["index"] == 0 and q0["role"] == "requestq" and q0["running"]
                assert q0["buffers"] == total
                assert st["device_status"]["bytes_served"] > 0
                assert st["device_status"]["requests"] == total
                assert st["ring_error"] is None
                assert await fe.stop() == {0: total}
            # The next front-end is served by the same process.
            async with Frontend.connect(str(sock), connect_timeout=START_TIMEOUT, personality="dpdk") as fe:
                await serve_rng(fe, rounds=1)
            st = await ctl(control, "status")
            assert st["connections"] == 2
            assert await terminate(proc) == 0
            assert not sock.exists() and not control.exists()


async def test_ctl_errors_are_reported(tmp_path: Path) -> None:
    sock, control = tmp_path / "rng.sock", tmp_path / "rng.ctl"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "run", "rng", "--socket", str(sock), "--control", str(control)) as proc:
            with trio.fail_after(START_TIMEOUT):
                while not control.exists():
                    await trio.sleep(0.05)
            st = await ctl(control, "status")
            assert st["connected"] is False and st["queues"] == [{"index": 0, "role": "requestq"}]
            bad = await vuser_cmd("ctl", str(control), "no-such-command", check=False)
            assert bad.returncode == 2 and b"no-such-command" in bad.stderr  # a user error
            assert await terminate(proc) == 0


async def test_sigterm_with_a_front_end_connected(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "run", "rng", "--socket", str(sock)) as proc:
            async with Frontend.connect(str(sock), connect_timeout=START_TIMEOUT) as fe:
                await serve_rng(fe, rounds=1)
                with trio.fail_after(5):  # promptly
                    assert await terminate(proc) == 0
                await fe.expect_disconnect(timeout=5)
            assert not sock.exists()
    log = (tmp_path / "vuser.log").read_text()
    assert "Traceback" not in log, log


async def test_client_mode_reconnects(tmp_path: Path) -> None:
    """``--client``: vuser connects to a listening front-end (QEMU's
    server=on) and connects again after that front-end goes away."""
    sock, control = tmp_path / "fe.sock", tmp_path / "rng.ctl"
    with trio.fail_after(90):
        async with vuser_run(tmp_path, "run", "rng", "--client", "--socket", str(sock),
                             "--control", str(control)) as proc:
            async with Frontend.listen(str(sock), accept_timeout=START_TIMEOUT) as fe:
                drv, total = await serve_rng(fe)
                st = await ctl(control, "status")
                assert st["mode"] == "client" and st["connected"] is True
                assert await fe.stop() == {0: total}
            # The front-end closed; a new one listens on the same path.
            async with Frontend.listen(str(sock), accept_timeout=20) as fe:
                await serve_rng(fe, rounds=1)
                st = await ctl(control, "status")
                assert st["connections"] == 2 and st["connected"] is True
            assert await terminate(proc) == 0
    assert "Traceback" not in (tmp_path / "vuser.log").read_text()


async def test_balloon_set_target_over_ctl_reaches_the_front_end(tmp_path: Path) -> None:
    sock, control = tmp_path / "b.sock", tmp_path / "b.ctl"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "run", "balloon", "--socket", str(sock), "--control", str(control),
                             "--stats-interval", "0") as proc:
            async with Frontend.connect(str(sock), connect_timeout=START_TIMEOUT, config_size=16) as fe:
                drv = Driver(fe, queues=[0, 1])
                await drv.probe()
                n = fe.config_changes
                st = await ctl(control, "set-target", "16M")
                assert st["target_pages"] == 4096
                await fe.wait_config_change(n, timeout=10)
                num_pages, actual = struct.unpack("<II", await drv.read_config(0, 8))
                assert num_pages == 4096
                await drv.write_config(4, struct.pack("<I", 4096))
                st = await ctl(control, "status")
                assert st["device_status"]["actual_pages"] == 4096
                assert [q["role"] for q in st["queues"]] == [
                    "inflateq", "deflateq", "statsq", "free_page_vq", "reporting_vq"]
            assert await terminate(proc) == 0


async def test_debug_log_decodes_requests_and_features(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "--log-level", "DEBUG", "run", "rng", "--socket", str(sock)) as proc:
            async with Frontend.connect(str(sock), connect_timeout=START_TIMEOUT) as fe:
                _, total = await serve_rng(fe, rounds=1)
                assert await fe.stop() == {0: total}
            assert await terminate(proc) == 0
    log = (tmp_path / "vuser.log").read_text()
    for request in ("GET_FEATURES", "SET_PROTOCOL_FEATURES", "SET_FEATURES", "SET_VRING_ADDR",
                    "SET_VRING_KICK", "GET_VRING_BASE", "SET_STATUS"):
        assert request in log, f"{request} missing from the DEBUG log"
    for feature in ("VIRTIO_F_VERSION_1", "VIRTIO_RING_F_EVENT_IDX", "REPLY_ACK"):
        assert feature in log, f"{feature} missing from the DEBUG log"
    assert " DEBUG " in log


async def test_devices_lists_rng_and_balloon() -> None:
    out = (await vuser_cmd("devices")).stdout.decode()
    assert "rng (virtio id 4)" in out and "balloon (virtio id 5)" in out
    assert "VIRTIO_BALLOON_F_REPORTING" in out and "VIRTIO_F_VERSION_1" in out
    infos = {d["name"]: d for d in json.loads((await vuser_cmd("devices", "--json")).stdout)}
    assert {"rng", "balloon"} <= set(infos)
    assert [f["name"] for f in infos["balloon"]["features"]][-1] == "VIRTIO_BALLOON_F_REPORTING"
    assert [q["role"] for q in infos["balloon"]["queues"]][-1] == "reporting_vq"
    assert infos["rng"]["queues"] == [{"index": 0, "role": "requestq"}]


async def test_qemu_args() -> None:
    out = (await vuser_cmd("qemu-args", "rng", "--socket", "/tmp/x.sock", "--qemu-version", "7.2")).stdout.decode()
    assert "vhost-user-rng-pci,chardev=vu0" in out
    assert "path=/tmp/x.sock" in out and "share=on" in out
    out = (await vuser_cmd("qemu-args", "rng", "--socket", "/tmp/x.sock")).stdout.decode()
    assert "vhost-user-test-device-pci" in out and "virtio-id=4" in out


async def test_run_unknown_device_fails_cleanly() -> None:
    result = await vuser_cmd("run", "no-such-device", "--socket", "/tmp/never.sock", check=False)
    assert result.returncode == 2
    assert b"no-such-device" in result.stderr and b"Traceback" not in result.stderr
