"""Balloon policies with real guests (QEMU 11's generic device, kernels 6.1
and sid), vuser as a process (the vuser_guest fixture's default), driven as
a user would: ``vuser run balloon --policy ...``, ``vuser ctl PATH
record``/``policy``.

* ``auto`` under a host-pressure limit (a meminfo file the test writes says
  the host is short) inflates the balloon in steps to its floor; then a
  memory-hungry program in the guest makes it deflate before the guest runs
  out of memory: no OOM kill, and with DEFLATE_ON_OOM the guest never has to
  take pages back by itself (``oom_deflated``), nor does it need to.
* A user policy from an entry point of an installed distribution drives
  the target, and a new one set over the control socket takes over.

Figures (inflate and deflate times, the guest's lowest available memory,
QEMU's shared RSS released) are printed for the closing note; bounds are
on behaviour, never on speed.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

from vuser.testing.distribution import write_distribution
from vuser.testing.guest import Guest
from vuser.testing.lab import GuestSession, Lab
from vuser.testing.poll import wait_until
from vuser.testing.pressure import HOG_DIR, hog_command, write_meminfo
from vuser.testing.qemu import qemu_rss
from vuser.testing.served import DeviceSpec, ServedDevice

MiB = 1 << 20
GiB = 1 << 30
GUEST_MB = 512
FLOOR = 128 * MiB
CEILING = GUEST_MB * MiB - FLOOR      # the balloon the floor allows
BIG = 320 * MiB                       # what auto must take at least (the guest's reserve stops it near the floor)
AUTO = "auto:interval=1,floor=128M,step=32M"
HOG_MIB = 240                         # far more than the guest has at the floor
# 4 MiB every HOG_PAUSE seconds: 8 MiB/s.  The policy sees the guest's
# stats every 1-2 s under TCG and the guest's reserve is about 18 MiB: at
# 16 MiB/s the hog ate the reserve between two looks and the guest's own
# OOM notifier deflated first (CI, bookworm, an idle machine).
HOG_PAUSE = 0.5
WAIT = 180.0                          # seconds for the guest to act under TCG on a loaded machine


def balloon_guest(vuser_guest: Lab, kernel: str, args: Sequence[str],
                  env: dict[str, str] | None = None) -> GuestSession:
    """``vuser run balloon ARGS`` as a process and a QEMU 11 guest attached
    as its plugin says (the options decide the queues)."""
    return vuser_guest(DeviceSpec(shlex.join(["balloon", *args]), env=env), qemu="11", kernel=kernel,
                       memory=f"{GUEST_MB}M", serve="process")


async def status_when(vp: ServedDevice, ok: Any) -> dict[str, Any] | None:
    status = await vp.status()
    return status if ok(status) else None


class Settled:
    """A predicate: the balloon holds its target and the policy has made no
    decision for ``rounds`` consultations (the status then, else None)."""

    def __init__(self, vp: ServedDevice, rounds: int = 3) -> None:
        self.vp, self.rounds = vp, rounds
        self.decisions, self.since = -1, 0

    async def __call__(self) -> dict[str, Any] | None:
        status = await self.vp.status()
        policy = status["policy"]
        if policy["decisions"] != self.decisions:
            self.decisions, self.since = policy["decisions"], policy["consulted"]
        quiet = policy["consulted"] - self.since >= self.rounds
        return status if quiet and self.decisions > 0 and status["actual"] == status["target"] else None


async def vmstat(guest: Guest) -> dict[str, int]:
    out = (await guest.check("cat /proc/vmstat")).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


async def mem_available(guest: Guest) -> int:
    return int((await guest.check("grep MemAvailable /proc/meminfo")).stdout.split()[1]) * 1024


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("deflate_on_oom", [True, False], ids=["deflate-on-oom", "no-deflate-on-oom"])
@pytest.mark.parametrize("kernel", ["bookworm", "sid"])
async def test_auto_inflates_under_host_pressure_and_deflates_before_oom(
        vuser_guest: Lab, kernel: str, deflate_on_oom: bool, tmp_path: Path) -> None:
    host = write_meminfo(tmp_path / "meminfo", 8 * GiB, 4 * GiB)      # plenty: nothing moves
    # Without page reporting, so the host memory released is the balloon's own.
    args = ["--policy", f"{AUTO},meminfo={host}", "--without", "REPORTING"]
    args += [] if deflate_on_oom else ["--without", "DEFLATE_ON_OOM"]
    record = tmp_path / "balloon.jsonl"
    async with balloon_guest(vuser_guest, kernel, args) as guest:
        vp = guest.device("balloon")
        await vp.ctl("record", str(record), "--interval", "0.5")
        await guest.check("dd if=/dev/zero of=/dev/shm/fill bs=1M count=200 2>/dev/null; rm /dev/shm/fill",
                          timeout=120)
        await wait_until(lambda: status_when(vp, lambda s: s["stats"]["updates"] >= 2), 60, "guest stats",
                         interval=0.5)
        assert (await vp.status())["target"] == 0
        rss_before = qemu_rss(guest.pid)["RssShmem"]

        # The host runs short: auto inflates, a step at a time, until the
        # floor or the guest's reserve stops it.
        write_meminfo(host, 8 * GiB, 400 * MiB)
        t0 = time.monotonic()
        full = await wait_until(Settled(vp), WAIT, "auto to stop inflating", interval=0.5)
        inflate_s = time.monotonic() - t0
        rss_after = qemu_rss(guest.pid)["RssShmem"]
        assert BIG <= full["target"] <= CEILING, full["policy"]
        assert 0 < full["policy"]["last"]["inputs"]["host"]["available"] < 0.2 * 8 * GiB

        # A hungry program: far more than the guest has left.
        before = await vmstat(guest)
        t0 = time.monotonic()
        hog = await guest.run(hog_command(HOG_MIB, pause=HOG_PAUSE), timeout=WAIT)
        hog_s = time.monotonic() - t0
        after = await vmstat(guest)
        status = await vp.status()
        await vp.ctl("record", "stop")
        print(f"\nkernel {kernel}, DEFLATE_ON_OOM {deflate_on_oom}: inflated to {full['target'] >> 20} MiB in "
              f"{inflate_s:.1f}s, QEMU RssShmem {rss_before >> 20} -> {rss_after >> 20} MiB; hog of "
              f"{HOG_MIB} MiB took {hog_s:.1f}s, balloon now {status['target'] >> 20} MiB")
        assert hog.exit_code == 0 and f"hog: {HOG_MIB} MiB" in hog.stdout, (hog.stdout, hog.stderr)
        assert after.get("oom_kill", 0) == before.get("oom_kill", 0), "the guest had to OOM-kill"
        assert status["oom_deflated_pages"] == 0, "the guest took pages back by itself (OOM notifier)"
        assert status["target"] <= full["target"] - (HOG_MIB - 80) * MiB
        # Inflating gave the host back what the guest had touched (the 200 MiB above).
        assert rss_before - rss_after >= 150 * MiB
        await guest.check(f"rm -f {HOG_DIR}/*")

    recorded = rows(record)
    decisions = [d for r in recorded for d in r["decisions"]]
    inflates = [d for d in decisions if d["action"] == "inflate"]
    deflates = [d for d in decisions if d["action"] == "deflate"]
    assert inflates and all(d["to"] - d["from"] <= 32 * MiB for d in inflates), "steps are bounded"
    assert deflates and all("guest short" in d["reason"] for d in deflates)
    assert max(r["target"] for r in recorded) <= CEILING    # never past the floor
    lowest = min(r["stats"].get("available-memory", GiB) for r in recorded if r["stats"])
    print(f"guest available memory at its lowest: {lowest >> 20} MiB; {len(inflates)} inflate and "
          f"{len(deflates)} deflate decisions")
    assert "balloon policy auto: inflate" in vp.log_path.read_text()


USER_POLICY = """\
def share(inputs):
    # A fixed share of the guest's RAM in the balloon, whatever the host says.
    return inputs.guest_ram * float(inputs.params.get("share", "0.25"))
