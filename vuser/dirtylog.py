"""The dirty page log of live migration (vhost-user.rst, "Migration").

While the front-end migrates the guest, it wants to know every page of
guest memory the back-end wrote: with protocol feature LOG_SHMFD it hands
over a shared file (SET_LOG_BASE: fd, size, offset) holding one bit per
4 KiB guest-physical page, ``log[page / 8] |= 1 << page % 8``, and turns
logging on and off with VHOST_F_LOG_ALL in SET_FEATURES (and
VHOST_VRING_F_LOG per ring in SET_VRING_ADDR).

``DirtyLog`` is one connection's log: the mapping of that file (a
``memory.Region``: checked, sealed against shrinking where possible,
guarded against SIGBUS under the connection's guard owner) and the C
``struct vu_log`` the data paths mark pages in (``native/log.h``).  A later
SET_LOG_BASE replaces the mapping (memory hot-plug resizes the log); the
C struct stays, so rings and memory tables pointing at it follow.
``BitmapLog`` is ``vu_log_range`` in pure Python: the twin the Python
rings are compared with, and the fallback without the C extension (not
atomic: a single-threaded vuser only races the front-end's clearing,
which at worst leaves a bit set twice).

Resource handling: the fd passed to ``replace`` is owned from then on (the
region keeps it, or closes it when mapping fails); ``clear`` unmaps and
closes.  Error handling: anything wrong with the file raises
``MemoryAccessError``; a log file that shrinks under its mapping makes
``write`` raise it (the C paths return VU_ERR_FAULT and the connection
closes, as for guest memory).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

from .memory import MemoryAccessError, Region, RegionSpec, guarded_read

try:
    from vuser._native import ffi as _ffi, lib as _lib
except ImportError:  # the pure-Python path still works
    _ffi = _lib = None

log = logging.getLogger(__name__)

LOG_PAGE = 4096                 # VHOST_LOG_PAGE
# The largest log accepted: 1 GiB of bits covers 32 TiB of guest-physical
# space (QEMU sizes it to the highest region end), and keeps 8 * size far
# below 2^64 (native/log.h).
MAX_LOG_SIZE = 1 << 30
_U64 = (1 << 64) - 1

if _lib is not None:
    assert _lib.VU_LOG_PAGE == LOG_PAGE


class BitmapLog:
    """``struct vu_log`` and ``vu_log_range`` (native/log.h) in Python,
    over any writable buffer: the same bits, the same counters."""

    def __init__(self, bitmap: bytearray | memoryview) -> None:
        self.bitmap = bitmap
        self.updates = 0
        self.outside = 0

    native: Any = None

    def write(self, gpa: int, length: int) -> None:
        if not length:
            return
        page = gpa // LOG_PAGE
        end = gpa + length - 1
        last = (_U64 if end > _U64 else end) // LOG_PAGE
        limit = len(self.bitmap) * 8
        self.updates += 1
        if last >= limit:
            self.outside += 1
            if page >= limit:
                return
            last = limit - 1
        bitmap = self.bitmap
        for p in range(page, last + 1):
            bitmap[p >> 3] |= 1 << (p & 7)


class DirtyLog:
    """One connection's dirty page log; see the module docstring."""

    def __init__(self, owner: int = 0) -> None:
        """``owner``: the guard owner of the connection's memory (a fault
        in the log's file ends that connection)."""
        self.owner = owner
        self._region: Region | None = None
        self._ref: BitmapLog | None = None
        # The C struct data paths point at; it lives as long as this object.
        self.native: Any = _ffi.new("struct vu_log *") if _ffi is not None else None

    @property
    def mapped(self) -> bool:
        return self._region is not None

    @property
    def size(self) -> int:
        """Bytes of bitmap (it covers 8 * size pages)."""
        return self._region.size if self._region is not None else 0

    @property
    def updates(self) -> int:
        """Log writes so far (SET_LOG_FD is signalled when this moves)."""
        if self.native is not None:
            return int(self.native.updates)
        return self._ref.updates if self._ref is not None else 0

    @property
    def outside(self) -> int:
        """Log writes that reached past the log's end (their bits beyond it are lost)."""
        if self.native is not None:
            return int(self.native.outside)
        return self._ref.outside if self._ref is not None else 0

    def replace(self, fd: int, size: int, offset: int) -> None:
        """SET_LOG_BASE: map ``[offset, offset + size)`` of ``fd`` as the log
        (taking ownership of ``fd``) and drop the previous one.  A size of 0
        leaves no log.  On failure the previous log stays."""
        if size == 0 or size > MAX_LOG_SIZE:
            os.close(fd)
            if size:
                raise MemoryAccessError(f"dirty log of {size:#x} bytes is larger than {MAX_LOG_SIZE:#x}")
            self.clear()
            return
        try:
            region = Region(fd, RegionSpec(0, size, 0, offset), self.owner)
        except MemoryAccessError as exc:
            raise MemoryAccessError(f"dirty log: {exc}") from None
        old, self._region = self._region, region
        if self.native is not None:
            self.native.bitmap = region.host
            self.native.size = size
        else:
            self._ref = BitmapLog(region.view)
        if old is not None:
            old.close()
        log.debug("dirty log: %#x bytes at offset %#x (pages below %#x)", size, offset, 8 * size * LOG_PAGE)

    def clear(self) -> None:
        """No log any more (disconnect): unmap it and close its fd."""
        if self.native is not None:
            self.native.bitmap = _ffi.NULL
            self.native.size = 0
        self._ref = None
        if self._region is not None:
            region, self._region = self._region, None
            region.close()

    def write(self, gpa: int, length: int) -> None:
        """Mark the pages of guest-physical ``[gpa, gpa + length)`` dirty.
        MemoryAccessError if the log's file shrank under its mapping."""
        if self.native is not None:
            if _lib.vu_log_write(self.native, gpa & _U64, length) != 0:
                raise MemoryAccessError("dirty log faulted: the front-end shrank its file under the mapping")
        elif self._ref is not None:
            self._ref.write(gpa & _U64, length)

    def pages(self) -> Iterator[int]:
        """The guest-physical addresses of the pages marked, in order
        (for status and tests; the front-end clears bits as it collects)."""
        if self._region is None:
            return
        for i, byte in enumerate(guarded_read(self._region.view)):
            if byte:
                for bit in range(8):
                    if byte >> bit & 1:
                        yield (8 * i + bit) * LOG_PAGE
