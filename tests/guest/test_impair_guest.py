"""Network impairment with real guests: two Linux guests (QEMU 7.2,
kernel 6.1) on one vuser switch, the frames to guest B impaired in C.

- loss=30%: of 200 pings from A, the lost ones (the requests to B) fall
  in the binomial 99% interval around 60;
- delay=100ms: round trips take 100 ms plus the unimpaired baseline;
- rate=10mbit: a TCP transfer to B runs within +-15% of 10 Mbit/s;
- loss=5% reorder=5% duplicate=1% (behind a 10 ms delay, which reordering
  needs): 16 MiB over TCP arrive with matching md5.
"""

from __future__ import annotations

import math
import time

import pytest
import trio

from test_net_guest import md5, nc_listen, nc_received, net_guest, parse_ping, ping
from vuser.testing.guest import Guest
from vuser.testing.lab import Lab

pytestmark = pytest.mark.guest

PINGS = 200
LOSS = 0.30


def binomial_99(n: int, p: float) -> tuple[float, float]:
    """The normal approximation's 99% interval of a binomial count."""
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - 2.576 * sd, mean + 2.576 * sd


async def tcp_seconds(sender: Guest, receiver: Guest, ip: str, mib: int, port: int) -> tuple[float, str, str]:
    """Seconds from the first byte sent to the last byte written by the
    receiver (host clock; the serial console's own delays are small
    against the transfer), and both md5 sums."""
    await sender.check(f"dd if=/dev/urandom of=/tmp/tx bs=1M count={mib} 2>/dev/null", timeout=60)
    sent = await md5(sender, "/tmp/tx")
    await nc_listen(receiver, port)
    t0 = time.monotonic()
    await sender.check(f"nc {ip} {port} </tmp/tx", timeout=240)
    await nc_received(receiver, timeout=30)
    took = time.monotonic() - t0
    got = await md5(receiver, "/tmp/rx")
    await sender.check("rm -f /tmp/tx")
    await receiver.check("rm -f /tmp/rx")
    return took, sent, got


async def test_impairments_seen_by_guests(vuser_guest: Lab) -> None:
    vuser_guest.switch("lan", ports=2)
    with trio.fail_after(600):
        async with vuser_guest.together(net_guest(vuser_guest, "bookworm", "lan"),
                                        net_guest(vuser_guest, "bookworm", "lan")) as (a, b):
            switch = a.device("net")
            port_b = str(b.ports["lan"])

            async def impair(*tokens: str) -> None:
                """`vuser ctl PATH impair PORT SPEC...` on B's port."""
                await switch.ctl("impair", port_b, *tokens)

            base = await ping(a, b.ip, count=10)
            assert base.avg_ms is not None

            # loss=30%: only the requests (frames to B) are impaired.
            await impair("loss=30%", "seed=42")
            r = await a.run(f"ping -c {PINGS} -i 0.05 -W 1 {b.ip}", timeout=60)
            p = parse_ping(r.stdout + r.stderr)
            lost = p.sent - p.received
            lo, hi = binomial_99(PINGS, LOSS)
            st = dict((await switch.ctl("stats"))["ports"][int(port_b)]["impair"])
            assert lo <= lost <= hi, (lost, (lo, hi), st)
            assert st["dropped"] >= lost

            # delay=100ms: the round trip grows by 100 ms.
            await impair("delay=100ms")
            d = await ping(a, b.ip, count=10)
            assert d.avg_ms is not None and 100 <= d.avg_ms <= 100 + base.avg_ms + 30, (d.avg_ms, base.avg_ms)

            # rate=10mbit: TCP to B at 10 Mbit/s, +-15%.
            await impair("rate=10mbit")
            mib = 12
            took, sent, got = await tcp_seconds(a, b, b.ip, mib, 5000)
            mbit = mib * 8 * 1.048576 / took
            assert sent == got
            assert 8.5 <= mbit <= 11.5, (mbit, took)

            # A hostile path: 16 MiB still arrive intact.
            await impair("loss=5%", "reorder=5%", "duplicate=1%", "delay=10ms", "seed=7")
            took2, sent2, got2 = await tcp_seconds(a, b, b.ip, 16, 5001)
            st2 = dict((await switch.ctl("stats"))["ports"][int(port_b)]["impair"])
            assert sent2 == got2
            assert st2["dropped"] > 0 and st2["reordered"] > 0 and st2["duplicated"] > 0, st2
            await switch.ctl("impair", port_b, "clear")
            print(f"baseline rtt {base.avg_ms} ms; loss=30%: {lost}/{PINGS} lost (99% interval "
                  f"{lo:.0f}..{hi:.0f}); delay=100ms: rtt {d.avg_ms} ms; rate=10mbit: {mib} MiB in "
                  f"{took:.1f}s = {mbit:.2f} Mbit/s; loss 5% reorder 5% duplicate 1%: 16 MiB in "
                  f"{took2:.1f}s, md5 {sent2}, {st2}")
