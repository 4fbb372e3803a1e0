"""The probe finds planted bugs: a balloon numbering its queues over the
negotiated features with a wrong GET_VRING_BASE, a back-end that crashes,
one that never answers, one that is not there.  A faithful control (the
same proxy, no bug) passes, so what is flagged is the bug."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from planted import planted_balloon
from vuser.probe.run import run_probe
from vuser.probe.target import ProbeTarget

HERE = Path(__file__).resolve().parent
CHECKS = ["handshake/qemu-11.1", "vring-base/split", "queue-layout"]


def results(report: object) -> dict[str, str]:
    return {c.name: c.result for c in report.checks}  # type: ignore[attr-defined]


async def test_planted_balloon_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "planted.sock"
    with trio.fail_after(120):
        async with planted_balloon(path):
            report = await run_probe(ProbeTarget(str(path)), "balloon", only=CHECKS)
    got = {c.name: c for c in report.checks}
    # The handshake is sound; the two planted bugs are what fails.
    assert results(report) == {"handshake/qemu-11.1": "pass", "vring-base/split": "fail",
                               "queue-layout": "fail"}, report.table()
    assert "GET_VRING_BASE of queue 1: 7, expected 5" in got["vring-base/split"].detail
    assert report.queue_policy == "negotiated"
    assert "numbers queues over the negotiated features" in got["queue-layout"].detail
    assert report.exit_code == 1


async def test_faithful_control_passes(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with trio.fail_after(120):
        async with planted_balloon(path, queue_policy="offered", base_error=0):
            report = await run_probe(ProbeTarget(str(path)), "balloon", only=CHECKS)
    assert results(report) == {name: "pass" for name in CHECKS}, report.table()
    assert report.queue_policy == "offered" and report.exit_code == 0


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vuser.cli", "probe", *args], capture_output=True,
                          text=True, timeout=120)


def test_crash_is_an_error() -> None:
    run = probe("--device", "rng", "--check", "handshake/qemu-11.1", "--check", "reconnect",
                "--exec", f"{sys.executable} {HERE / 'planted.py'} crash {{socket}}")
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 2 and all("killed by SIGSEGV" in line for line in lines), run.stdout


def test_silent_backend_is_bounded(tmp_path: Path) -> None:
    run = probe("--device", "rng", "--check", "handshake/qemu-11.1", "--timeout", "0.5",
                "--exec", f"{sys.executable} {HERE / 'planted.py'} silent {{socket}}")
    assert run.returncode == 1, run.stderr
    assert "FAIL   handshake/qemu-11.1  GET_FEATURES: no reply within 0.5s" in run.stdout, run.stdout


def test_nothing_listening_is_an_error(tmp_path: Path) -> None:
    run = probe("--device", "rng", "--check", "handshake/qemu-11.1", "--socket", str(tmp_path / "none.sock"))
    assert run.returncode == 1
    assert "ERROR  handshake/qemu-11.1  no back-end listening" in run.stdout, run.stdout
