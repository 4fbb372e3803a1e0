"""``vuser probe`` against vuser's own devices, each started by the probe
(``--exec``) as a separate ``vuser run`` process: every check passes or is
skipped for a stated reason, and the JSON is the contract.  Also the
client mode (``--listen``)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from vuser.testing.process import vuser_command

VUSER = " ".join(vuser_command())
# What does not apply, and why: rng has no config space; net leaves the
# config space to QEMU and does not offer CONFIGURE_MEM_SLOTS (devices/net/device.py).
SKIPS = {
    "rng": {"config/before-features", "config/offered-fields"},
    "balloon": set(),
    "net": {"config/before-features", "config/offered-fields", "memory/add-rem-mem-reg"},
}
RUN_ARGS = {"rng": "", "balloon": "", "net": " --reflect"}


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vuser.cli", "probe", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("device", ["rng", "balloon", "net"])
def test_vuser_passes_every_check(device: str) -> None:
    command = f"{VUSER} run {device} --socket {{socket}}{RUN_ARGS[device]}"
    run = probe("--device", device, "--exec", command, "--json")
    out: dict[str, Any] = json.loads(run.stdout)
    table = "\n".join(f"{c['result']:5} {c['name']}: {c['detail']}" for c in out["checks"])
    print(f"vuser probe --device {device} --exec '{command}'\n{table}\n{out['summary']}")
    assert run.returncode == 0, table
    assert set(out) == {"device", "checks", "summary"} | ({"queue_policy"} if device == "balloon" else set())
    assert all(set(c) == {"name", "result", "detail"} for c in out["checks"])
    skipped = {c["name"] for c in out["checks"] if c["result"] == "skip"}
    assert skipped == SKIPS[device], table
    assert out["summary"] == {"pass": len(out["checks"]) - len(skipped), "fail": 0, "skip": len(skipped), "error": 0}
    if device == "balloon":
        assert out["queue_policy"] == "offered"


def test_client_mode_backend(tmp_path: Any) -> None:
    """--listen: the probe listens, vuser connects (and reconnects after
    each check, as under QEMU's server=on)."""
    sock = tmp_path / "listen.sock"
    run = probe("--device", "rng", "--listen", "--socket", str(sock),
                "--exec", f"{VUSER} run rng --client --socket {{socket}}",
                "--check", "handshake/qemu-11.1", "--check", "reconnect", "--check", "hostile/short-payload")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("PASS") == 3, run.stdout
