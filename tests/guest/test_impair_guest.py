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
from pathlib import Path

import pytest
import trio

from test_net_guest import MAC, guests, md5, nc_listen, nc_received, net_args, parse_ping, ping, set_ip, vuser_net
from vuser.devices.net.impair import parse_spec
from vuser.testing.guest import Guest

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


async def test_impairments_seen_by_guests(tmp_path: Path) -> None:
    with trio.fail_after(600):
        async with vuser_net(tmp_path, 2) as net:
            specs = [{"extra_args": net_args(net.sockets[i], MAC.format(i + 1))} for i in range(2)]
            async with guests("bookworm", specs) as (a, b):
                await set_ip(a, "10.0.0.1/24")
                await set_ip(b, "10.0.0.2/24")
                base = await ping(a, "10.0.0.2", count=10)
                assert base.avg_ms is not None
                port_b = net.switch.ports[1]

                # loss=30%: only the requests (frames to B) are impaired.
                net.switch.impair(port_b, parse_spec(["loss=30%", "seed=42"]))
                r = await a.run(f"ping -c {PINGS} -i 0.05 -W 1 10.0.0.2", merge_stderr=True, timeout=60)
                p = parse_ping(r.stdout)
                lost = p.sent - p.received
                lo, hi = binomial_99(PINGS, LOSS)
                st = net.port(1)["impair"]
                assert lo <= lost <= hi, (lost, (lo, hi), st)
                assert st["dropped"] >= lost

                # delay=100ms: the round trip grows by 100 ms.
                net.switch.impair(port_b, parse_spec(["delay=100ms"]))
                d = await ping(a, "10.0.0.2", count=10)
                assert d.avg_ms is not None and 100 <= d.avg_ms <= 100 + base.avg_ms + 30, (d.avg_ms, base.avg_ms)

                # rate=10mbit: TCP to B at 10 Mbit/s, +-15%.
                net.switch.impair(port_b, parse_spec(["rate=10mbit"]))
                mib = 12
                took, sent, got = await tcp_seconds(a, b, "10.0.0.2", mib, 5000)
                mbit = mib * 8 * 1.048576 / took
                assert sent == got
                assert 8.5 <= mbit <= 11.5, (mbit, took, net.port(1)["impair"])

                # A hostile path: 16 MiB still arrive intact.
                net.switch.impair(port_b, parse_spec(["loss=5%", "reorder=5%", "duplicate=1%", "delay=10ms",
                                                      "seed=7"]))
                took2, sent2, got2 = await tcp_seconds(a, b, "10.0.0.2", 16, 5001)
                st2 = net.port(1)["impair"]
                assert sent2 == got2
                assert st2["dropped"] > 0 and st2["reordered"] > 0 and st2["duplicated"] > 0, st2
                net.switch.impair(port_b, None)
                print(f"baseline rtt {base.avg_ms} ms; loss=30%: {lost}/{PINGS} lost (99% interval "
                      f"{lo:.0f}..{hi:.0f}); delay=100ms: rtt {d.avg_ms} ms; rate=10mbit: {mib} MiB in "
                      f"{took:.1f}s = {mbit:.2f} Mbit/s; loss 5% reorder 5% duplicate 1%: 16 MiB in "
                      f"{took2:.1f}s, md5 {sent2}, {st2}")
