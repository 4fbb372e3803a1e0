"""virtio-rng (virtio spec 5.4): one request queue, the device fills every
device-writable buffer with entropy.

Entropy comes from the OS (os.urandom) or from a file given with --source
(read in a loop, like QEMU's rng-random backend on a file).

At most RNG_MAX_FILL bytes go into one request (the spec lets the device
use less than the buffer; Linux asks for at most a page), so a guest that
posts a 4 GiB buffer gets 64 KiB, in one bounded allocation."""

from __future__ import annotations

import argparse
import os
from typing import Any, BinaryIO

from vuser.device import Device
from vuser.handles import QueueHandle
from vuser.plugin import DevicePlugin
from vuser.virtio import DeviceId


RNG_MAX_FILL = 64 * 1024  # bytes written into one request at most


class RngDevice(Device):
    name = "rng"
    virtio_id = DeviceId.RNG
    description = "entropy source (virtio-rng)"
    base_queues = ("requestq",)

    def __init__(self, *, source: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.source = source
        self._file: BinaryIO | None = open(source, "rb") if source else None
        self.bytes_served = 0
        self.requests = 0

    def _entropy(self, n: int) -> bytes:
        if self._file is None:
            return os.urandom(n)
        out = bytearray()
        while len(out) < n:
            chunk = self._file.read(n - len(out))
            if not chunk:  # a regular file: start over
                self._file.seek(0)
                chunk = self._file.read(n - len(out))
                if not chunk:
                    raise OSError(f"entropy source {self.source} is empty")
            out += chunk
        return bytes(out)

    def on_kick(self, queue: QueueHandle) -> None:
        used = []
        for chain in queue.pop():
            written = 0
            for view in chain.writable:
                n = min(len(view), RNG_MAX_FILL - written)
                if n <= 0:
                    break
                queue.memory.write(view[:n], self._entropy(n))
                written += n
            used.append((chain.head, written))
            self.bytes_served += written
        self.requests += len(used)
        queue.push(used)

    def status(self) -> dict[str, Any]:
        return {"bytes_served": self.bytes_served, "requests": self.requests,
                "source": self.source or "os.urandom"}


class RngPlugin(DevicePlugin[RngDevice]):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--source", metavar="FILE", help="read entropy from FILE instead of the OS")

    def options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"source": args.source}

    def qemu_args(self, device: RngDevice, chardev: str, qemu_version: str) -> list[str]:
        if qemu_version.startswith("7"):
            # QEMU 7.2 has a dedicated front-end (no generic device).
            return ["-device", f"vhost-user-rng-pci,chardev={chardev}"]
        return super().qemu_args(device, chardev, qemu_version)


plugin = RngPlugin(RngDevice)
