"""The balloon through the command line, as a user runs it: `vuser run
balloon --control PATH` as a process, a QEMU 11 guest, `vuser ctl`."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import trio

from vuser.testing.guest import boot_guest
from vuser.testing.poll import wait_until
from vuser.testing.process import VuserProcess, vuser_command

MiB = 1 << 20


async def ctl(path: str, *args: str) -> dict:
    proc = await trio.run_process([*vuser_command(), "ctl", path, *args],
                                  capture_stdout=True, capture_stderr=True)
    return json.loads(proc.stdout)


async def status_when(path: str, condition: Callable[[dict[str, Any]], bool]) -> dict | None:
    """`vuser ctl PATH status` if ``condition`` holds for it, else None."""
    status = await ctl(path, "status")
    return status if condition(status) else None


@pytest.mark.guest
async def test_balloon_control_interface(tmp_path) -> None:
    sock, control = str(tmp_path / "b.sock"), str(tmp_path / "b.ctl")
    args = (await trio.run_process([*vuser_command(), "qemu-args", "balloon", "--socket", sock,
                                    "--qemu-version", "11"], capture_stdout=True)).stdout.decode().split()
    # boot_guest brings its own memory backend: keep the chardev and device.
    extra = []
    for i, a in enumerate(args):
        if a in ("-chardev", "-device"):
            extra += [a, args[i + 1]]
    async with VuserProcess("balloon", sock, control=control, args=["--stats-interval", "0.5"],
                            log_path=tmp_path / "vuser.log", start_timeout=10) as vp:
        async with boot_guest("11", "bookworm", memory_mb=512, extra_args=extra):
            status = await ctl(control, "status")
            assert status["connected"] and status["target"] == 0
            assert "VIRTIO_BALLOON_F_STATS_VQ" in status["negotiated_features"]
            assert [(q["index"], q["role"]) for q in status["queues"][:5]] == [
                (0, "inflateq"), (1, "deflateq"), (2, "statsq"), (3, "free_page_vq"), (4, "reporting_vq")]

            await ctl(control, "set-target", "64M")
            status = await wait_until(lambda: status_when(control, lambda st: st["actual"] >= 64 * MiB),
                                      60, "the balloon to inflate to 64 MiB", interval=0.2)
            assert status["target"] == 64 * MiB and status["bytes_released"] >= 64 * MiB
            stats = await ctl(control, "stats")
            assert stats["values"]["total-memory"] > 400 * MiB
            hint = await ctl(control, "hint", "start")
            assert hint["cmd_id"] >= 2
            await ctl(control, "hint", "stop")
            await ctl(control, "set-target", "0")
            await wait_until(lambda: status_when(control, lambda st: st["actual"] <= 0),
                             60, "the balloon to deflate", interval=0.2)
        with trio.fail_after(10):
            assert await vp.stop() == 0
    text = vp.log_text()
    assert "negotiated features" in text and "target 16384 pages" in text
