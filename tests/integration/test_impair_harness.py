"""Network impairment (issue 12) through the harness: two guests on one
switch, the frames to port 1 impaired in C (native/impair.c).

What is shown: loss 100% / 0% (and that the code path counts), the same
seed giving the same decisions, duplication, corruption of exactly one
bit after the Ethernet header, delay as a lower bound, reordering behind a
delay, a rate limit holding frames back, the held-queue limit, the
Gilbert-Elliott model, clearing, the control command and the command
line option, spec errors as one-line usage errors, and a tap port impaired
like any other.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from test_net_harness import MAC_A, net_group, port_stats
from vuser.devices.net.impair import ImpairError, parse_spec
from vuser.frontend.netdriver import BCAST, eth
from vuser.frontend.netdriver import net_frontend as connect
from vuser.frontend.netdriver import net_probe as probe
from vuser.plugin import CommandError
from vuser.testing.process import VuserProcess


def frames(n: int, size: int = 100) -> list[bytes]:
    return [eth(BCAST, MAC_A, n.to_bytes(4, "big") + bytes(size)) for n in range(n)]


def index(frame: bytes) -> int:
    return int.from_bytes(frame[14:18], "big")


async def send_and_collect(tmp_path: Path, tokens: list[str], sent: list[bytes], *, expect: int,
                           timeout: float = 5) -> tuple[list[bytes], dict[str, Any]]:
    """A sends ``sent`` to B, whose port is impaired with ``tokens``;
    B's frames (expect of them, then whatever else comes in 0.3 s) and B's
    impairment counters."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    async with net_group(tmp_path) as (switch, devices, paths):
        switch.impair(switch.ports[1], parse_spec(tokens))
        async with connect(paths[0]) as fa, connect(paths[1]) as fb:
            a, b = await probe(fa), await probe(fb)
            b.fill_rx(count=min(4 * len(sent) + 16, 240))
            for f in sent:
                a.send(f, split=False)
            await a.wait_sent(len(sent))
            got = [f for _, f in await b.recv(expect, timeout=timeout)] if expect else []
            await trio.sleep(0.3)   # anything beyond what was expected (single-buffer frames)
            got += [u.data[b.hdr_len:] for u in b.drv.queue(0).get_used()]
            return got, port_stats(switch, 1)["impair"]


async def test_loss_all_and_none(tmp_path: Path) -> None:
    with trio.fail_after(30):
        got, st = await send_and_collect(tmp_path / "a", ["loss=100%"], frames(20), expect=0)
        assert got == [] and st["offered"] == 20 and st["dropped"] == 20
        got, st = await send_and_collect(tmp_path / "b", ["loss=0%"], frames(20), expect=20)
        assert [index(f) for f in got] == list(range(20)) and st["dropped"] == 0 and st["offered"] == 20


async def test_same_seed_same_decisions(tmp_path: Path) -> None:
    with trio.fail_after(60):
        kept = []
        for run in range(2):
            got, st = await send_and_collect(tmp_path / str(run), ["loss=40%", "seed=1234"], frames(60),
                                             expect=0)
            kept.append([index(f) for f in got])
            assert st["dropped"] + len(got) == 60
        assert kept[0] == kept[1] and 10 < len(kept[0]) < 50
        other, _ = await send_and_collect(tmp_path / "x", ["loss=40%", "seed=99"], frames(60), expect=0)
        assert [index(f) for f in other] != kept[0]


async def test_duplicate_and_corrupt(tmp_path: Path) -> None:
    with trio.fail_after(30):
        sent = frames(10)
        got, st = await send_and_collect(tmp_path / "d", ["duplicate=100%"], sent, expect=20)
        assert sorted(index(f) for f in got) == sorted(list(range(10)) * 2) and st["duplicated"] == 10
        got, st = await send_and_collect(tmp_path / "c", ["corrupt=100%"], sent, expect=10)
        assert st["corrupted"] == 10
        for f, g in zip(sent, got):
            assert f[:14] == g[:14]
            flipped = int.from_bytes(f, "big") ^ int.from_bytes(g, "big")
            assert bin(flipped).count("1") == 1, "exactly one bit after the Ethernet header"


async def test_delay_and_reorder(tmp_path: Path) -> None:
    with trio.fail_after(30):
        t0 = time.monotonic()
        got, st = await send_and_collect(tmp_path / "d", ["delay=300ms"], frames(5), expect=5)
        assert time.monotonic() - t0 >= 0.3          # a lower bound: nothing arrives before its time
        assert [index(f) for f in got] == list(range(5)) and st["delayed"] == 5
        got, st = await send_and_collect(tmp_path / "r", ["delay=200ms", "reorder=50%", "seed=5"], frames(40),
                                         expect=40)
        order = [index(f) for f in got]
        assert sorted(order) == list(range(40)) and order != list(range(40))
        assert st["reordered"] > 5 and st["reordered"] + st["delayed"] == 40


