"""Live migration of a real guest whose NIC is a vuser port (issue 13).

One ``vuser run net`` with three ports (a switch of the vuser_guest
fixture, served as a process): guest B on port 0, guest A's source QEMU on
port 1 and its destination QEMU (``-incoming``, booted by ``boot_guest``)
on port 2, with A's device arguments but the chardev's socket.  QEMU 7.2 with
bookworm's kernel, QEMU 11 with sid's (neither uses a reconnecting
chardev here).

- B streams 32 MiB over TCP to A while A is live-migrated (the last
  quarter is held back until the switch-over, so the stream is sure to
  span it): the migration completes, the stream ends on the destination
  with matching md5 (more than a MiB of it through port 2), A answers pings
  afterwards and the switch has A's address on port 2.  vuser logged into
  QEMU's dirty log while it lasted (its status).
- An idle guest migrates the same way.
- A migration cancelled midway: the source keeps running (it answers
  pings), vuser's logging is off again.

QEMU reports total time and downtime (``query-migrate``); the test prints
them (they are figures, not pass/fail criteria).
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from test_net_guest import md5, nc_listen, ping
from vuser.testing.guest import Guest, boot_guest
from vuser.testing.lab import Lab, VuserGuest, memory_mib
from vuser.testing.poll import wait_until
from vuser.testing.process import VuserProcess
from vuser.testing.served import ProcessDevice
from vuser.testing.switches import Switch

GUEST_MEMORY = "256M"
STREAM_MIB = 32
PORT = 5013
SWITCH = "mig"
SETUPS = [("7.2", "bookworm"), ("11", "sid")]

pytestmark = pytest.mark.guest


async def migrate(source: Guest, dest: Guest, uri: str, *, bandwidth: int = 1 << 30) -> dict[str, Any]:
    """Live-migrate ``source`` to ``dest`` (waiting on ``uri``); query-migrate's
    final answer once it completed and the destination runs."""
    await listening(uri)
    await source.qmp("migrate-set-parameters", **{"max-bandwidth": bandwidth, "downtime-limit": 300})
    await source.qmp("migrate", uri=uri)
    info: dict[str, Any] = {}

    async def completed() -> bool:
        nonlocal info
        info = await source.qmp("query-migrate")
        assert info.get("status") not in ("failed", "cancelled"), info
        return info.get("status") == "completed"

    await wait_until(completed, 120, "the migration to complete", interval=0.2)
    await wait_until(lambda: _running(dest), 30, "the destination to run", interval=0.2)
    return info


async def listening(uri: str) -> None:
    """The destination listens on ``unix:PATH`` (it opens it after its chardevs)."""
    path = Path(uri.removeprefix("unix:"))
    await wait_until(path.exists, 30, f"the destination to listen on {path}", interval=0.05)


async def _running(guest: Guest) -> bool:
    return bool((await guest.qmp("query-status")).get("status") == "running")


def figures(info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    return (f"total {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
            f"setup {info.get('setup-time')} ms, {ram.get('transferred', 0) >> 20} MiB sent, "
            f"{ram.get('dirty-sync-count')} dirty syncs")


def port_status(status: dict[str, Any], i: int) -> dict[str, Any]:
    out: dict[str, Any] = status["sockets"][i]
    return out


@asynccontextmanager
async def a_and_b(lab: Lab, qemu: str, kernel: str) -> AsyncIterator[tuple[VuserProcess, Switch, VuserGuest, VuserGuest]]:
    """The switch's process, the switch, guest B on port 0 and A's source on
    port 1, pinging each other (entered one after the other: the ports
    follow)."""
    switch = lab.switch(SWITCH, ports=3, serve="process")
    async with lab("net", switch=SWITCH, qemu=qemu, kernel=kernel, memory=GUEST_MEMORY, name="b") as b:
        async with lab("net", switch=SWITCH, qemu=qemu, kernel=kernel, memory=GUEST_MEMORY, name="a") as a:
            assert (b.ports[SWITCH], a.ports[SWITCH]) == (0, 1)
            device = switch.device
            assert isinstance(device, ProcessDevice)
            await ping(b, a.ip)
            yield device.process, switch, b, a
            problems = device.process.log_problems()
            assert not problems, "\n".join(problems[:20])


@asynccontextmanager
async def destination(lab: Lab, switch: Switch, a: VuserGuest, qemu: str, kernel: str) -> AsyncIterator[tuple[Guest, str]]:
    """A's destination QEMU on port 2, waiting for the migration: A's
    arguments with port 2's socket (what a management layer does); the
    destination and its migration address."""
    device = switch.device
    assert device is not None
    source = await device.qemu_args(a.ports[SWITCH], qemu_version=qemu, chardev_id="vu0")
    args = [arg.replace(str(switch.sockets[a.ports[SWITCH]]), str(switch.sockets[2])) for arg in source]
    assert args != source
    switch.take("a-destination")
    workdir = lab.workdir / "a-destination"
    uri = f"unix:{workdir / 'migrate.sock'}"
    try:
        async with boot_guest(qemu, kernel, memory_mb=memory_mib(GUEST_MEMORY), incoming=uri,
                              extra_args=args, workdir=workdir, keep_workdir=True) as dest:
            yield dest, uri
    finally:
        switch.release("a-destination")


async def start_stream(b: Guest, a: VuserGuest) -> str:
    """B sends STREAM_MIB MiB of random data to A over TCP, in the
    background (nc on both sides, results in files); the data's md5.

    A MiB at a time, at most about 20 a second, and the last quarter only
    once /tmp/go exists in B (``stream_done``, after the switch-over): the
    stream flows while the migration starts, and goes on on the
    destination whatever the migration takes."""
    await b.check(f"dd if=/dev/urandom of=/tmp/tx bs=1M count={STREAM_MIB} 2>/dev/null", timeout=90)
    sent = await md5(b, "/tmp/tx")
    await nc_listen(a, PORT)
    hold = STREAM_MIB * 3 // 4
    await b.check(f"rm -f /tmp/tx.rc /tmp/go; ((i=0; while [ $i -lt {STREAM_MIB} ]; do "
                  f"[ $i -ge {hold} ] && while [ ! -e /tmp/go ]; do sleep 0.1; done; "
                  "dd if=/tmp/tx bs=1M skip=$i count=1 2>/dev/null; i=$((i+1)); sleep 0.05; done) "
                  f"| nc {a.ip} {PORT}; echo $? >/tmp/tx.rc) </dev/null >/dev/null 2>&1 &")
    return sent


async def received(a: Guest) -> int:
    return int((await a.check("stat -c %s /tmp/rx")).stdout)


async def stream_done(b: Guest, a: Guest) -> str:
    """Let the stream's last quarter go, wait for both ends; the md5 A received."""
    await b.check("touch /tmp/go")
    await b.check("for i in $(seq 1200); do [ -s /tmp/tx.rc ] && exit 0; sleep 0.1; done; exit 1", timeout=130)
    assert (await b.check("cat /tmp/tx.rc")).stdout.strip() == "0"
    await a.check("for i in $(seq 300); do [ -s /tmp/rx.rc ] && exit 0; sleep 0.1; done; exit 1", timeout=40)
    return await md5(a, "/tmp/rx")


