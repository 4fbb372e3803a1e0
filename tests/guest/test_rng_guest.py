"""virtio-rng served by vuser to real Linux guests (QEMU 7.2's
vhost-user-rng-pci and QEMU 11's generic vhost-user-test-device-pci,
kernels 6.1 and sid's)."""

from __future__ import annotations

import pytest

from vuser.devices.rng import RngDevice
from vuser.testing.guest import Guest
from vuser.runner import Runner

from vuser_guest import guest_features, served_guest, virtio_dir

READ_BYTES = 64 * 1024


async def read_hwrng(guest: Guest, runner: Runner) -> tuple[int, int]:
    device = runner.device
    assert isinstance(device, RngDevice)
    before = device.bytes_served
    r = await guest.check(f"dd if=/dev/hwrng bs=4096 count={READ_BYTES // 4096} iflag=fullblock 2>/dev/null | wc -c",
                          timeout=120)
    return int(r.stdout.strip()), device.bytes_served - before


@pytest.mark.guest
@pytest.mark.parametrize("qemu", ["7.2", "11"])
@pytest.mark.parametrize("kernel", ["bookworm", "sid"])
async def test_rng_serves_guest(qemu: str, kernel: str, tmp_path) -> None:
    device = RngDevice()
    async with served_guest(device, tmp_path, qemu=qemu, kernel=kernel) as (guest, runner):
        current = (await guest.check("cat /sys/class/misc/hw_random/rng_current")).stdout.strip()
        assert current.startswith("virtio_rng"), current
        read, served = await read_hwrng(guest, runner)
        assert read == READ_BYTES
        # The driver prefetches one small request after each read, and the
        # kernel's hwrng fill thread may pull more: the device served at
        # least what the guest read, counted on both sides.
        assert served >= read, (served, read)
        print(f"qemu {qemu} kernel {kernel}: guest read {read} bytes, vuser served {served}")

        # The guest's negotiated features are the ones vuser computed.
        vdir = await virtio_dir(guest, 4)
        seen = guest_features((await guest.check(f"cat {vdir}/features")).stdout)
        conn = runner.connection
        assert conn is not None
        negotiated = conn.session.negotiated_features
        assert negotiated is not None
        offered = device.offered_bits
        # Bits vuser offered: identical on both sides.  (QEMU owns transport
        # bits it never forwards, and bit 30 is vhost-user's own.)
        assert seen & offered == negotiated & offered, (
            device.feature_names(seen & offered), device.feature_names(negotiated & offered))
        # And the negotiated set never exceeds offered (plus what QEMU 7.2
        # forces, which vuser offers anyway).
        assert negotiated & ~offered & ~(1 << 30) == 0

        # Queue layout: the driver used index 0 as requestq.
        status = runner.status()
        q0 = status["queues"][0]
        assert q0["role"] == "requestq" and q0["buffers"] > 0, status["queues"]


@pytest.mark.guest
async def test_rng_python_ring_serves_guest(tmp_path) -> None:
    """The pure-Python ring reference drives a real guest too."""
    device = RngDevice()
    async with served_guest(device, tmp_path, qemu="11", kernel="bookworm", ring_impl="python") as (guest, runner):
        read, served = await read_hwrng(guest, runner)
        assert read == READ_BYTES and served >= read
