"""Requests a driver of each device type puts in a ring, so a check can
make any back-end do work and see it done.

A ``Work`` adds one complete request per ``add`` (a chain with the
device-readable part first) on its queue and judges each completion
(``check``); ``serve`` runs a batch and raises ``Fail`` with what was wrong.
The requests change nothing a back-end keeps: rng reads entropy, blk reads
sector 0, fs sends FUSE_INIT (virtiofsd re-initialises on it), net sends a
frame, balloon deflates a page it never inflated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

from construct import Int16ul, Int32sl, Int32ul, Int64ul, Struct

from vuser.frontend import QueueTimeout, UsedElem, UsedRingError
from vuser.frontend.queue import DriverQueueBase
from vuser.frontend.netdriver import BCAST, eth
from vuser.virtio import BLK_S_OK, BLK_SECTOR_SIZE, BlkRequest

PAGE_SIZE = 4096
# The probe's guest MAC: locally administered, unicast.
PROBE_MAC = bytes.fromhex("5254000000fe")


class Fail(Exception):
    """The back-end did not do what the spec (or a seed) asks."""


class Skip(Exception):
    """The check does not apply to this back-end (a feature not offered)."""


# ---------------------------------------------------------------- layouts

# virtio_blk_req's device-readable header (spec 5.2.6).
BlkHeader = Struct("type" / Int32ul, "ioprio" / Int32ul, "sector" / Int64ul)

# FUSE over virtio-fs (spec 5.11.6; include/uapi/linux/fuse.h).
FUSE_KERNEL_VERSION = 7
FUSE_MINOR = 31          # the oldest minor virtiofsd takes
FUSE_GETATTR = 3
FUSE_INIT = 26
FUSE_ROOT_ID = 1
S_IFMT, S_IFDIR = 0o170000, 0o040000
FuseInHeader = Struct("len" / Int32ul, "opcode" / Int32ul, "unique" / Int64ul, "nodeid" / Int64ul,
                      "uid" / Int32ul, "gid" / Int32ul, "pid" / Int32ul, "total_extlen" / Int16ul,
                      "padding" / Int16ul)
FuseOutHeader = Struct("len" / Int32ul, "error" / Int32sl, "unique" / Int64ul)
FuseInitIn = Struct("major" / Int32ul, "minor" / Int32ul, "max_readahead" / Int32ul, "flags" / Int32ul)
FuseGetattrIn = Struct("getattr_flags" / Int32ul, "dummy" / Int32ul, "fh" / Int64ul)
FUSE_INIT_OUT_SIZE = 64
FUSE_ATTR_OUT_SIZE = 104      # fuse_attr_out: attr_valid, nsec, dummy, fuse_attr (88)
FUSE_ATTR_MODE = 16 + 16 + 60  # mode in a GETATTR reply: out header, attr_out header, fuse_attr


def fuse_request(opcode: int, unique: int, nodeid: int, body: bytes) -> bytes:
    header: bytes = FuseInHeader.build({"len": FuseInHeader.sizeof() + len(body), "opcode": opcode,
                                 "unique": unique, "nodeid": nodeid, "uid": 0, "gid": 0, "pid": 0,
                                 "total_extlen": 0, "padding": 0})
    return header + body


def fuse_reply(data: bytes) -> tuple[int, int, int]:
    """(len, error, unique) of a FUSE reply (error is a negative errno)."""
    if len(data) < FuseOutHeader.sizeof():
        raise Fail(f"FUSE reply of {len(data)} bytes, shorter than its header")
    h = FuseOutHeader.parse(data)
    return int(h.len), int(h.error), int(h.unique)


# ---------------------------------------------------------------- work


@dataclass
class Work:
    """Requests on ``queue``; subclasses build and judge them."""

    queue: int

    def add(self, q: DriverQueueBase, *, segments: int = 1, indirect: bool | None = None) -> None:
        raise NotImplementedError

    def check(self, elem: UsedElem) -> str | None:
        """What is wrong with a completion, or None."""
        return None


class RngWork(Work):
    """virtio-rng (5.4): device-writable buffers to fill."""

    def add(self, q: DriverQueueBase, *, segments: int = 1, indirect: bool | None = None) -> None:
        q.add_chain(in_=[64] * segments, indirect=indirect, token=64 * segments)

    def check(self, elem: UsedElem) -> str | None:
        if elem.length == 0:
            return f"request {elem.head} came back with no entropy"
        return None


class BlkWork(Work):
    """virtio-blk (5.2.6): read sector 0 (header, data, status byte)."""

    def add(self, q: DriverQueueBase, *, segments: int = 1, indirect: bool | None = None) -> None:
        header = BlkHeader.build({"type": BlkRequest.IN, "ioprio": 0, "sector": 0})
        pieces = _split(BLK_SECTOR_SIZE, max(segments - 2, 1))
        q.add_chain(out=[header], in_=[*pieces, 1], indirect=indirect, token=BLK_SECTOR_SIZE + 1)

    def check(self, elem: UsedElem) -> str | None:
        if elem.length != elem.token:
            return f"read of sector 0: used len {elem.length}, expected {elem.token} (data and status)"
        if elem.data[-1] != BLK_S_OK:
            return f"read of sector 0: status {elem.data[-1]}"
        return None


class FsWork(Work):
    """virtio-fs (5.11.6): FUSE_INIT on the first request queue."""

    unique = 1

    def add(self, q: DriverQueueBase, *, segments: int = 1, indirect: bool | None = None) -> None:
        FsWork.unique += 1
        body = FuseInitIn.build({"major": FUSE_KERNEL_VERSION, "minor": FUSE_MINOR,
                                 "max_readahead": 0, "flags": 0})
        req = fuse_request(FUSE_INIT, FsWork.unique, 0, body)
        out = [req] if segments < 2 else [req[:FuseInHeader.sizeof()], req[FuseInHeader.sizeof():]]
        in_ = [FuseOutHeader.sizeof() + FUSE_INIT_OUT_SIZE] if segments < 3 else \
            [FuseOutHeader.sizeof(), FUSE_INIT_OUT_SIZE]
        q.add_chain(out=out, in_=in_, indirect=indirect, token=FsWork.unique)

    def check(self, elem: UsedElem) -> str | None:
        length, error, unique = fuse_reply(elem.data)
        if length != elem.length or unique != elem.token:
            return f"FUSE reply len {length} unique {unique}, used len {elem.length} unique {elem.token}"
        if error:
            return f"FUSE_INIT answered error {error}"
        return None


class NetTxWork(Work):
    """virtio-net (5.1.6): a frame on the first transmit queue."""

    def __init__(self, queue: int, hdr_len: int) -> None:
        super().__init__(queue)
        self.hdr_len = hdr_len

    def add(self, q: DriverQueueBase, *, segments: int = 1, indirect: bool | None = None) -> None:
        frame = eth(BCAST, PROBE_MAC, b"vuser probe".ljust(46, b"\0"))
        parts = [bytes(self.hdr_len), *_chunks(frame, max(segments - 1, 1))]
        q.add_chain(out=parts, indirect=indirect)


class BalloonWork(Work):
    """virtio-balloon (5.5.6): deflate one page (never inflated, so nothing
    changes) on deflateq."""

    def __init__(self, queue: int, pfn: int) -> None:
        super().__init__(queue)
        self.pfn = pfn

    def add(self, q: DriverQueueBase, *, segments: int = 1, indirect: bool | None = None) -> None:
        pfn = struct.pack("<I", self.pfn)
        q.add_chain(out=[pfn] * max(segments, 1), indirect=indirect)


def _split(total: int, parts: int) -> list[int]:
    size = total // parts
    return [size] * (parts - 1) + [total - size * (parts - 1)]


def _chunks(data: bytes, parts: int) -> list[bytes]:
    return [data[a:a + b] for a, b in zip(_offsets(_split(len(data), parts)), _split(len(data), parts))]


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, pos = [], 0
    for s in sizes:
        out.append(pos)
        pos += s
    return out


async def serve(q: DriverQueueBase, work: Work, count: int, *, timeout: float, segments: int = 1,
                indirect: bool | None = None, force_kick: bool = False) -> list[UsedElem]:
    """Add ``count`` requests, kick as the driver would, wait for all of
    them and judge each; Fail with what went wrong."""
    for _ in range(count):
        work.add(q, segments=segments, indirect=indirect)
    q.kick(force=force_kick)
    try:
        used = await q.wait_used(count, timeout=timeout)
    except QueueTimeout as exc:
        raise Fail(f"queue {q.index}: {exc}") from None
    except UsedRingError as exc:
        raise Fail(str(exc)) from None
    problems = [p for p in map(work.check, used) if p]
    if problems:
        raise Fail(f"queue {q.index}: " + "; ".join(problems[:3]))
    return used


__all__ = ["BalloonWork", "BlkWork", "Fail", "FsWork", "NetTxWork", "PAGE_SIZE", "RngWork", "Skip", "Work",
           "fuse_reply", "fuse_request", "serve"]

