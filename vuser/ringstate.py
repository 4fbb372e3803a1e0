"""Packed ring state that outlives the vuser process: a small file per
socket, so that a restarted vuser resumes packed rings where it left them.

Why: when a vhost-user back-end dies, QEMU cannot read a packed ring's
state back (there is no GET_VRING_BASE from a dead back-end, and unlike a
split ring's used->idx nothing in guest memory holds it: QEMU's
virtio_queue_packed_restore_last_avail_idx does nothing).  On reconnect
QEMU sends SET_VRING_BASE with the state of the last time it started the
ring -- stale -- and a back-end that believed it would read the guest's
descriptors from the wrong slot with the wrong wrap counter.  So the C
ring keeps its live state (``struct vu_vring``, updated by every pop and
push, no extra work) inside a shared mapping of this file; the kernel keeps
what was stored even if the process is killed.

When a ring starts, the record of its queue is believed only if all of
this holds: it was not ended by GET_VRING_BASE or a device reset (then the
front-end knows the state), the size and the three ring addresses are the
same, the front-end sends the very base it sent when the record began (it
has not learned anything newer), and guest memory agrees (the slot before
the recorded used index holds a used descriptor of its lap).  The ring
then resumes at the recorded used index (both halves: buffers the dead
process had taken but not completed are taken again, as QEMU does for
split rings).  Split rings need none of this (used->idx is in guest memory).

File handling: created 0600 with O_NOFOLLOW, only a regular file owned by
this user is reused, its size fixed by the queue count (another size: it
starts over).  The file is kept when vuser exits -- that is its purpose.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from typing import Any, Callable

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from .rings.packed_ref import packed_base
from .virtio import EventFlags

try:
    from vuser._native import ffi as _ffi
except ImportError:  # no C ring: nothing to keep
    _ffi = None

log = logging.getLogger(__name__)

HEADER = Struct(
    "magic" / Const(b"VURS"),
    "version" / Const(1, Int16ul),
    "valid" / Int8ul,           # 0 after GET_VRING_BASE or a reset: the front-end knows the state
    "reserved" / Bytes(1),
    "num" / Int32ul,
    "sent_base" / Int32ul,      # SET_VRING_BASE's value when the record began
    "desc" / Int64ul,
    "driver" / Int64ul,
    "device" / Int64ul,
)
RING_OFFSET = 64                # struct vu_vring, 8-aligned, after the header
RECORD_SIZE = 256               # header and struct vu_vring, with room to grow


def default_path(socket_path: str) -> str:
    """Where ``vuser run`` keeps the ring state of ``socket_path``."""
    return socket_path + ".rings"


class RingStateFile:
    """The records of one socket's queues; see the module docstring."""

    def __init__(self, path: str, nqueues: int) -> None:
        """Nothing is opened until a packed ring needs it (a front-end that
        never negotiates packed rings leaves no file)."""
        if _ffi is None:
            raise RuntimeError("ring state needs the C extension vuser._native")
        assert HEADER.sizeof() <= RING_OFFSET and RING_OFFSET + _ffi.sizeof("struct vu_vring") <= RECORD_SIZE
        self.path = path
        self.nqueues = nqueues
        self._map: mmap.mmap | None = None
        self._failed = False

    @property
    def usable(self) -> bool:
        """Open (or opened now); False, with one warning, if the file
        cannot be: packed rings then keep their state in memory only."""
        if self._map is None and not self._failed:
            try:
                self._open()
            except OSError as exc:
                self._failed = True
                log.warning("ring state file %s: %s; packed rings will not resume after a restart",
                            self.path, exc.strerror or exc)
        return self._map is not None

    def _open(self) -> None:
        size = RECORD_SIZE * self.nqueues
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(0, "not a regular file of this user")
            if st.st_size != size:
                os.ftruncate(fd, 0)     # another device layout: start over
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)

    def ring_memory(self, index: int) -> memoryview:
        """The bytes of queue ``index``'s ``struct vu_vring``."""
        at = RECORD_SIZE * index + RING_OFFSET
        return self._view[at:at + RECORD_SIZE - RING_OFFSET]

    def _header(self, index: int) -> Any:
        at = RECORD_SIZE * index
        try:
            return HEADER.parse(bytes(self._view[at:at + HEADER.sizeof()]))
        except Exception:  # a record never written (zeroes) or foreign bytes
            return None

    def resume(self, index: int, num: int, gpas: tuple[int, int, int], sent_base: int,
               device_area: Callable[[], tuple[int, int]]) -> int | None:
        """The base to start queue ``index``'s packed ring from instead of
        ``sent_base``, or None to believe the front-end.  ``device_area()``
        reads (off_wrap, flags) of the device event suppression structure
        from guest memory."""
        hdr = self._header(index)
        if hdr is None or not hdr.valid or hdr.num != num or (hdr.desc, hdr.driver, hdr.device) != gpas \
                or hdr.sent_base != sent_base:
            return None
        ring = _ffi.cast("struct vu_vring *", _ffi.from_buffer(self.ring_memory(index)))
        used, wrap = int(ring.used_idx), int(ring.used_wrap) & 1
        if not ring.packed or used >= num:
            return None
        base = packed_base(used, wrap, used, wrap)
        if base == packed_base(sent_base & 0x7FFF, sent_base >> 15 & 1, sent_base & 0x7FFF, sent_base >> 15 & 1):
            return None             # nothing happened since: the front-end is right
        area = device_area()
        if not _device_area_matches(ring, sent_base, *area):
            log.info("queue %d: a packed ring record (avail %d/%d, notifications %s) does not match the "
                     "device event structure in guest memory (off_wrap %#x, flags %d); the front-end's base %#x "
                     "is believed", index, ring.last_avail_idx, ring.avail_wrap, "on" if ring.notification else "off",
                     *area, sent_base)
            return None
        log.warning("queue %d: resuming the packed ring at slot %d, wrap %d, where this back-end left it: "
                    "the front-end's SET_VRING_BASE %#x predates the back-end's restart", index, used, wrap,
                    sent_base)
        return base

    def started(self, index: int, num: int, gpas: tuple[int, int, int], sent_base: int) -> None:
        at = RECORD_SIZE * index
        self._view[at:at + HEADER.sizeof()] = HEADER.build(dict(
            valid=1, reserved=b"\0", num=num, sent_base=sent_base, desc=gpas[0], driver=gpas[1], device=gpas[2]))

    def stopped(self, index: int | None = None) -> None:
        """The front-end learned the state (GET_VRING_BASE) or the device
        was reset: the record(s) must not be believed again."""
        if self._map is None:
            return
        for i in range(self.nqueues) if index is None else (index,):
            if self._header(i) is not None:
                self._view[RECORD_SIZE * i + 6] = 0   # HEADER.valid

    def close(self) -> None:
        """Only once no ring uses the records any more (process exit)."""
        if self._map is not None:
            self._view.release()
            self._map.close()
            self._map = None


def _device_area_matches(ring: Any, sent_base: int, off_wrap: int, flags: int) -> bool:
    """Does the device event suppression structure hold what ``ring`` last
    wrote there (with EVENT_IDX, the off_wrap it recorded writing; the
    flags QEMU may have changed since, turning notifications on or off
    while the link was down), or QEMU's own write at the stale base?
    Without EVENT_IDX the back-end writes nothing recognisable: believed."""
    if flags == EventFlags.DESC and off_wrap == sent_base & 0xFFFF:
        return True
    if ring.event_idx:
        return off_wrap == int(ring.event_written) and flags in (EventFlags.DESC, EventFlags.DISABLE,
                                                                 EventFlags.ENABLE)
    return flags in (EventFlags.ENABLE, EventFlags.DISABLE)
