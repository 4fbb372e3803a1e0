"""Packed virtqueues (VIRTIO_F_RING_PACKED, bit 34) with real Linux guests:
QEMU's ``packed=on`` device property, kernels 6.1 (bookworm) and sid's.

- Two guests on QEMU 7.2's vhost-user netdev with ``packed=on`` ping each
  other and move 16 MiB each way with matching md5; the guests' sysfs
  feature bits show bit 34.
- QEMU 7.2's ``vhost-user-rng-pci,packed=on``: /dev/hwrng reads.
- QEMU 11's generic device (balloon): inflate releases QEMU's shared RSS,
  deflate gives it back, on packed rings.
- A packed net device under a QEMU chardev that reconnects, ``vuser run
  net`` killed and started again: test_net_guest.py's reconnect test,
  parametrized on the ring layout.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from test_net_guest import GUEST_MEMORY, QEMU, nc_transfer, ping, port_stats, port_status
from vuser.testing.guest import Guest
from vuser.testing.lab import Lab
from vuser.testing.poll import wait_until
from vuser.testing.qemu import qemu_rss
from vuser.testing.served import DeviceSpec

from virtio_sysfs import virtio_dir

F_RING_PACKED = 34
PACKED = "VIRTIO_F_RING_PACKED"
KERNELS = ["bookworm", "sid"]
MiB = 1 << 20


def packed(spec: str, **kw: Any) -> DeviceSpec:
    """``spec`` on packed rings (QEMU's ``packed=on`` device property)."""
    return DeviceSpec(spec, qemu_opts=",packed=on", **kw)


async def packed_bit(guest: Guest, sysfs_dir: str) -> str:
    """The guest's view of bit 34 of the device's negotiated features."""
    bits = (await guest.check(f"cat {sysfs_dir}/features")).stdout.strip()
    return bits[F_RING_PACKED]


@pytest.mark.parametrize("kernel", KERNELS)
async def test_net_packed_two_guests(vuser_guest: Lab, kernel: str) -> None:
    vuser_guest.switch("lan", ports=2, serve="in-process")
    with trio.fail_after(180):
        async with vuser_guest.together(
                *(vuser_guest(packed("net", switch="lan"), qemu=QEMU, kernel=kernel, memory=GUEST_MEMORY)
                  for _ in range(2))) as (a, b):
            switch = a.device("net")
            for g in (a, b):
                assert await packed_bit(g, "/sys/class/net/eth0/device") == "1"
            for port in range(2):
                assert PACKED in (await port_status(switch, port))["negotiated_features"]
            ab = await ping(a, b.ip)
            await ping(b, a.ip)
            there, sent, got = await nc_transfer(a, b, b.ip, mib=16)
            assert sent == got
            back, sent2, got2 = await nc_transfer(b, a, a.ip, mib=16, port=5001)
            assert sent2 == got2
            for port in range(2):
                p = await port_stats(switch, port)
                assert not {k for k in p["drops"] if k != "no_buffer"}, p
                assert (await port_status(switch, port))["ring_error"] is None
            print(f"kernel {kernel}: packed rings, ping avg {ab.avg_ms} ms; 16 MiB a->b {there:.2f}s, "
                  f"b->a {back:.2f}s; md5 {sent} / {sent2}")


@pytest.mark.parametrize("kernel", KERNELS)
async def test_rng_packed(vuser_guest: Lab, kernel: str) -> None:
    async with vuser_guest(packed("rng"), qemu="7.2", kernel=kernel) as guest:
        rng = guest.device("rng")
        assert await packed_bit(guest, await virtio_dir(guest, 4)) == "1"
        assert PACKED in (await rng.status())["negotiated_features"]
        r = await guest.check("dd if=/dev/hwrng bs=4096 count=64 iflag=fullblock 2>/dev/null | wc -c", timeout=120)
        assert int(r.stdout) == 64 * 4096
        assert (await rng.status())["bytes_served"] >= 64 * 4096


@pytest.mark.parametrize("kernel", KERNELS)
async def test_balloon_packed(vuser_guest: Lab, kernel: str) -> None:
    async with vuser_guest(packed("balloon --stats-interval 0"), qemu="11", kernel=kernel, memory="512M") as guest:
        balloon = guest.device("balloon")

        async def holds(pages: int) -> bool:
            return bool((await balloon.status())["actual_pages"] == pages)

        assert await packed_bit(guest, await virtio_dir(guest, 5)) == "1"
        assert PACKED in (await balloon.status())["negotiated_features"]
        # Touch guest memory so there is something to give back.
        await guest.check("dd if=/dev/zero of=/dev/shm/fill bs=1M count=200 2>/dev/null; rm /dev/shm/fill")
        resident = qemu_rss(guest.pid)["RssShmem"]
        target = 128 * MiB
        await balloon.ctl("set-target", str(target))
        await wait_until(lambda: holds(target // 4096), 60, "the balloon to inflate", 0.2)
        await wait_until(lambda: resident - qemu_rss(guest.pid)["RssShmem"] >= 100 * MiB, 30,
                         "QEMU RssShmem to drop")
        released = resident - qemu_rss(guest.pid)["RssShmem"]
        await balloon.ctl("set-target", "0")
        await wait_until(lambda: holds(0), 60, "the balloon to deflate", 0.2)
        assert (await balloon.status())["ring_error"] is None
        print(f"kernel {kernel}: packed balloon inflated 128 MiB, QEMU RssShmem released {released >> 20} MiB")
