"""What the two reference rings share, as ``native/vring_priv.h`` does for
the C ones: region lookup, indirect tables, and turning one buffer
descriptor into segments with the chain's checks (order, length and
descriptor caps, addresses)."""

from __future__ import annotations

import struct
from typing import Sequence

from .base import MAX_CHAIN_DESCS, MAX_INDIRECT, MAX_REGIONS, SEG_WRITE, RegionLike, SegTuple
from .errors import (
    ERR_CHAIN_DESCS,
    ERR_CHAIN_LEN,
    ERR_DESC_ADDR,
    ERR_INDIRECT_ADDR,
    ERR_INDIRECT_LEN,
    ERR_NOT_READY,
    ERR_ORDER,
    ERR_RING_SIZE,
)

U16 = struct.Struct("<H")
U32_MAX = 0xFFFF_FFFF
DESC_SIZE = 16  # split and packed descriptors alike
_U64 = 1 << 64


class NoSpace(Exception):
    """The segment space ran out: nothing of the chain is committed."""


class ChainError(Exception):
    """The guest put garbage in the ring (``code``: an ERR_* value)."""

    def __init__(self, code: int) -> None:
        self.code = code


def areas_fit(areas: Sequence[memoryview], sizes: Sequence[int]) -> bool:
    """Is every ring area at least as long as its layout needs?"""
    return all(len(a) >= n for a, n in zip(areas, sizes))


def rebind_check(num: int, areas: Sequence[memoryview], sizes: Sequence[int]) -> int:
    """vu_vring_rebind's checks: 0, ERR_NOT_READY or ERR_RING_SIZE."""
    if num == 0:
        return ERR_NOT_READY
    return 0 if areas_fit(areas, sizes) else ERR_RING_SIZE


def find_region(regions: Sequence[RegionLike], gpa: int) -> int:
    for i, r in enumerate(regions[:MAX_REGIONS]):
        if 0 <= gpa - r.gpa < r.size:
            return i
    return -1


def indirect_table(regions: Sequence[RegionLike], addr: int, length: int) -> memoryview:
    """The indirect table of ``length`` bytes at ``addr`` (one region)."""
    if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
        raise ChainError(ERR_INDIRECT_LEN)
    r = find_region(regions, addr)
    if r < 0 or regions[r].size - (addr - regions[r].gpa) < length:
        raise ChainError(ERR_INDIRECT_ADDR)
    off = addr - regions[r].gpa
    return regions[r].view[off:off + length]


class Walk:
    """A chain being walked: its segments and totals so far."""

    __slots__ = ("segs", "seg_room", "out_len", "in_len", "total", "seen_write")

    def __init__(self, seg_room: int) -> None:
        self.segs: list[SegTuple] = []
        self.seg_room = seg_room
        self.out_len = self.in_len = self.total = 0
        self.seen_write = False

    def buffer(self, regions: Sequence[RegionLike], addr: int, length: int, write: bool) -> None:
        """One buffer descriptor (not one pointing at a table)."""
        self.total += 1
        if self.total > MAX_CHAIN_DESCS:
            raise ChainError(ERR_CHAIN_DESCS)
        if write:
            self.seen_write = True
            self.in_len += length
        else:
            if self.seen_write:
                raise ChainError(ERR_ORDER)
            self.out_len += length
        if self.out_len + self.in_len > U32_MAX:
            raise ChainError(ERR_CHAIN_LEN)
        if not length:
            return
        if addr + length > _U64:
            raise ChainError(ERR_DESC_ADDR)
        gpa, rem = addr, length
        flags = SEG_WRITE if write else 0
        while rem:
            r = find_region(regions, gpa)
            if r < 0:
                raise ChainError(ERR_DESC_ADDR)
            off = gpa - regions[r].gpa
            piece = min(regions[r].size - off, rem)
            if len(self.segs) >= self.seg_room:
                raise NoSpace
            self.segs.append((off, piece, r, flags))
            gpa += piece
            rem -= piece