async def test_rate_and_limit(tmp_path: Path) -> None:
    with trio.fail_after(30):
        t0 = time.monotonic()
        # 20 frames of 1014 bytes at 1 Mbit/s: at least 150 ms on the wire.
        got, st = await send_and_collect(tmp_path / "rate", ["rate=1mbit"], frames(20, 1000), expect=20)
        assert time.monotonic() - t0 >= 0.15 and len(got) == 20 and st["delayed"] >= 19
        got, st = await send_and_collect(tmp_path / "lim", ["delay=200ms", "limit=5"], frames(20), expect=5)
        assert len(got) == 5 and st["limit_dropped"] == 15 and st["held"] == 0


async def test_gilbert_elliott(tmp_path: Path) -> None:
    """Bursts: a bad state that loses everything, entered rarely, left rarely."""
    with trio.fail_after(30):
        got, st = await send_and_collect(tmp_path, ["loss=gemodel:10%,20%,100%,0%", "seed=3"], frames(200),
                                         expect=0)
        kept = {index(f) for f in got}
        lost = [i for i in range(200) if i not in kept]
        runs = sum(1 for i in lost if i - 1 not in lost)
        assert lost and len(lost) == st["dropped"] and runs < len(lost)   # losses come in bursts


async def test_control_command_and_clear(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with net_group(tmp_path) as (switch, devices, paths):
            from vuser.devices.net.plugin import plugin

            cmd = plugin.command("impair")
            assert cmd is not None
            assert cmd(devices, ["1", "loss=100%"])["impair"] == "loss=100%"
            assert cmd(devices, [switch.ports[1].name, "delay=10ms", "jitter=2ms"])["port"] == 1
            assert port_stats(switch, 1)["impair"]["spec"] == "delay=10ms jitter=2ms"
            assert cmd(devices, ["1", "clear"])["impair"] is None
            assert "impair" not in port_stats(switch, 1)
            for bad in (["9", "loss=1%"], ["1", "loss=150%"], ["1", "delay=fast"], ["1", "bogus=1"], ["1"]):
                with pytest.raises(CommandError):
                    cmd(devices, bad)


def test_spec_errors_name_the_token() -> None:
    for tokens, needle in ((["loss=5"], "ends with %"), (["rate=10"], "rate"), (["limit=0"], "range"),
                           (["distribution=cauchy"], "uniform")):
        with pytest.raises(ImpairError, match=needle):
            parse_spec(tokens)
    assert parse_spec(["reorder=5%"]).gap == 1
    assert parse_spec(["loss=gemodel:1%"]).gemodel == (1.0, 99.0, 100.0, 0.0)


async def test_command_line_impair(tmp_path: Path) -> None:
    """``vuser run net --impair 1:SPEC`` (a process): frames to port 1 lost."""
    a_path, b_path = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with trio.fail_after(60):
        async with VuserProcess("net", [a_path, b_path], control=str(tmp_path / "ctl"),
                                args=["--impair", "1:loss=100% seed=1"], log_path=tmp_path / "vuser.log",
                                start_timeout=15) as vp:
            async with connect(a_path) as fa, connect(b_path) as fb:
                a, b = await probe(fa), await probe(fb)
                b.fill_rx()
                for f in frames(5):
                    a.send(f)
                await a.wait_sent(5)
                st = await vp.status()
                impair = st["device_status"]["ports"][1]["impair"]
                assert impair["dropped"] == 5 and impair["spec"] == "loss=100% seed=1"
            await vp.ctl("impair", "1", "clear")
            assert "impair" not in (await vp.status())["device_status"]["ports"][1]
        assert await vp.stop() == 0


def _tap_possible() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@pytest.mark.skipif(not _tap_possible(), reason="needs root and /dev/net/tun")
async def test_tap_port_impaired(tmp_path: Path) -> None:
    tap = f"vui{os.getpid() % 100000}"
    with trio.fail_after(30):
        async with net_group(tmp_path, ports=1, taps=(tap,)) as (switch, devices, paths):
            switch.impair(switch.ports[1], parse_spec(["delay=100ms"]))
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5)) as raw:
                raw.bind((tap, 0))
                raw.setblocking(False)
                async with connect(paths[0]) as fa:
                    a = await probe(fa)
                    out = eth(BCAST, MAC_A, b"late to the host" * 5)
                    t0 = time.monotonic()
                    a.send(out)
                    with trio.fail_after(5):
                        await trio.lowlevel.wait_readable(raw.fileno())
                    assert raw.recv(4096) == out and time.monotonic() - t0 >= 0.1
                    assert port_stats(switch, 1)["impair"]["delayed"] == 1
