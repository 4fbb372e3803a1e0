#!/usr/bin/env python3
"""The demo driver behind scripts/demo (which provisions and installs first).

Each section starts vuser devices the way a user would, as separate
processes (``vuser run DEVICE --socket S --control C``), asks ``vuser
qemu-args`` how to attach them, boots a real guest with
vuser.testing.boot_guest and shows the device working from inside the guest,
with vuser's own numbers from ``vuser ctl``.

    scripts/demo.py [--keep] [--only SECTION ...]

Sections:
  rng-7.2    rng on QEMU 7.2 (vhost-user-rng-pci), bookworm kernel: the guest
             reads 1 MiB from /dev/hwrng
  qemu-11    rng and balloon together on QEMU 11 (generic
             vhost-user-test-device-pci), sid kernel: 1 MiB of entropy, then
             the balloon inflated to 128 MiB and deflated, with the guest's
             MemFree and QEMU's RssShmem (the balloon runs without free page
             reporting here, so the memory the guest freed stays resident
             until the balloon takes it)
  reporting  the balloon with free page reporting: memory the guest frees
             leaves QEMU's RSS by itself
  net        two guests on QEMU 7.2 (bookworm and sid kernels) on two sockets
             of one `vuser run net`: ping round trips both ways, then 16 MiB
             sent with nc, its throughput and the md5 sums on both sides
Exit status 0 when every section that ran worked, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from vuser.testing import Guest, boot_guest, kernel_info, qemu_info, qemu_rss
from vuser.testing.poll import PollTimeout, wait_until
from vuser.testing.process import VuserProcess, VuserProcessError, vuser_command

MiB = 1 << 20
RNG_READ = 1 * MiB
NET_GUEST_MB = 256
NET_TRANSFER_MB = 16
NET_PINGS = 10
GUEST_MEMORY_MB = 512
BALLOON_TARGET = "128M"
TOUCH_MB = 200
BALLOON_WAIT = 90.0        # seconds for the guest to reach a balloon target (TCG)
DEVICE_START_WAIT = 15.0   # seconds for `vuser run` to open its control socket
DEVICE_STOP_WAIT = 5.0     # seconds for `vuser run` to exit on SIGTERM, before SIGKILL


class DemoError(Exception):
    """A section failed; the message says what, for the user.  ``row``: the
    summary row that failed (default: the section's own)."""

    def __init__(self, message: str, row: str | None = None) -> None:
        super().__init__(message)
        self.row = row


# ---------------------------------------------------------------- output

T0 = time.monotonic()


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"  [{time.monotonic() - T0:5.1f}s] {text}")


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def signed_mib(n: float) -> str:
    return f"{n / MiB:+.1f} MiB"


# ---------------------------------------------------------------- vuser, the command

VUSER = vuser_command()


class Workdir:
    """The demo's temporary directory; paths are shown relative to it as $DEMO."""

    def __init__(self, keep: bool) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="vuser-demo-"))
        self.keep = keep

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def show(self, args: list[str]) -> str:
        text = shlex.join(["vuser", *args])
        return text.replace(str(self.path), "$DEMO")


