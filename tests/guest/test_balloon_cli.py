"""The balloon through the command line, as a user runs it: `vuser run
balloon --control PATH` as a process, a QEMU 11 guest, `vuser ctl`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio

from vuser.testing.guest import boot_guest

MiB = 1 << 20


async def ctl(path: str, *args: str) -> dict:
    proc = await trio.run_process([sys.executable, "-m", "vuser.cli", "ctl", path, *args],
                                  capture_stdout=True, capture_stderr=True)
    return json.loads(proc.stdout)


@pytest.mark.guest
async def test_balloon_control_interface(tmp_path) -> None:
    sock, control = str(tmp_path / "b.sock"), str(tmp_path / "b.ctl")
    args = (await trio.run_process([sys.executable, "-m", "vuser.cli", "qemu-args", "balloon", "--socket", sock,
                                    "--qemu-version", "11"], capture_stdout=True)).stdout.decode().split()
    # boot_guest brings its own memory backend: keep the chardev and device.
    extra = []
    for i, a in enumerate(args):
        if a in ("-chardev", "-device"):
            extra += [a, args[i + 1]]
    log = open(tmp_path / "vuser.log", "wb")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "vuser.cli", "run", "balloon", "--socket", sock, "--control", control,
         "--stats-interval", "0.5"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with trio.fail_after(10):
            while not (tmp_path / "b.ctl").exists():
                await trio.sleep(0.05)
        async with boot_guest("11", "bookworm", memory_mb=512, extra_args=extra) as guest:
            status = await ctl(control, "status")
            assert status["connected"] and status["target"] == 0
            assert "VIRTIO_BALLOON_F_STATS_VQ" in status["negotiated_features"]
            assert [(q["index"], q["role"]) for q in status["queues"][:5]] == [
                (0, "inflateq"), (1, "deflateq"), (2, "statsq"), (3, "free_page_vq"), (4, "reporting_vq")]

            await ctl(control, "set-target", "64M")
            with trio.fail_after(60):
                while (status := await ctl(control, "status"))["actual"] < 64 * MiB:
                    await trio.sleep(0.2)
            assert status["target"] == 64 * MiB and status["bytes_released"] >= 64 * MiB
            stats = await ctl(control, "stats")
            assert stats["values"]["total-memory"] > 400 * MiB
            hint = await ctl(control, "hint", "start")
            assert hint["cmd_id"] >= 2
            await ctl(control, "hint", "stop")
            await ctl(control, "set-target", "0")
            with trio.fail_after(60):
                while (await ctl(control, "status"))["actual"] > 0:
                    await trio.sleep(0.2)
    finally:
        proc.terminate()
        with trio.fail_after(10):
            assert await proc.wait() == 0
        log.close()
    text = (tmp_path / "vuser.log").read_text()
    assert "negotiated features" in text and "target 16384 pages" in text