"""


async def test_a_user_policy_from_an_entry_point_drives_the_target(vuser_guest: Lab, tmp_path: Path) -> None:
    pkg = write_distribution(tmp_path / "pkg", "sharepolicy", {"sharepolicy": USER_POLICY},
                             {"vuser.balloon_policies": {"share": "sharepolicy:share"}})
    env = {"PYTHONPATH": ":".join(filter(None, [str(pkg), os.environ.get("PYTHONPATH")]))}
    async with balloon_guest(vuser_guest, "sid", ["--policy", "share:interval=1"], env=env) as guest:
        vp = guest.device("balloon")
        quarter = GUEST_MB * MiB // 4
        await wait_until(lambda: status_when(vp, lambda s: s["actual"] == s["target"] == quarter), WAIT,
                         "the balloon at a quarter of RAM", interval=0.5)
        avail_quarter = await mem_available(guest)
        await vp.ctl("policy", "set", "share:interval=1,share=0.5")
        await wait_until(lambda: status_when(vp, lambda s: s["actual"] == s["target"] == 2 * quarter), WAIT,
                         "the balloon at half of RAM", interval=0.5)
        avail_half = await mem_available(guest)
        shown = await vp.ctl("policy", "show")
    # The guest sees the quarter of RAM go; the policy's decisions are logged.
    assert shown["name"] == "share" and shown["last"]["to"] == 2 * quarter
    assert avail_quarter - avail_half >= 0.9 * quarter
    log = vp.log_path.read_text()
    assert "balloon policy share: inflate 0 -> 128 MiB" in log and "inflate 128 -> 256 MiB" in log
