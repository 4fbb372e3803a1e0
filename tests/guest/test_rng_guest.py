"""virtio-rng served by vuser to real Linux guests (QEMU 7.2's
vhost-user-rng-pci and QEMU 11's generic vhost-user-test-device-pci,
kernels 6.1 and sid's), through the vuser_guest fixture: `vuser run rng`
as a process, its figures from `status()`."""

from __future__ import annotations

import pytest

from vuser.devices.rng import RngDevice
from vuser.testing.lab import VuserGuest

from virtio_sysfs import guest_feature_bits

READ_BYTES = 64 * 1024


async def read_hwrng(guest: VuserGuest) -> tuple[int, int]:
    """Bytes the guest read from /dev/hwrng, and bytes vuser served meanwhile."""
    rng = guest.device("rng")
    before = (await rng.status())["bytes_served"]
    r = await guest.check(f"dd if=/dev/hwrng bs=4096 count={READ_BYTES // 4096} iflag=fullblock 2>/dev/null | wc -c",
                          timeout=120)
    return int(r.stdout.strip()), (await rng.status())["bytes_served"] - before


@pytest.mark.parametrize("qemu", ["7.2", "11"])
@pytest.mark.parametrize("kernel", ["bookworm", "sid"])
async def test_rng_serves_guest(vuser_guest, qemu: str, kernel: str) -> None:
    async with vuser_guest("rng", qemu=qemu, kernel=kernel) as guest:
        current = (await guest.check("cat /sys/class/misc/hw_random/rng_current")).stdout.strip()
        assert current.startswith("virtio_rng"), current
        read, served = await read_hwrng(guest)
        assert read == READ_BYTES
        # The driver prefetches one small request after each read, and the
        # kernel's hwrng fill thread may pull more: the device served at
        # least what the guest read, counted on both sides.
        assert served >= read, (served, read)
        print(f"qemu {qemu} kernel {kernel}: guest read {read} bytes, vuser served {served}")

        # The guest's negotiated features are the ones vuser computed: the
        # bits vuser offered are identical on both sides.  (QEMU owns
        # transport bits it never forwards, and bit 30 is vhost-user's own.)
        status = await guest.device("rng").status()
        offered = set(status["offered_features"])
        seen = set(RngDevice().feature_names(await guest_feature_bits(guest, 4)))
        negotiated = set(status["negotiated_features"])
        assert seen & offered == negotiated & offered, (seen, negotiated)
        # And the negotiated set never exceeds offered (plus what QEMU 7.2
        # forces, which vuser offers anyway).
        assert negotiated - offered <= {"VHOST_USER_F_PROTOCOL_FEATURES"}, negotiated - offered

        # Queue layout: the driver used index 0 as requestq.
        q0 = status["queues"][0]
        assert q0["role"] == "requestq" and q0["buffers"] > 0, status["queues"]


async def test_rng_python_ring_serves_guest(vuser_guest) -> None:
    """The pure-Python ring reference drives a real guest too."""
    async with vuser_guest("rng --ring python", qemu="11", kernel="bookworm") as guest:
        read, served = await read_hwrng(guest)
        assert read == READ_BYTES and served >= read
