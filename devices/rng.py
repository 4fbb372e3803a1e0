"""virtio-rng (virtio spec 5.4): one request queue, the device fills every
device-writable buffer with entropy.

Entropy comes from the OS (os.urandom) or from a file given with --source
(read in a loop, like QEMU's rng-random backend on a file)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, BinaryIO

from vuser.connection import QueueHandle
from vuser.device import Device

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4


class RngDevice(Device):
    name = "rng"
    virtio_id = VIRTIO_ID_RNG
    description = "entropy source (virtio-rng)"
    base_queues = ("requestq",)
    features = ()

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
                data = self._entropy(len(view))
                view[:] = data
                written += len(data)
            used.append((chain.head, written))
            self.bytes_served += written
        self.requests += len(used)
        queue.push(used)

    def status(self) -> dict[str, Any]:
        return {"bytes_served": self.bytes_served, "requests": self.requests,
                "source": self.source or "os.urandom"}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--source", metavar="FILE", help="read entropy from FILE instead of the OS")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Device:
        return cls(without=args.without, queue_policy=args.queue_policy, source=args.source)

    def qemu_device_args(self, chardev: str, qemu_version: str) -> str:
        if qemu_version.startswith("7"):
            # QEMU 7.2 has a dedicated front-end (no generic device).
            return f"vhost-user-rng-pci,chardev={chardev}"
        return super().qemu_device_args(chardev, qemu_version)
