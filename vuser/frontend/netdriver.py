"""A virtio-net driver on the harness: what a guest's virtio-net driver
does with the data queues (fill receive buffers, send frames with the
virtio-net header of the negotiated size, receive frames joining mergeable
buffers), for tests, the fuzzer and the probe.

::

    async with net_frontend(path) as fe:
        g = await net_probe(fe)
        g.fill_rx()
        g.send(eth(BCAST, MAC, payload))
        frames = await g.recv(1)
"""

from __future__ import annotations

import struct
from typing import Any

import trio

from vuser.frontend.driver import Driver
from vuser.frontend.frontend import Frontend
from vuser.frontend.personality import HARNESS_PROTOCOL_FEATURES
from vuser.virtio import NetFeature, Transport, mask
from vuser.wire import ProtocolFeature as PF

# What QEMU's vhost-user netdev accepts of a back-end's protocol features.
NET_PROTOCOL_FEATURES = HARNESS_PROTOCOL_FEATURES | mask(PF.RARP, PF.MTU)
BCAST = b"\xff" * 6
ETH_P_EXPERIMENTAL = 0x88B5


def eth(dst: bytes, src: bytes, payload: bytes, ethertype: int = ETH_P_EXPERIMENTAL) -> bytes:
    """An Ethernet frame (no FCS)."""
    return dst + src + struct.pack("!H", ethertype) + payload


class NetGuest:
    """A virtio-net driver on the harness: receive buffers, send, receive."""

    def __init__(self, drv: Driver, pairs: int = 1) -> None:
        self.drv = drv
        self.pairs = pairs

    @property
    def features(self) -> int:
        assert self.drv.negotiated_features is not None
        return self.drv.negotiated_features

    @property
    def hdr_len(self) -> int:
        return 12 if self.features & mask(Transport.VERSION_1, NetFeature.MRG_RXBUF) else 10

    @property
    def mergeable(self) -> bool:
        return bool(self.features & mask(NetFeature.MRG_RXBUF))

    def fill_rx(self, qp: int = 0, count: int = 32, size: int = 2048) -> None:
        q = self.drv.queue(2 * qp)
        for _ in range(count):
            q.add_inbuf(size)
        q.kick()

    def send(self, frame: bytes, qp: int = 0, *, split: bool = True, hdr: bytes | None = None) -> None:
        q = self.drv.queue(2 * qp + 1)
        header = bytes(self.hdr_len) if hdr is None else hdr
        if split:  # header in its own descriptor, as legacy drivers without ANY_LAYOUT
            q.add_chain(out=[header, frame])
        else:
            q.add_outbuf(header + frame)
        q.kick()

    async def wait_sent(self, count: int, qp: int = 0) -> None:
        used = await self.drv.queue(2 * qp + 1).wait_used(count, timeout=5)
        assert all(u.length == 0 for u in used)

    async def recv(self, count: int, qp: int = 0, timeout: float = 5) -> list[tuple[bytes, bytes]]:
        """(header, frame) of ``count`` frames, mergeable buffers joined."""
        q = self.drv.queue(2 * qp)
        out: list[tuple[bytes, bytes]] = []
        pending: list[Any] = []
        with trio.fail_after(timeout):
            while len(out) < count:
                pending += q.get_used()
                while pending:
                    first = pending[0]
                    hdr = first.data[:self.hdr_len]
                    nbuf = struct.unpack_from("<H", hdr, 10)[0] if self.hdr_len == 12 else 1
                    if self.mergeable:
                        assert nbuf >= 1, hdr
                    else:
                        nbuf = 1
                    if len(pending) < nbuf:
                        break
                    parts = pending[:nbuf]
                    del pending[:nbuf]
                    out.append((hdr, first.data[self.hdr_len:] + b"".join(p.data for p in parts[1:])))
                if len(out) < count:
                    await q.wait_call(0.05)
        assert not pending
        return out


async def net_probe(fe: Frontend, pairs: int = 1, **driver_options: Any) -> NetGuest:
    """Linux's probe of a virtio-net device on ``fe``: a ``NetGuest``."""
    drv = Driver(fe, **driver_options)
    await drv.probe()
    return NetGuest(drv, pairs)


def net_frontend(path: str, pairs: int = 1, **options: Any) -> Any:
    """``Frontend.connect`` to a vhost-user net back-end (``pairs`` queue
    pairs, QEMU's netdev protocol features unless given)."""
    return Frontend.connect(path, num_queues=2 * pairs, protocol_features=options.pop(
        "protocol_features", NET_PROTOCOL_FEATURES), **options)
