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

from pathlib import Path

import pytest
import trio

from test_net_guest import (
    MAC,
    guests,
    nc_transfer,
    net_args,
    ping,
    set_ip,
    vuser_net,
)
from vuser.devices.balloon import BalloonDevice
from vuser.devices.rng import RngDevice
from vuser.testing.guest import Guest
from vuser.testing.poll import wait_until
from vuser_guest import served_guest, virtio_dir

F_RING_PACKED = 34
PACKED = "VIRTIO_F_RING_PACKED"
KERNELS = ["bookworm", "sid"]
MiB = 1 << 20

pytestmark = pytest.mark.guest


async def packed_bit(guest: Guest, sysfs_dir: str) -> str:
    """The guest's view of bit 34 of the device's negotiated features."""
    bits = (await guest.check(f"cat {sysfs_dir}/features")).stdout.strip()
    return bits[F_RING_PACKED]


@pytest.mark.parametrize("kernel", KERNELS)
async def test_net_packed_two_guests(kernel: str, tmp_path: Path) -> None:
    with trio.fail_after(180):
        async with vuser_net(tmp_path, 2) as net:
            specs = [{"extra_args": net_args(net.sockets[i], MAC.format(i + 1), device_opts=",packed=on")}
                     for i in range(2)]
            async with guests(kernel, specs) as (a, b):
                for g in (a, b):
                    assert await packed_bit(g, "/sys/class/net/eth0/device") == "1"
                for i in range(2):
                    assert PACKED in net.status(i)["negotiated_features"]
                await set_ip(a, "10.0.0.1/24")
                await set_ip(b, "10.0.0.2/24")
                ab = await ping(a, "10.0.0.2")
                await ping(b, "10.0.0.1")
                there, sent, got = await nc_transfer(a, b, "10.0.0.2", mib=16)
                assert sent == got
                back, sent2, got2 = await nc_transfer(b, a, "10.0.0.1", mib=16, port=5001)
                assert sent2 == got2
                for i in range(2):
                    p = net.port(i)
                    assert not {k for k in p["drops"] if k != "no_buffer"}, p
                    assert net.status(i)["ring_error"] is None
                print(f"kernel {kernel}: packed rings, ping avg {ab.avg_ms} ms; 16 MiB a->b {there:.2f}s, "
                      f"b->a {back:.2f}s; md5 {sent} / {sent2}")


@pytest.mark.parametrize("kernel", KERNELS)
async def test_rng_packed(kernel: str, tmp_path: Path) -> None:
    device = RngDevice()
    async with served_guest(device, tmp_path, qemu="7.2", kernel=kernel, packed=True) as (guest, runner):
        assert await packed_bit(guest, await virtio_dir(guest, 4)) == "1"
        assert PACKED in runner.status()["negotiated_features"]
        r = await guest.check("dd if=/dev/hwrng bs=4096 count=64 iflag=fullblock 2>/dev/null | wc -c", timeout=120)
        assert int(r.stdout) == 64 * 4096
        assert device.bytes_served >= 64 * 4096


def rss_shmem(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem line")


@pytest.mark.parametrize("kernel", KERNELS)
async def test_balloon_packed(kernel: str, tmp_path: Path) -> None:
    dev = BalloonDevice(stats_interval=0)
    async with served_guest(dev, tmp_path, qemu="11", kernel=kernel, memory_mb=512, packed=True) as (guest, runner):
        assert await packed_bit(guest, await virtio_dir(guest, 5)) == "1"
        assert PACKED in runner.status()["negotiated_features"]
        # Touch guest memory so there is something to give back.
        await guest.check("dd if=/dev/zero of=/dev/shm/fill bs=1M count=200 2>/dev/null; rm /dev/shm/fill")
        resident = rss_shmem(guest.pid)
        target = 128 * MiB
        dev.set_target(target // 4096)
        await wait_until(lambda: dev.status()["actual_pages"] * 4096 >= target, 60, "the balloon to inflate")
        await wait_until(lambda: resident - rss_shmem(guest.pid) >= 100 * MiB, 30, "QEMU RssShmem to drop")
        released = resident - rss_shmem(guest.pid)
        dev.set_target(0)
        await wait_until(lambda: dev.status()["actual_pages"] == 0, 60, "the balloon to deflate")
        assert runner.status()["ring_error"] is None
        print(f"kernel {kernel}: packed balloon inflated 128 MiB, QEMU RssShmem released {released >> 20} MiB")
