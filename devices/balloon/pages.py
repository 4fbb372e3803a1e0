"""Page frame numbers from a balloon guest: read in bounded pieces, kept only
where they name guest RAM, coalesced into runs, and a bitmap of the pages
the balloon holds.

Bounds (issue 9; a chain can be 4 GiB): at most ``MAX_PFNS_PER_BUFFER``
PFNs are read from one buffer (Linux sends at most 256, VIRTIO_BALLOON_
ARRAY_PFNS_MAX), in one allocation of at most 4 times that many bytes; the
rest of a bigger buffer is ignored.  The bitmap has one bit per 4 KiB page
of guest RAM, allocated a GiB (32 KiB of bits) at a time where pages are
held, at most ``MAX_BITMAP_CHUNKS`` of them.
"""

from __future__ import annotations

import re
import sys
from array import array
from typing import Iterable, Sequence

from vuser.device import DeviceError
from vuser.memory import GuestMemory

PAGE_SHIFT = 12  # VIRTIO_BALLOON_PFN_SHIFT: the balloon always speaks 4 KiB pages
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PFNS_PER_BUFFER = 4096
CHUNK_PAGES = 1 << 18              # 1 GiB of guest-physical memory per bitmap chunk
MAX_BITMAP_CHUNKS = 4096           # 4 TiB of guest RAM tracked, 128 MiB of bits at most

Run = tuple[int, int]  # (first pfn, count)


def parse_size(text: str) -> int:
    """'64M', '1G', '4096' (bytes) or '100p' / '100pages' (4 KiB pages) -> pages."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?)(i?b?|ages?)?\s*", text.lower())
    if not m:
        raise DeviceError(f"cannot parse size {text!r} (e.g. 64M, 1G, 4096, 100p)")
    number, unit = int(m.group(1)), m.group(2)
    if unit == "p":
        return number
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return (number * scale) // PAGE_SIZE


def read_pfns(memory: GuestMemory, views: Sequence[memoryview]) -> tuple[list[int], int]:
    """The PFNs of a buffer, at most MAX_PFNS_PER_BUFFER of them (little
    endian u32, possibly split across buffers), and how many more the
    buffer held (ignored)."""
    budget = 4 * MAX_PFNS_PER_BUFFER
    total = sum(len(v) for v in views)
    data = bytearray()
    for view in views:
        n = min(len(view), budget - len(data))
        if n <= 0:
            break
        data += memory.read(view[:n])
    pfns = array("I")
    pfns.frombytes(bytes(data[:len(data) // 4 * 4]))
    if sys.byteorder == "big":  # virtio is little-endian
        pfns.byteswap()
    return list(pfns), max(0, total // 4 - len(pfns))


def runs(pfns: Iterable[int]) -> list[Run]:
    """Coalesce page numbers into sorted (first, count) runs: one madvise a run."""
    out: list[Run] = []
    for pfn in sorted(set(pfns)):
        if out and out[-1][0] + out[-1][1] == pfn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pfn, 1))
    return out


def in_ram(memory: GuestMemory, run_list: Iterable[Run]) -> tuple[list[Run], int]:
    """The parts of the runs that are guest RAM, and how many pages were
    not (the guest's error)."""
    kept: list[Run] = []
    outside = 0
    for first, count in run_list:
        inside = 0
        for gpa, length in memory.ram_pieces(first << PAGE_SHIFT, count << PAGE_SHIFT):
            # Pages that straddle a region edge are not whole RAM pages.
            lo = -(-gpa // PAGE_SIZE)
            hi = (gpa + length) // PAGE_SIZE
            if hi > lo:
                kept.append((lo, hi - lo))
                inside += hi - lo
        outside += count - inside
    return kept, outside


class PageBitmap:
    """One bit per guest page the balloon holds; see the module docstring."""

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}
        self.count = 0
        self.untracked = 0  # pages beyond MAX_BITMAP_CHUNKS

    def clear(self) -> None:
        self._chunks.clear()
        self.count = 0
        self.untracked = 0

    def __bool__(self) -> bool:
        return self.count > 0

    def _update(self, first: int, count: int, value: bool) -> None:
        pfn, end = first, first + count
        while pfn < end:
            key, bit = divmod(pfn, CHUNK_PAGES)
            stop = min(end, (key + 1) * CHUNK_PAGES)
            chunk = self._chunks.get(key)
            if chunk is None:
                if not value:
                    pfn = stop
                    continue
                if len(self._chunks) >= MAX_BITMAP_CHUNKS:
                    self.untracked += stop - pfn
                    pfn = stop
                    continue
                chunk = self._chunks[key] = bytearray(CHUNK_PAGES // 8)
            for b in range(bit, bit + stop - pfn):
                byte, mask = b >> 3, 1 << (b & 7)
                was = bool(chunk[byte] & mask)
                if value and not was:
                    chunk[byte] |= mask
                    self.count += 1
                elif not value and was:
                    chunk[byte] &= ~mask & 0xFF
                    self.count -= 1
            pfn = stop

    def set(self, first: int, count: int) -> None:
        self._update(first, count, True)

    def unset(self, first: int, count: int) -> None:
        self._update(first, count, False)
