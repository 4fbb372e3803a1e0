"""``vuser probe`` against real third-party back-ends from Debian's
archive, each started by the probe (``--exec``): DPDK's testpmd
``net_vhost`` (net), qemu-storage-daemon's vhost-user-blk export and the C
virtiofsd of bookworm's qemu-system-common.

Each back-end's results must be exactly the ones docs/conformance.md
explains: the departures below fail (or crash), the checks that do not
apply skip, everything else passes.  A change in a back-end (or in the
probe) shows here first; then the findings document changes with it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vuser.testing import dpdk

pytestmark = pytest.mark.backends

# bookworm's qemu-system-common installs the C virtiofsd here (not on PATH).
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
QSD = shutil.which("qemu-storage-daemon")
NO_CONFIG = {"config/before-features": "skip", "config/offered-fields": "skip"}
VIRTIOFSD_EXITS = {f"hostile/{name}": "fail" for name in (
    "unknown-request", "huge-size", "mem-table-overflow", "vring-index", "kick-without-fd",
    "ring-outside-memory", "descriptor-loop", "avail-idx-jump")}

# Every result that is not a pass (docs/conformance.md says why).
EXPECTED = {
    "testpmd": {**NO_CONFIG, "memory/add-rem-mem-reg": "skip", "vring-base/packed": "fail"},
    "qemu-storage-daemon": {"vring-base/packed": "skip", "features/rewrite-and-zero": "fail",
                            "hostile/mem-table-overflow": "error", "hostile/vring-index": "error"},
    "virtiofsd": {**NO_CONFIG, "vring-base/packed": "skip", "features/rewrite-and-zero": "fail",
                  **VIRTIOFSD_EXITS},
}


def run_probe(device: str, command: list[str], tmp_path: Path) -> dict[str, Any]:
    log = tmp_path / "backend.log"
    run = subprocess.run([sys.executable, "-m", "vuser.cli", "probe", "--device", device, "--json",
                          "--exec", shlex.join(command), "--log", str(log)],
                         capture_output=True, text=True, timeout=900)
    out: dict[str, Any] = json.loads(run.stdout)
    table = "\n".join(f"{c['result']:5} {c['name']}: {c['detail']}" for c in out["checks"])
    print(f"vuser probe --device {device} --exec '{shlex.join(command)}'\n{table}\n{out['summary']}")
    assert run.returncode == (1 if out["summary"]["fail"] or out["summary"]["error"] else 0)
    return out


def check(name: str, out: dict[str, Any]) -> None:
    got = {c["name"]: c["result"] for c in out["checks"] if c["result"] != "pass"}
    assert got == EXPECTED[name], "\n".join(f"{c['result']} {c['name']}: {c['detail']}" for c in out["checks"])


@pytest.mark.skipif(not dpdk.available(), reason="dpdk-testpmd not installed (dpdk-dev)")
def test_testpmd_net_vhost(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    command = dpdk.testpmd_command("net_vhost0,iface={socket},queues=1", fwd="io", mbufs=8192,
                                   lcores=f"0@{cpu},1@{cpu}", file_prefix=f"vuser-probe-{os.getpid()}",
                                   args=["--auto-start"])
    out = run_probe("net", command, tmp_path)
    check("testpmd", out)
    frames = next(c for c in out["checks"] if c["name"] == "data/net-frames")
    assert "came back intact" in frames["detail"]   # io forwarding sends them back


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not installed (qemu-system-common)")
def test_qemu_storage_daemon_blk(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4096) + bytes(1 << 20))
    assert QSD is not None
    command = [QSD, "--blockdev", f"driver=file,node-name=disk,filename={image}",
               "--export", "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={socket},writable=on"]
    check("qemu-storage-daemon", run_probe("blk", command, tmp_path))


@pytest.mark.skipif(not Path(VIRTIOFSD).exists(), reason="virtiofsd not installed (qemu-system-common)")
def test_virtiofsd(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    command = [VIRTIOFSD, "--socket-path={socket}", "-o", f"source={shared}", "-o", "cache=none"]
    check("virtiofsd", run_probe("fs", command, tmp_path))
