"""What real-guest tests read from the guest's sysfs about its virtio devices."""

from __future__ import annotations

from vuser.testing.guest import Guest


def guest_features(sysfs_bits: str) -> int:
    """/sys/bus/virtio/devices/*/features: one '0'/'1' character per bit."""
    value = 0
    for bit, ch in enumerate(sysfs_bits.strip()):
        if ch == "1":
            value |= 1 << bit
    return value


async def virtio_dir(guest: Guest, virtio_id: int) -> str:
    """The sysfs directory of the guest's virtio device with ``virtio_id``."""
    r = await guest.check(
        f"for d in /sys/bus/virtio/devices/*; do [ \"$(cat $d/device)\" = \"{virtio_id:#06x}\" ] && echo $d; done")
    dirs = r.stdout.split()
    assert len(dirs) == 1, f"expected one virtio device with id {virtio_id}, found {dirs}"
    return dirs[0]


async def guest_feature_bits(guest: Guest, virtio_id: int) -> int:
    """The feature bits the guest's driver of device ``virtio_id`` negotiated."""
    vdir = await virtio_dir(guest, virtio_id)
    return guest_features((await guest.check(f"cat {vdir}/features")).stdout)