async def vuser(work: Workdir, *args: str, show: bool = True) -> str:
    """Run a ``vuser`` command to completion; its stdout."""
    if show:
        step("$ " + work.show(list(args)))
    proc = await trio.run_process([*VUSER, *args], capture_stdout=True, capture_stderr=True,
                                  check=False)
    if proc.returncode != 0:
        raise DemoError(f"`{work.show(list(args))}` failed with status {proc.returncode}:\n"
                        f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode()


async def vuser_ctl(work: Workdir, dev: VuserProcess, *args: str, show: bool = True) -> Any:
    """``vuser ctl`` on ``dev``'s control socket, as a user types it."""
    return json.loads(await vuser(work, "ctl", str(dev.control), *args, show=show))


# ---------------------------------------------------------------- device processes

async def qemu_args(work: Workdir, dev: VuserProcess, qemu_version: str, chardev_id: str) -> list[str]:
    """``vuser qemu-args`` for ``dev`` minus its guest-memory arguments:
    boot_guest already gives QEMU the shared memfd backend, and QEMU takes
    only one."""
    out = await vuser(work, "qemu-args", dev.device, "--socket", str(dev.sockets[0]),
                      "--qemu-version", qemu_version, "--chardev-id", chardev_id,
                      "--memory", f"{GUEST_MEMORY_MB}M", *dev.args)
    return strip_memory_args(shlex.split(out))


def strip_memory_args(args: list[str]) -> list[str]:
    """Drop ``-object memory-backend-*``, ``-machine`` and ``-m`` (with their values)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        value = args[i + 1] if i + 1 < len(args) else ""
        if (a == "-object" and value.startswith("memory-backend-")) or a in ("-machine", "-m"):
            i += 2
            continue
        out.append(a)
        i += 1
    return out


class Devices:
    """Device processes of one section (``vuser run DEVICE --socket
    $DEMO/LABEL.sock --control $DEMO/LABEL.ctl``, logs in $DEMO/LABEL.log):
    always stopped on the way out, and a bad exit status or an ERROR in a
    log fails the section."""

    def __init__(self, work: Workdir) -> None:
        self.work = work
        self.procs: list[tuple[str, VuserProcess]] = []
        self._stack = AsyncExitStack()

    async def start(self, name: str, label: str, *extra: str,
                    more_sockets: tuple[Path, ...] = ()) -> VuserProcess:
        dev = VuserProcess(name, [self.work / f"{label}.sock", *more_sockets],
                           control=self.work / f"{label}.ctl", args=extra,
                           log_path=self.work / f"{label}.log", start_timeout=DEVICE_START_WAIT,
                           stop_timeout=DEVICE_STOP_WAIT)
        step(f"$ {self.work.show(dev.run_args)} 2> $DEMO/{dev.log_path.name} &")
        try:
            await self._stack.enter_async_context(dev)
        except VuserProcessError as exc:
            raise DemoError(str(exc)) from None
        self.procs.append((label, dev))
        return dev

    async def __aenter__(self) -> Devices:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        problems = []
        with trio.CancelScope(shield=True):
            for _, dev in self.procs:
                rc = await dev.stop()
                if rc != 0:
                    problems.append(f"{dev.name} exited with status {rc}:\n{dev.log_tail()}")
                errors = dev.log_problems()
                if errors:
                    problems.append(f"{dev.name} logged errors:\n"
                                    + "\n".join("      | " + e for e in errors[:10]))
            await self._stack.aclose()
        if self.procs:
            step("device processes stopped: " + ", ".join(
                f"{label} (exit {dev.returncode})" for label, dev in self.procs))
        if problems and exc_type is None:
            raise DemoError("\n".join(problems))
        for p in problems:
            say("  warning: " + p)


# ---------------------------------------------------------------- guest helpers

async def meminfo(guest: Guest) -> dict[str, int]:
    r = await guest.check("cat /proc/meminfo")
    out = {}
    for line in r.stdout.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * 1024
    return out


async def virtio_dir(guest: Guest, virtio_id: int) -> str:
    r = await guest.check("for d in /sys/bus/virtio/devices/*; do "
                          f"[ \"$(cat $d/device)\" = \"{virtio_id:#06x}\" ] && echo $d; done; true")
    dirs = r.stdout.split()
    if len(dirs) != 1:
        raise DemoError(f"the guest sees {len(dirs)} virtio devices with id {virtio_id}, expected 1")
    return dirs[0]


async def guest_driver(guest: Guest, virtio_id: int) -> str:
    vdir = await virtio_dir(guest, virtio_id)
    r = await guest.run(f"basename $(readlink {vdir}/driver)")
    return f"{vdir.rsplit('/', 1)[-1]} bound to {r.stdout.strip() or 'no driver'}"


async def read_hwrng(guest: Guest, dev: VuserProcess, nbytes: int) -> dict[str, Any]:
    current = (await guest.check("cat /sys/class/misc/hw_random/rng_current")).stdout.strip()
    step(f"guest: /sys/class/misc/hw_random/rng_current = {current}")
    if not current.startswith("virtio_rng"):
        raise DemoError(f"the guest's current hwrng is {current!r}, not virtio_rng")
    before = (await dev.status())["device_status"]["bytes_served"]
    count = nbytes // 4096
    cmd = ("t0=$(cut -d' ' -f1 /proc/uptime); "
           f"n=$(dd if=/dev/hwrng bs=4096 count={count} iflag=fullblock 2>/dev/null | wc -c); "
           "t1=$(cut -d' ' -f1 /proc/uptime); echo $n $t0 $t1")
    step(f"guest: $ dd if=/dev/hwrng bs=4096 count={count} iflag=fullblock | wc -c")
    r = await guest.check(cmd, timeout=180)
    n, t0, t1 = r.stdout.split()
    got = int(n)
    seconds = max(float(t1) - float(t0), 0.01)
    after = (await dev.status())["device_status"]["bytes_served"]
    step(f"guest: read {got} bytes in {seconds:.2f}s ({got / seconds / 1024:.0f} KiB/s); "
         f"vuser served {after - before} bytes meanwhile")
    if got != nbytes:
        raise DemoError(f"the guest read {got} bytes from /dev/hwrng, expected {nbytes}")
    if after - before < got:
        raise DemoError(f"vuser served {after - before} bytes but the guest read {got}")
    return {"bytes": got, "seconds": seconds, "served": after - before}


def show_status(status: dict[str, Any]) -> None:
    feats = status.get("negotiated_features") or []
    step(f"vuser: {status['device']} (virtio id {status['virtio_id']}), connected: "
         f"{status.get('connected')}, vhost-user messages: {status.get('messages', '-')}")
    say("           negotiated features: " + (", ".join(feats) if feats else "(none)"))
    if status.get("protocol_features"):
        say("           protocol features:   " + ", ".join(status["protocol_features"]))
    say(f"           queues (policy {status.get('queue_policy')}):")
    for q in status.get("queues") or []:
        if "size" in q:
            say(f"             {q['index']}: {str(q.get('role')):14s} size {q['size']:4d}  "
                f"{'running' if q.get('running') else 'stopped'}  buffers {q['buffers']:6d}  "
                f"kicks {q['kicks']:6d}  notifies {q['notifies']:6d}")
        else:
            say(f"             {q.get('index')}: {q.get('role')}")


def rss_line(pid: int) -> dict[str, int]:
    try:
        return qemu_rss(pid)
    except OSError as exc:
        raise DemoError(f"cannot read QEMU's /proc/{pid}/status: {exc}") from None


# ---------------------------------------------------------------- sections

@dataclass
class Result:
    name: str
    ok: bool | None          # None: skipped
    summary: str
    seconds: float = 0.0


Report = Callable[[str, str], None]          # (row, summary) of something that worked
SectionFn = Callable[[Workdir, Report], Awaitable[None]]


async def section_rng_72(work: Workdir, report: Report) -> None:
    qinfo, kinfo = qemu_info("7.2"), kernel_info("bookworm")
    say(f"  QEMU {qinfo['version']} ({qinfo['key']}), kernel {kinfo['version']}, "
        "front-end vhost-user-rng-pci")
    async with Devices(work) as devices:
        rng = await devices.start("rng", "rng72")
        args = await qemu_args(work, rng, "7.2", "rng0")
        step("QEMU gets: " + work.show(args)[len("vuser "):])
        async with boot_guest("7.2", "bookworm", memory_mb=GUEST_MEMORY_MB, extra_args=args,
                              workdir=work / "guest-rng72", keep_workdir=True) as guest:
            step(f"guest booted in {guest.boot_seconds:.1f}s (QEMU pid {guest.pid}); "
                 f"{await guest_driver(guest, 4)}")
            numbers = await read_hwrng(guest, rng, RNG_READ)
            status = await vuser_ctl(work, rng, "status")
            show_status(status)
            served = status["device_status"]["bytes_served"]
            say(f"           bytes served in total: {served} in {status['device_status']['requests']} "
                "requests (the guest kernel's hwrng thread reads some too)")
            if status.get("negotiated_features") is None:
                raise DemoError("vuser reports no negotiated features")
    report(f"rng (QEMU {qinfo['key']})", f"guest read 1 MiB in {numbers['seconds']:.2f}s "
           f"({numbers['bytes'] / numbers['seconds'] / 1024:.0f} KiB/s); vuser served {served} B in all")


async def balloon_wait(dev: VuserProcess, target_bytes: int) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    seen: list[dict[str, Any]] = []

    async def reached() -> dict[str, Any] | None:
        seen.append((await dev.status())["device_status"])
        return seen[-1] if seen[-1]["actual_bytes"] == target_bytes else None

    try:
        st = await wait_until(reached, BALLOON_WAIT, f"the balloon to reach {mib(target_bytes)}",
                              interval=0.25)
    except PollTimeout:
        if not seen:
            raise DemoError(f"vuser did not answer status within {BALLOON_WAIT:.0f}s") from None
        st = seen[-1]
        raise DemoError(
            f"the balloon did not reach {mib(target_bytes)}: after {BALLOON_WAIT:.0f}s actual is "
            f"{mib(st['actual_bytes'])} ({st['actual_pages']} pages), vuser saw "
            f"{st['inflate_buffers']} inflate and {st['deflate_buffers']} deflate buffers "
            f"({st['inflated_pages']} pages held)") from None
    return st, time.monotonic() - t0


async def section_qemu11(work: Workdir, report: Report) -> None:
    qinfo, kinfo = qemu_info("11"), kernel_info("sid")
    say(f"  QEMU {qinfo['version']} ({qinfo['key']}), kernel {kinfo['version']}, "
        "front-end vhost-user-test-device-pci (virtio-id 4 and 5)")
    async with Devices(work) as devices:
        rng = await devices.start("rng", "rng11")
        # Without free page reporting the guest keeps the memory it frees
        # resident, so what inflating gives back to the host shows in QEMU's
        # RSS (the reporting section shows reporting on its own).
        balloon = await devices.start("balloon", "balloon", "--without", "REPORTING")
        args = (await qemu_args(work, rng, "11", "rng0")) + (await qemu_args(work, balloon, "11", "balloon0"))
        step("QEMU gets: " + work.show(args)[len("vuser "):])
        async with boot_guest("11", "sid", memory_mb=GUEST_MEMORY_MB, extra_args=args,
                              workdir=work / "guest-qemu11", keep_workdir=True) as guest:
            step(f"guest booted in {guest.boot_seconds:.1f}s (QEMU pid {guest.pid})")
            step(f"guest: rng: {await guest_driver(guest, 4)}; balloon: {await guest_driver(guest, 5)}")

            say("  -- rng")
            numbers = await read_hwrng(guest, rng, RNG_READ)
            report(f"rng (QEMU {qinfo['key']})", f"guest read 1 MiB in {numbers['seconds']:.2f}s "
                   f"({numbers['bytes'] / numbers['seconds'] / 1024:.0f} KiB/s)")

            say("  -- balloon")
            try:
                report(f"balloon (QEMU {qinfo['key']})", await balloon_steps(work, guest, balloon))
            except DemoError as exc:
                raise DemoError(f"{exc}\n    device log tail ($DEMO/{balloon.log_path.name}):\n"
                                f"{balloon.log_tail()}", row=f"balloon (QEMU {qinfo['key']})") from None


class Snapshots:
    """Guest meminfo, QEMU's RSS and the balloon's numbers, one line each."""

    def __init__(self, guest: Guest, balloon: VuserProcess) -> None:
        self.guest = guest
        self.balloon = balloon
        self.rows: list[tuple[str, dict[str, int], dict[str, int], dict[str, Any]]] = []

    async def take(self, label: str) -> tuple[str, dict[str, int], dict[str, int], dict[str, Any]]:
        mem = await meminfo(self.guest)
        rss = rss_line(self.guest.pid)
        st = (await self.balloon.status())["device_status"]
        row = (label, mem, rss, st)
        self.rows.append(row)
        step(f"{label:24s} guest MemTotal {mib(mem['MemTotal']):>9s} MemFree {mib(mem['MemFree']):>9s}"
             f" | balloon {mib(st['actual_bytes']):>9s} released {mib(st['bytes_released']):>9s}"
             f" | QEMU RssShmem {mib(rss['RssShmem']):>9s}")
        return row


async def touch_and_free(guest: Guest, snaps: Snapshots) -> None:
    step(f"guest: $ dd if=/dev/zero of=/dev/shm/fill bs=1M count={TOUCH_MB}; rm /dev/shm/fill   "
         "(makes guest RAM resident in QEMU's memfd)")
    await guest.check(f"dd if=/dev/zero of=/dev/shm/fill bs=1M count={TOUCH_MB} 2>/dev/null", timeout=120)
    await snaps.take(f"{TOUCH_MB} MiB in guest tmpfs")
    await guest.check("rm /dev/shm/fill")
    await snaps.take("freed in the guest")


async def balloon_steps(work: Workdir, guest: Guest, balloon: VuserProcess) -> str:
    status = await vuser_ctl(work, balloon, "status")
    show_status(status)
    negotiated = set(status.get("negotiated_features") or [])
    snaps = Snapshots(guest, balloon)

    await snaps.take("after boot")
    await touch_and_free(guest, snaps)
    before = snaps.rows[-1]

    status = await vuser_ctl(work, balloon, "set-target", BALLOON_TARGET)
    target = status["target_bytes"]
    st, secs = await balloon_wait(balloon, target)
    step(f"balloon reached {mib(st['actual_bytes'])} in {secs:.1f}s "
         f"({st['inflate_buffers']} inflate buffers, {st['inflated_pages']} pages held by vuser)")
    inflated = await snaps.take(f"inflated to {BALLOON_TARGET}")

    await vuser_ctl(work, balloon, "set-target", "0")
    st, dsecs = await balloon_wait(balloon, 0)
    step(f"balloon back to {mib(st['actual_bytes'])} in {dsecs:.1f}s "
         f"({st['deflate_buffers']} deflate buffers)")
    deflated = await snaps.take("deflated to 0")

    stats = (await balloon.status())["device_status"]["stats"]
    if stats["updates"]:
        vals = stats["values"]
        step("guest statistics via statsq: " + ", ".join(
            f"{k} {mib(vals[k])}" for k in ("free-memory", "total-memory", "available-memory") if k in vals)
            + f" ({stats['updates']} updates)")

    mem_drop = before[1]["MemFree"] - inflated[1]["MemFree"]
    rss_drop = before[2]["RssShmem"] - inflated[2]["RssShmem"]
    say(f"  inflate: guest MemFree {signed_mib(-mem_drop)}, MemTotal "
        f"{signed_mib(inflated[1]['MemTotal'] - before[1]['MemTotal'])}, "
        f"QEMU RssShmem {signed_mib(-rss_drop)}, vuser released "
        f"{mib(inflated[3]['bytes_released'] - before[3]['bytes_released'])}")
    if "VIRTIO_BALLOON_F_DEFLATE_ON_OOM" in negotiated:
        say("           (DEFLATE_ON_OOM is negotiated, so the guest counts ballooned pages in MemTotal)")
    say(f"  deflate: guest MemFree {signed_mib(deflated[1]['MemFree'] - inflated[1]['MemFree'])}, "
        f"QEMU RssShmem {signed_mib(deflated[2]['RssShmem'] - inflated[2]['RssShmem'])}")
    say("           (a returned page is back in QEMU's RSS only once the guest touches it again; "
        "pages\n           on the guest's per-CPU free lists do not count in MemFree)")
    if mem_drop < target * 0.9:
        raise DemoError(f"guest MemFree fell by only {mib(mem_drop)} while inflating to {mib(target)}")
    return (f"inflated {BALLOON_TARGET} in {secs:.1f}s: guest MemFree {signed_mib(-mem_drop)}, "
            f"QEMU RssShmem {signed_mib(-rss_drop)}; deflated in {dsecs:.1f}s")


async def section_reporting(work: Workdir, report: Report) -> None:
    qinfo, kinfo = qemu_info("11"), kernel_info("sid")
    say(f"  QEMU {qinfo['version']} ({qinfo['key']}), kernel {kinfo['version']}; the guest hands "
        "free memory back on its own")
    async with Devices(work) as devices:
        balloon = await devices.start("balloon", "balloon-reporting")
        args = await qemu_args(work, balloon, "11", "balloon0")
        async with boot_guest("11", "sid", memory_mb=GUEST_MEMORY_MB, extra_args=args,
                              workdir=work / "guest-reporting", keep_workdir=True) as guest:
            step(f"guest booted in {guest.boot_seconds:.1f}s (QEMU pid {guest.pid}); "
                 f"{await guest_driver(guest, 5)}")
            status = await balloon.status()
            negotiated = status.get("negotiated_features") or []
            if "VIRTIO_BALLOON_F_REPORTING" not in negotiated:
                raise DemoError("the guest did not negotiate VIRTIO_BALLOON_F_REPORTING "
                                f"(negotiated: {', '.join(negotiated)})")
            snaps = Snapshots(guest, balloon)
            await snaps.take("after boot")
            await touch_and_free(guest, snaps)
            touched = snaps.rows[-2]
            before = touched[3]["bytes_reported"]
            # The guest reports free blocks of 2 MiB and more, ~2s after they are freed.
            async def reported_most() -> bool:
                st = (await balloon.status())["device_status"]
                return bool(st["bytes_reported"] - before >= TOUCH_MB * MiB * 3 // 4)

            with suppress(PollTimeout):   # the figures below tell how far it got
                await wait_until(reported_most, 10, "the guest to report the freed memory",
                                 interval=0.5)
                await trio.sleep(1)
            after = await snaps.take("after reporting")
            reported = after[3]["bytes_reported"] - before
            rss_drop = touched[2]["RssShmem"] - after[2]["RssShmem"]
            say(f"  the guest reported {mib(reported)} of free memory since it freed the {TOUCH_MB} MiB "
                f"({mib(after[3]['bytes_reported'])} since boot); vuser punched those ranges out of "
                f"the memfd: QEMU RssShmem {signed_mib(-rss_drop)}")
            if reported < TOUCH_MB * MiB // 2:
                raise DemoError(f"the guest reported only {mib(reported)} of the {TOUCH_MB} MiB it freed")
            if rss_drop < TOUCH_MB * MiB // 2:
                raise DemoError(f"QEMU's RssShmem fell by only {mib(rss_drop)} after the guest reported "
                                f"{mib(reported)}")
    report("reporting (QEMU 11)", f"guest freed {TOUCH_MB} MiB and reported {mib(reported)}: "
           f"QEMU RssShmem {signed_mib(-rss_drop)}")


@dataclass
class NetGuest:
    label: str
    kernel: str
    socket: Path
    chardev: str
    mac: str
    ip: str


async def net_qemu_args(work: Workdir, g: NetGuest) -> list[str]:
    """``vuser qemu-args net`` for one socket of the switch (it gives each
    socket a MAC of its own); the demo pins the MAC it shows."""
    out = await vuser(work, "qemu-args", "net", "--socket", str(g.socket), "--qemu-version", "7.2",
                      "--chardev-id", g.chardev, "--no-memory")
    args = shlex.split(out)
    i = args.index("-device")
    args[i + 1] = re.sub(r"mac=[0-9a-f:]+", f"mac={g.mac}", args[i + 1])
    return args


async def net_up(guest: Guest, g: NetGuest) -> None:
    step(f"{g.label}: $ ip addr add {g.ip}/24 dev eth0; ip link set eth0 up")
    await guest.check(f"ip addr add {g.ip}/24 dev eth0 && ip link set eth0 up")
    r = await guest.run("for i in $(seq 100); do [ \"$(cat /sys/class/net/eth0/carrier)\" = 1 ] && exit 0; "
                        "sleep 0.1; done; exit 1")
    if not r.ok:
        raise DemoError(f"{g.label}: eth0 has no carrier 10s after it was set up")


async def net_ping(guest: Guest, src: NetGuest, dst: NetGuest) -> str:
    # The first echo may go before the peer's receive ring is filled.
    r = await guest.run(f"i=0; until ping -c 1 -W 1 {dst.ip} >/dev/null; do i=$((i+1)); "
                        "[ $i -ge 15 ] && exit 1; done", timeout=25)
    if not r.ok:
        raise DemoError(f"{src.label} gets no answer from {dst.label} ({dst.ip}) within 15s")
    step(f"{src.label}: $ ping -c {NET_PINGS} -i 0.2 {dst.ip}")
    r = await guest.run(f"ping -c {NET_PINGS} -i 0.2 {dst.ip}", merge_stderr=True, timeout=NET_PINGS + 10)
    stats = [line.strip() for line in r.stdout.splitlines() if "packets" in line or "round-trip" in line]
    for line in stats:
        say(f"           {line}")
    if f"{NET_PINGS} packets received" not in r.stdout:
        raise DemoError(f"ping {src.label} -> {dst.label} lost packets:\n{r.stdout}")
    # "round-trip min/avg/max = 1.904/3.330/9.090 ms": the average
    return stats[-1].split("=")[-1].split("/")[1] + " ms" if "round-trip" in stats[-1] else "?"


async def net_transfer(sender: Guest, receiver: Guest, src: NetGuest, dst: NetGuest) -> tuple[float, str]:
    """NET_TRANSFER_MB of random data made in the sender's tmpfs, sent with
    nc and summed on both sides (the data never crosses the command channel)."""
    step(f"{src.label}: $ dd if=/dev/urandom of=/tmp/data bs=1M count={NET_TRANSFER_MB}; md5sum /tmp/data")
    await sender.check(f"dd if=/dev/urandom of=/tmp/data bs=1M count={NET_TRANSFER_MB} 2>/dev/null", timeout=60)
    sent = (await sender.check("md5sum /tmp/data")).stdout.split()[0]
    # busybox nc quits at EOF on its stdin: give the listener a FIFO opened
    # read-write, which never ends; it quits when the sender closes.
    step(f"{dst.label}: $ nc -l -p 5000 > /tmp/data &")
    r = await receiver.run(
        "mkfifo /tmp/hold; (nc -l -p 5000 <>/tmp/hold >/tmp/data; echo $? >/tmp/nc.rc) </dev/null >/dev/null 2>&1 & "
        "for i in $(seq 50); do netstat -ltn | grep -q ':5000 ' && exit 0; sleep 0.1; done; exit 1")
    if not r.ok:
        raise DemoError(f"nc does not listen in {dst.label}")
    step(f"{src.label}: $ nc {dst.ip} 5000 < /tmp/data")
    r = await sender.run(f"t0=$(cut -d' ' -f1 /proc/uptime); nc {dst.ip} 5000 </tmp/data; rc=$?; "
                         "t1=$(cut -d' ' -f1 /proc/uptime); echo $rc $t0 $t1", timeout=120)
    rc, t0, t1 = r.stdout.split()
    if rc != "0":
        raise DemoError(f"nc in {src.label} exited with status {rc}")
    seconds = max(float(t1) - float(t0), 0.01)
    r = await receiver.run("for i in $(seq 100); do [ -s /tmp/nc.rc ] && exit 0; sleep 0.1; done; exit 1", timeout=20)
    if not r.ok:
        raise DemoError(f"nc in {dst.label} did not finish")
    got = (await receiver.check("md5sum /tmp/data")).stdout.split()[0]
    size = int((await receiver.check("stat -c %s /tmp/data")).stdout)
    step(f"sent {mib(NET_TRANSFER_MB * MiB)} in {seconds:.2f}s ({NET_TRANSFER_MB / seconds:.1f} MiB/s, "
         f"{NET_TRANSFER_MB * 8 / seconds:.0f} Mbit/s)")
    say(f"           md5 in {src.label}: {sent}")
    say(f"           md5 in {dst.label}: {got}  ({size} bytes) {'match' if got == sent else 'MISMATCH'}")
    if got != sent or size != NET_TRANSFER_MB * MiB:
        raise DemoError(f"{dst.label} received {size} bytes with md5 {got}; {src.label} sent "
                        f"{NET_TRANSFER_MB * MiB} bytes with md5 {sent}")
    return seconds, sent


def show_net_ports(status: dict[str, Any]) -> None:
    sw = status["device_status"]
    step(f"vuser: switch ({sw['mode']}), {sw['learned']} addresses learned, {sw['flooded']} frames flooded, "
         f"{sw['calls']} calls into C")
    for p in sw["ports"]:
        drops = ", ".join(f"{k} {v}" for k, v in p["drops"].items()) or "none"
        say(f"           port {p['port']} ({Path(p['name']).name}): tx {p['tx_packets']} frames "
            f"{mib(p['tx_bytes'])} ({p['tx_gso']} TSO)  rx {p['rx_packets']} frames {mib(p['rx_bytes'])}  "
            f"notifies {p['notifies']}  drops: {drops}")


async def section_net(work: Workdir, report: Report) -> None:
    qinfo = qemu_info("7.2")
    kernels = [kernel_info("bookworm"), kernel_info("sid")]
    say(f"  QEMU {qinfo['version']} ({qinfo['key']}), -netdev vhost-user + virtio-net-pci; guest a runs "
        f"{kernels[0]['version']}, guest b {kernels[1]['version']}")
    a = NetGuest("guest a", "bookworm", work / "net.sock", "net0", "52:54:00:00:00:0a", "10.0.0.1")
    b = NetGuest("guest b", "sid", work / "net-b.sock", "net0", "52:54:00:00:00:0b", "10.0.0.2")
    async with Devices(work) as devices:
        # One process, one switch, a port per socket.
        net = await devices.start("net", "net", more_sockets=(b.socket,))
        args_a, args_b = await net_qemu_args(work, a), await net_qemu_args(work, b)
        step("QEMU a gets: " + work.show(args_a)[len("vuser "):])
        step("QEMU b gets: " + work.show(args_b)[len("vuser "):])
        async with boot_guest("7.2", a.kernel, memory_mb=NET_GUEST_MB, extra_args=args_a,
                              workdir=work / "guest-net-a", keep_workdir=True) as ga, \
                boot_guest("7.2", b.kernel, memory_mb=NET_GUEST_MB, extra_args=args_b,
                           workdir=work / "guest-net-b", keep_workdir=True) as gb:
            step(f"guests booted in {ga.boot_seconds:.1f}s and {gb.boot_seconds:.1f}s; "
                 f"a: {await guest_driver(ga, 1)}, b: {await guest_driver(gb, 1)}")
            await net_up(ga, a)
            await net_up(gb, b)
            boot_drops = sum(p["dropped"] for p in (await net.status())["device_status"]["ports"])

            say("  -- ping")
            rtt_ab = await net_ping(ga, a, b)
            rtt_ba = await net_ping(gb, b, a)

            say("  -- nc")
            seconds, _ = await net_transfer(ga, gb, a, b)

            status = await vuser_ctl(work, net, "status")
            for sock in status["sockets"]:
                say(f"  -- {Path(sock['socket']).name}")
                show_status(sock)
            show_net_ports(status)
            fdb = await vuser_ctl(work, net, "fdb", show=False)
            say("           learned: " + ", ".join(f"{e['mac']} on port {e['port']}" for e in fdb))
            dropped = sum(p["dropped"] for p in status["device_status"]["ports"])
            if dropped > boot_drops:
                raise DemoError(f"vuser dropped {dropped - boot_drops} frames during the pings and the transfer")
            if dropped:
                say(f"           ({dropped} frame{'s' if dropped > 1 else ''} dropped while the guests "
                    "booted, none since)")
    report("net (QEMU 7.2)", f"ping avg a->b {rtt_ab}, b->a {rtt_ba}; {NET_TRANSFER_MB} MiB a->b in "
           f"{seconds:.2f}s ({NET_TRANSFER_MB / seconds:.1f} MiB/s), md5 sums match")


# name, title, devices it needs, function
SECTIONS: list[tuple[str, str, tuple[str, ...], SectionFn | None]] = [
    ("rng-7.2", "rng on QEMU 7.2 (vhost-user-rng-pci), bookworm kernel", ("rng",), section_rng_72),
    ("qemu-11", "rng + balloon on QEMU 11 (vhost-user-test-device-pci), sid kernel",
     ("rng", "balloon"), section_qemu11),
    ("reporting", "balloon free page reporting on QEMU 11", ("balloon",), section_reporting),
    ("net", "net: two guests talking through vuser (QEMU 7.2, kernels 6.1 and sid's)", ("net",),
     section_net),
]


async def registered_devices(work: Workdir) -> list[str]:
    out = await vuser(work, "devices", "--json", show=False)
    return [d["name"] for d in json.loads(out)]


async def main_async(args: argparse.Namespace) -> int:
    work = Workdir(keep=args.keep or bool(os.environ.get("VUSER_KEEP_DEMO")))
    results: list[Result] = []
    say(f"== vuser demo (logs in {work.path}, shown as $DEMO)")
    try:
        try:
            names = await registered_devices(work)
        except DemoError as exc:
            say(f"demo: FAILED: cannot list vuser's devices: {exc}")
            results.append(Result("vuser devices", False, "cannot list devices"))
            return 1
        say(f"   devices registered: {', '.join(names)}")
        for name, title, needs, fn in SECTIONS:
            if args.only and name not in args.only:
                continue
            missing = [d for d in needs if d not in names]
            if missing:
                say(f"\n== {name}: not yet available (no {', '.join(missing)} device registered)")
                results.append(Result(name, None, "not yet available"))
                continue
            if fn is None:
                say(f"\n== {name}: the {', '.join(needs)} device is registered, but this demo has "
                    "no section for it yet")
                results.append(Result(name, None, "device registered, no demo section yet"))
                continue
            say(f"\n== {title}")
            t0 = time.monotonic()
            rows: list[Result] = []

            def report(row: str, summary: str) -> None:
                # Seconds since the section started or since its previous row.
                since = t0 + sum(r.seconds for r in rows)
                rows.append(Result(row, True, summary, time.monotonic() - since))

            try:
                await fn(work, report)
            except DemoError as exc:
                say(f"  FAILED: {exc}")
                rows.append(Result(exc.row or name, False, str(exc).splitlines()[0],
                                   time.monotonic() - t0 - sum(r.seconds for r in rows)))
            except Exception as exc:
                say(f"  FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                rows.append(Result(name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                                   time.monotonic() - t0))
            results.extend(rows)
    finally:
        failed = any(r.ok is False for r in results)
        if failed or work.keep:
            say(f"\nlogs kept in {work.path}")
        else:
            shutil.rmtree(work.path, ignore_errors=True)

    say("\n== summary")
    width = max(len(r.name) for r in results) if results else 8
    for r in results:
        mark = {True: "ok", False: "FAILED", None: "-"}[r.ok]
        took = f"{r.seconds:5.1f}s" if r.ok is not None else "     "
        say(f"  {r.name:{width}s}  {mark:6s} {took}  {r.summary}")
    say(f"  total {time.monotonic() - T0:.1f}s")
    if any(r.ok is False for r in results):
        say("demo: FAILED (see above)")
        return 1
    if not any(r.ok for r in results):
        say("demo: nothing ran")
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory with the logs")
    p.add_argument("--only", nargs="+", metavar="SECTION", choices=[s[0] for s in SECTIONS],
                   help="run only these sections")
    args = p.parse_args()
    try:
        return trio.run(main_async, args)
    except KeyboardInterrupt:
        # Device processes and QEMU were stopped on the way out.
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
