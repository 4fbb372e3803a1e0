"""vuser as a separate process over a real socket: ``vuser run`` serving the
harness in server and client mode, ``vuser ctl`` on its control socket,
SIGTERM, ``vuser devices``, ``vuser qemu-args`` and DEBUG logs.

The ``vuser`` console script of the running interpreter is used (installed
by ``pip install -e .``), through vuser.testing.process.VuserProcess: every
process is stopped if a test fails, and its log named.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import check_rng_data, submit_mixed
from vuser.frontend import Driver, Frontend
from vuser.testing.child import gone
from vuser.testing.process import START_TIMEOUT, VuserProcess, VuserProcessError, vuser_command

SCRIPT = Path(sys.executable).parent / "vuser"
VUSER = vuser_command()


def test_console_script_installed() -> None:
    assert SCRIPT.exists(), f"{SCRIPT} missing: run pip install -e ."


def vuser_run(tmp_path: Path, device: str, socket: Path, **options: Any) -> VuserProcess:
    """``vuser [global_args] run DEVICE --socket SOCKET ...`` in ``tmp_path``,
    logging to ``tmp_path/vuser.log``; entered once it is ready."""
    return VuserProcess(device, socket, log_path=tmp_path / "vuser.log", cwd=tmp_path, **options)


async def vuser_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(START_TIMEOUT):
        return await trio.run_process([*VUSER, *args], capture_stdout=True, capture_stderr=True,
                                      check=check, stdin=subprocess.DEVNULL)


async def ctl(control: Path, command: str, *args: str) -> Any:
    result = await vuser_cmd("ctl", str(control), command, *args)
    return json.loads(result.stdout)


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
        async with vuser_run(tmp_path, "rng", sock, control=control, args=["--ring", ring]) as vp:
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
            assert await vp.stop() == 0
            assert not sock.exists() and not control.exists()


async def test_ctl_errors_are_reported(tmp_path: Path) -> None:
    sock, control = tmp_path / "rng.sock", tmp_path / "rng.ctl"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "rng", sock, control=control) as vp:
            st = await ctl(control, "status")
            assert st["connected"] is False and st["queues"] == [{"index": 0, "role": "requestq"}]
            bad = await vuser_cmd("ctl", str(control), "no-such-command", check=False)
            assert bad.returncode == 2 and b"no-such-command" in bad.stderr  # a user error
            assert await vp.stop() == 0


async def test_sigterm_with_a_front_end_connected(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "rng", sock) as vp:
            async with Frontend.connect(str(sock), connect_timeout=START_TIMEOUT) as fe:
                await serve_rng(fe, rounds=1)
                with trio.fail_after(5):  # promptly
                    assert await vp.stop() == 0
                await fe.expect_disconnect(timeout=5)
            assert not sock.exists()
    log = (tmp_path / "vuser.log").read_text()
    assert "Traceback" not in log, log


async def test_client_mode_reconnects(tmp_path: Path) -> None:
    """``--client``: vuser connects to a listening front-end (QEMU's
    server=on) and connects again after that front-end goes away."""
    sock, control = tmp_path / "fe.sock", tmp_path / "rng.ctl"
    with trio.fail_after(90):
        async with vuser_run(tmp_path, "rng", sock, client=True, control=control) as vp:
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
            assert await vp.stop() == 0
    assert "Traceback" not in (tmp_path / "vuser.log").read_text()


async def test_balloon_set_target_over_ctl_reaches_the_front_end(tmp_path: Path) -> None:
    sock, control = tmp_path / "b.sock", tmp_path / "b.ctl"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "balloon", sock, control=control,
                             args=["--stats-interval", "0"]) as vp:
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
            assert await vp.stop() == 0


async def test_debug_log_decodes_requests_and_features(tmp_path: Path) -> None:
    sock = tmp_path / "rng.sock"
    with trio.fail_after(60):
        async with vuser_run(tmp_path, "rng", sock, global_args=["--log-level", "DEBUG"]) as vp:
            async with Frontend.connect(str(sock), connect_timeout=START_TIMEOUT) as fe:
                _, total = await serve_rng(fe, rounds=1)
                assert await fe.stop() == {0: total}
            assert await vp.stop() == 0
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


# ------------------------------------------------------------------ the VuserProcess helper itself

# A stand-in for `vuser run` that creates its --socket file and sleeps; the
# default SIGTERM action ends it with -15, which is not a clean exit.
FAKE = [sys.executable, "-c", "import sys, time; open(sys.argv[4], 'w'); time.sleep(60)"]


async def test_helper_reports_an_exit_before_ready(tmp_path: Path) -> None:
    vp = VuserProcess("no-such-device", tmp_path / "x.sock")
    with pytest.raises(VuserProcessError) as info:
        async with vp:
            raise AssertionError("entered")
    message = str(info.value)
    assert "exited with status 2 before it was ready" in message and "no-such-device" in message
    assert f"log {vp.log_path}:" in message and vp.log_path.is_file()   # named and kept
    shutil.rmtree(vp.log_path.parent)


async def test_helper_bounds_the_wait_for_ready(tmp_path: Path) -> None:
    vp = VuserProcess("rng", tmp_path / "x.sock", control=tmp_path / "x.ctl", command=FAKE,
                      start_timeout=1)
    with pytest.raises(VuserProcessError, match=r"was not ready within 1s \(waited for .*x.ctl"):
        async with vp:
            pass
    assert gone(vp.pid) and vp.log_path.is_file()
    shutil.rmtree(vp.log_path.parent)


async def test_helper_stops_the_process_when_the_body_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        async with VuserProcess("rng", tmp_path / "rng.sock") as vp:
            raise RuntimeError("the body failed")
    assert gone(vp.pid) and vp.returncode == 0
    assert str(vp.log_path) in "\n".join(info.value.__notes__) and vp.log_path.is_file()
    shutil.rmtree(vp.log_path.parent)


async def test_helper_stops_the_process_when_cancelled(tmp_path: Path) -> None:
    with trio.move_on_after(60) as scope:
        async with VuserProcess("rng", tmp_path / "rng.sock") as vp:
            scope.cancel()
            await trio.sleep(1)
    assert scope.cancelled_caught and gone(vp.pid) and vp.log_path.is_file()
    shutil.rmtree(vp.log_path.parent)


async def test_helper_fails_on_an_unclean_stop_and_keeps_the_log(tmp_path: Path) -> None:
    vp = VuserProcess("rng", tmp_path / "fake.sock", command=FAKE)
    with pytest.raises(VuserProcessError, match="exited with status -15 when asked to stop") as info:
        async with vp:
            pass
    assert gone(vp.pid) and str(vp.log_path) in str(info.value) and vp.log_path.is_file()
    shutil.rmtree(vp.log_path.parent)


async def test_helper_cleans_up_after_success(tmp_path: Path) -> None:
    async with VuserProcess("rng", tmp_path / "rng.sock", control=tmp_path / "rng.ctl") as vp:
        assert (await vp.status())["device"] == "rng"
        assert (await vp.ctl("status"))["connected"] is False
    assert gone(vp.pid) and vp.returncode == 0 and not vp.log_path.parent.exists()