@pytest.mark.parametrize("qemu,kernel", SETUPS)
@pytest.mark.parametrize("traffic", [True, False], ids=["streaming", "idle"])
async def test_live_migration(vuser_guest: Lab, qemu: str, kernel: str, traffic: bool) -> None:
    with trio.fail_after(300):
        async with a_and_b(vuser_guest, qemu, kernel) as (vp, switch, b, a):
            sent = await start_stream(b, a) if traffic else None
            if traffic:   # the stream is under way before the migration starts
                await wait_until(lambda: _grown(a), 30, "A to receive the first MiB", interval=0.2)
            async with destination(vuser_guest, switch, a, qemu, kernel) as (dest, uri):
                info = await migrate(a, dest, uri)
                status = await vp.status()
                await a.qmp("quit")
                # vuser logged while it lasted, on the source's port (an
                # idle guest may leave nothing to log).
                log1 = port_status(status, 1)["dirty_log"]
                assert log1["size"] > 0 and "dirty logging on" in vp.log_text(), log1
                assert log1["updates"] > 0 or not traffic, log1
                if traffic:
                    got = await stream_done(b, dest)
                    assert got == sent
                    # It went on on the destination's port after the switch-over.
                    assert (await vp.status())["device_status"]["ports"][2]["rx_bytes"] > 1 << 20
                await ping(b, a.ip)
                await ping(dest, b.ip)
                fdb = {e["mac"]: e["port"] for e in await vp.ctl("fdb")}
                assert fdb.get(switch.mac(1)) == 2 and fdb.get(switch.mac(0)) == 0, fdb
                ports = (await vp.status())["device_status"]["ports"]
                print(f"QEMU {qemu}, {'streaming' if traffic else 'idle'}: {figures(info)}; "
                      f"vuser's dirty log on port 1: {json.dumps(log1)}; "
                      f"port 1 drops {ports[1]['drops']}, port 2 rx {ports[2]['rx_packets']}")


async def _grown(a: Guest) -> bool:
    return await received(a) >= 1 << 20


@pytest.mark.parametrize("qemu,kernel", SETUPS)
async def test_cancelled_migration(vuser_guest: Lab, qemu: str, kernel: str) -> None:
    """Cancelled midway (slowed down to be midway when the cancel comes):
    the source runs on, vuser stops logging."""
    with trio.fail_after(240):
        async with a_and_b(vuser_guest, qemu, kernel) as (vp, switch, b, a):
            async with destination(vuser_guest, switch, a, qemu, kernel) as (_, uri):
                await listening(uri)
                await a.qmp("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
                await a.qmp("migrate", uri=uri)

                async def logging_on() -> bool:
                    return bool(port_status(await vp.status(), 1)["dirty_log"]["logging"])

                await wait_until(logging_on, 30, "vuser to log for the migration", interval=0.2)
                await ping(b, a.ip, count=3)      # traffic while logging
                during = port_status(await vp.status(), 1)["dirty_log"]
                info = await a.qmp("query-migrate")
                assert info["status"] == "active", info
                await a.qmp("migrate_cancel")

                async def cancelled() -> bool:
                    return bool((await a.qmp("query-migrate")).get("status") == "cancelled")

                await wait_until(cancelled, 30, "the migration to be cancelled", interval=0.2)
                await wait_until(lambda: _not_logging(vp), 30, "vuser to stop logging", interval=0.2)
                assert await _running(a)
                await ping(b, a.ip)
                await ping(a, b.ip)
                after = port_status(await vp.status(), 1)
                assert after["connected"] and after["dirty_log"]["updates"] >= during["updates"] > 0
                fdb = {e["mac"]: e["port"] for e in await vp.ctl("fdb")}
                assert fdb.get(switch.mac(1)) == 1, fdb
                print(f"QEMU {qemu}: cancelled at {info.get('ram', {}).get('transferred', 0) >> 20} MiB; "
                      f"vuser's dirty log on port 1 during: {json.dumps(during)}")


async def _not_logging(vp: VuserProcess) -> bool:
    return not port_status(await vp.status(), 1)["dirty_log"]["logging"]
