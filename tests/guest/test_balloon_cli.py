"""The balloon through the command line, as a user runs it: `vuser run
balloon --control PATH` as a process (the vuser_guest fixture's default), a
QEMU 11 guest, and `vuser ctl` on that control socket."""

from __future__ import annotations

import json
from typing import Any, Callable

import trio

from vuser.testing.poll import wait_until
from vuser.testing.process import vuser_command

MiB = 1 << 20


async def ctl(path: str, *args: str) -> Any:
    proc = await trio.run_process([*vuser_command(), "ctl", path, *args],
                                  capture_stdout=True, capture_stderr=True)
    return json.loads(proc.stdout)


async def status_when(path: str, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """`vuser ctl PATH status` if ``condition`` holds for it, else None."""
    status = await ctl(path, "status")
    return status if condition(status) else None


async def test_balloon_control_interface(vuser_guest) -> None:
    async with vuser_guest("balloon --stats-interval 0.5", qemu="11", kernel="bookworm",
                           serve="process") as guest:
        balloon = guest.device("balloon")
        control = str(balloon.control)
        status = await ctl(control, "status")
        assert status["connected"] and status["target"] == 0
        assert "VIRTIO_BALLOON_F_STATS_VQ" in status["negotiated_features"]
        assert [(q["index"], q["role"]) for q in status["queues"][:5]] == [
            (0, "inflateq"), (1, "deflateq"), (2, "statsq"), (3, "free_page_vq"), (4, "reporting_vq")]
        # The fixture's status() is `vuser ctl PATH status`: the same object
        # (the fields that do not move while nothing happens).
        mine = await balloon.status()
        assert mine.keys() == status.keys()
        for key in ("device", "socket", "offered_features", "negotiated_features", "protocol_features",
                    "queue_policy", "target"):
            assert mine[key] == status[key], key

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
        log_path = balloon.log_path
    # Leaving stopped `vuser run balloon` with SIGTERM; a non-zero exit
    # would have failed the test there.
    text = log_path.read_text()
    assert "negotiated features" in text and "target 16384 pages" in text
