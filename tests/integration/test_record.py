"""Recorded time series and balloon policies through the command line:
``vuser ctl PATH record FILE [--interval S]`` / ``record stop`` / ``record``,
``sample``, ``stats --watch``, ``policy show|set|off``, with ``vuser run``
as a process and the front-end harness as the guest."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import trio

from vuser.control import ControlError
from vuser.frontend import Driver, Frontend
from vuser.testing.distribution import write_distribution
from vuser.testing.poll import wait_until
from vuser.testing.process import START_TIMEOUT, VuserProcess, vuser_command

MiB = 1 << 20


async def vuser_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(START_TIMEOUT):
        return await trio.run_process([*vuser_command(), *args], capture_stdout=True, capture_stderr=True,
                                      check=False, cwd=cwd, stdin=subprocess.DEVNULL)


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def balloon(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> VuserProcess:
    return VuserProcess("balloon", tmp_path / "b.sock", control=tmp_path / "b.ctl", args=args,
                        log_path=tmp_path / "vuser.log", env=env)


async def test_record_writes_rows_until_stopped(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with balloon(tmp_path, "--target", "16M") as vp:
            ctl = str(vp.control)
            # A relative FILE is the user's: vuser ctl makes it absolute.
            started = await vuser_cli("ctl", ctl, "record", "rec.jsonl", "--interval", "0.1", cwd=tmp_path)
            assert started.returncode == 0, started.stderr
            assert json.loads(started.stdout)["file"] == str(tmp_path / "rec.jsonl")
            await wait_until(lambda: len(rows(tmp_path / "rec.jsonl")) >= 3, 20, "three rows", interval=0.1)
            state = await vp.ctl("record")
            assert state["recording"] and state["interval"] == 0.1
            stopped = await vuser_cli("ctl", ctl, "record", "stop")
            assert json.loads(stopped.stdout)["recording"] is False
            written = rows(tmp_path / "rec.jsonl")
            await trio.sleep(0.3)
            assert rows(tmp_path / "rec.jsonl") == written     # nothing after stop
            assert (await vp.ctl("record"))["last"]["rows"] == len(written)
    assert all(r["device"] == "balloon" and r["target"] == 16 * MiB and r["connected"] is False for r in written)
    times = [r["time"] for r in written]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert (tmp_path / "rec.jsonl").stat().st_mode & 0o777 == 0o600


async def test_record_refuses_what_it_cannot_write_and_keeps_serving(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "link.jsonl").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    with trio.fail_after(60):
        async with balloon(tmp_path) as vp:
            ctl = str(vp.control)
            for args in (["link.jsonl"], ["fifo"], ["/no/such/dir/x"], ["a", "--interval", "0"],
                         ["a", "--interval", "soon"], ["a", "--colour"], ["a", "b"], ["a", "--interval"]):
                result = await vuser_cli("ctl", ctl, "record", *args, cwd=tmp_path)
                assert result.returncode == 2, (args, result)
                assert b"Traceback" not in result.stderr
            assert victim.read_text() == "precious"
            try:
                await vp.ctl("record", "relative.jsonl")   # vuser itself never guesses a directory
            except ControlError as exc:
                assert exc.usage and "absolute" in str(exc)
            else:
                raise AssertionError("a relative path was accepted")
            assert (await vp.ctl("record", str(tmp_path / "one.jsonl")))["recording"]
            again = await vuser_cli("ctl", ctl, "record", str(tmp_path / "two.jsonl"))
            assert again.returncode == 2 and b"already recording" in again.stderr
            assert (await vp.status())["device"] == "balloon"
            assert await vp.stop() == 0
    # Stopping vuser ends the recording with whole lines only.
    assert rows(tmp_path / "one.jsonl")


async def test_stats_watch_prints_rows_live(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with balloon(tmp_path) as vp:
            result = await vuser_cli("ctl", str(vp.control), "stats", "--watch", "--count", "3",
                                     "--interval", "0.1")
            assert result.returncode == 0, result.stderr
            lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
            assert len(lines) == 3 and all(r["device"] == "balloon" and "target" in r for r in lines)
            plain = await vuser_cli("ctl", str(vp.control), "stats")   # without --watch: the guest's stats
            assert set(json.loads(plain.stdout)) >= {"values", "interval"}
            bad = await vuser_cli("ctl", str(vp.control), "stats", "--watch", "--interval", "-1")
            assert bad.returncode == 2 and b"Traceback" not in bad.stderr


async def test_net_rows_carry_every_port(tmp_path: Path) -> None:
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    with trio.fail_after(60):
        async with VuserProcess("net", socks, control=tmp_path / "n.ctl", log_path=tmp_path / "vuser.log") as vp:
            row = await vp.ctl("sample")
            result = await vuser_cli("ctl", str(vp.control), "stats", "--watch", "--count", "2", "--interval", "0.1")
    assert row["device"] == "net" and [p["port"] for p in row["ports"]] == [0, 1]
    assert {"rx_packets", "tx_packets", "drops", "dropped"} <= set(row["ports"][0])
    assert len(result.stdout.decode().splitlines()) == 2


USER_POLICY = """\
def quarter(inputs):
    return inputs.guest_ram // 4

def negative(inputs):
    return -1
"""


async def test_a_user_policy_drives_the_target_and_nonsense_switches_it_off(tmp_path: Path) -> None:
    """An entry point of an installed distribution, named on the command
    line: the front-end sees the target it answers; a policy that answers
    nonsense is switched off and the device keeps serving."""
    pkg = write_distribution(tmp_path / "pkg", "mypolicies", {"mypolicies": USER_POLICY},
                             {"vuser.balloon_policies": {"quarter": "mypolicies:quarter",
                                                         "negative": "mypolicies:negative"}})
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    with trio.fail_after(60):
        async with balloon(tmp_path, "--policy", "quarter:interval=0.2", env=env) as vp:
            async with Frontend.connect(str(vp.sockets[0]), connect_timeout=START_TIMEOUT, config_size=16,
                                        memory_mb=64) as fe:
                drv = Driver(fe, queues=[0, 1])
                n = fe.config_changes
                await drv.probe()
                await fe.wait_config_change(n, timeout=20)
                num_pages, _ = struct.unpack("<II", await drv.read_config(0, 8))
                shown = await vp.ctl("policy", "show")
                ram = shown["last"]["inputs"]["guest_ram"]   # the memory table the harness sent
                assert 60 * MiB <= ram <= 64 * MiB
                assert shown["on"] and shown["name"] == "quarter"
                assert num_pages * 4096 == shown["last"]["to"] == ram // 4 // 4096 * 4096

                await vp.ctl("policy", "set", "negative:interval=0.2")
                await wait_until(lambda: _policy_off(vp), 20, "the policy switched off", interval=0.1)
                status = await vp.status()
                assert status["target"] == num_pages * 4096 and "not a size" in status["policy"]["switched_off"]
                await vp.ctl("set-target", "8M")            # still serving
                assert (await vp.ctl("policy", "off"))["on"] is False
                for bad in (["policy"], ["policy", "set"], ["policy", "show", "x"], ["policy", "set", "nope"],
                            ["policy", "on"]):
                    result = await vuser_cli("ctl", str(vp.control), *bad)
                    assert result.returncode == 2 and b"Traceback" not in result.stderr, bad
            assert await vp.stop() == 0
    log = vp.log_text()
    assert "balloon policy quarter: inflate 0 -> 15 MiB" in log and "switched off" in log


async def _policy_off(vp: VuserProcess) -> bool:
    return (await vp.ctl("policy", "show"))["on"] is False
