"""Shared helpers for real-guest tests: serve a vuser device in-process and
boot a guest with it attached."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import trio

from vuser.device import Device
from vuser.plugin import with_device_property
from vuser.registry import plugin_for
from vuser.runner import Runner
from vuser.testing.guest import Guest, boot_guest


def guest_features(sysfs_bits: str) -> int:
    """/sys/bus/virtio/devices/*/features: one '0'/'1' character per bit."""
    value = 0
    for bit, ch in enumerate(sysfs_bits.strip()):
        if ch == "1":
            value |= 1 << bit
    return value


@asynccontextmanager
async def served_guest(device: Device, tmp_path: Path, *, qemu: str, kernel: str, memory_mb: int = 512,
                       cmdline: str = "", ring_impl: str = "native", packed: bool = False,
                       extra_args: list[str] | None = None) -> AsyncIterator[tuple[Guest, Runner]]:
    sock = str(tmp_path / f"{device.name}.sock")
    runner = Runner(device, sock, ring_impl=ring_impl)
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        device_args = plugin_for(device).qemu_args(device, "vu0", qemu)
        if packed:
            device_args = with_device_property(device_args, "packed=on")
        args = ["-chardev", f"socket,id=vu0,path={sock}", *device_args, *(extra_args or [])]
        async with boot_guest(qemu, kernel, memory_mb=memory_mb, extra_args=args,
                              kernel_cmdline_extra=cmdline) as guest:
            yield guest, runner
        nursery.cancel_scope.cancel()


async def virtio_dir(guest: Guest, virtio_id: int) -> str:
    """The sysfs directory of the guest's virtio device with ``virtio_id``."""
    r = await guest.check(
        f"for d in /sys/bus/virtio/devices/*; do [ \"$(cat $d/device)\" = \"{virtio_id:#06x}\" ] && echo $d; done")
    dirs = r.stdout.split()
    assert len(dirs) == 1, f"expected one virtio device with id {virtio_id}, found {dirs}"
    return dirs[0]
