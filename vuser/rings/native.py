"""The rings in C (``native/vring.c``, ``native/vring_packed.c``) as
``vuser.rings.base.Ring``s: ``NativeSplitRing`` and ``NativePackedRing``.

These classes only move arguments across the cffi boundary: the ring walk,
the checks and the barriers are C.  ``native`` is the ``struct vu_vring *``
that C data paths (net) take directly; one struct serves both layouts.

Resource handling: the cffi handles on the three ring areas are released
in ``clear`` (or when ``rebind`` replaces them); the output arrays and a
packed ring's id table are owned here and reused across pops.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any, ClassVar, Sequence

from ..virtio import AvailFlag, DescFlag, EventFlags, UsedFlag
from .base import (
    MAX_CHAIN_DESCS,
    DirtyLogTarget,
    MAX_INDIRECT,
    MAX_QUEUE_SIZE,
    MAX_REGIONS,
    NO_BYTE_LIMIT,
    SEG_WRITE,
    PopResult,
    RingMemory,
)
from .errors import ERROR_NAMES
from .packed_ref import PyPackedRing, packed_area_sizes
from .split_ref import PySplitRing, split_area_sizes

try:
    from vuser._native import ffi as _ffi, lib as _lib
except ImportError:  # the pure-Python rings still work
    _ffi = _lib = None

# Host-order layouts of struct vu_chain and struct vu_seg (checked below).
_CHAIN = struct.Struct("=IIIIIHH")  # first_seg, nsegs, nread, out_len, in_len, head, ndescs
_SEG = struct.Struct("=QIHH")       # offset, len, region, flags

if _ffi is not None:
    assert _ffi.sizeof("struct vu_chain") == _CHAIN.size
    assert _ffi.sizeof("struct vu_seg") == _SEG.size
    for _code, _name in ERROR_NAMES.items():
        assert getattr(_lib, _name) == _code, _name
    assert (_lib.VU_MAX_REGIONS, _lib.VU_MAX_QUEUE_SIZE, _lib.VU_MAX_INDIRECT, _lib.VU_SEG_WRITE,
            _lib.VU_MAX_CHAIN_DESCS) == (MAX_REGIONS, MAX_QUEUE_SIZE, MAX_INDIRECT, SEG_WRITE, MAX_CHAIN_DESCS)
    # The C header's copies of the spec's flags (C cannot import virtio.py).
    assert (_lib.VU_DESC_F_NEXT, _lib.VU_DESC_F_WRITE, _lib.VU_DESC_F_INDIRECT, _lib.VU_DESC_F_AVAIL,
            _lib.VU_DESC_F_USED) == (DescFlag.NEXT, DescFlag.WRITE, DescFlag.INDIRECT, DescFlag.AVAIL, DescFlag.USED)
    assert (_lib.VU_AVAIL_F_NO_INTERRUPT, _lib.VU_USED_F_NO_NOTIFY) == (AvailFlag.NO_INTERRUPT, UsedFlag.NO_NOTIFY)
    assert (_lib.VU_EVENT_F_ENABLE, _lib.VU_EVENT_F_DISABLE, _lib.VU_EVENT_F_DESC) == \
        (EventFlags.ENABLE, EventFlags.DISABLE, EventFlags.DESC)


def native_available() -> bool:
    return _lib is not None


class _NativeRing:
    """A ``struct vu_vring`` and the vring.c functions on it."""

    layout: ClassVar[str]
    impl: ClassVar[str] = "native"
    STATE: ClassVar[tuple[str, ...]]
    _PACKED: ClassVar[bool] = False

    def __init__(self, memory: memoryview | None = None) -> None:
        """``memory``: where the ``struct vu_vring`` lives (a shared mapping
        that outlives the process, ``vuser.ringstate``); default: here."""
        if _lib is None:
            raise RuntimeError("vuser._native is not built (pip install . or python native/build_vring.py)")
        if memory is None:
            self._vr: Any = _ffi.new("struct vu_vring *")
            self._vr_handle: Any = None
        else:
            if len(memory) < _ffi.sizeof("struct vu_vring"):
                raise ValueError("no room for a struct vu_vring")
            self._vr_handle = _ffi.from_buffer(memory, require_writable=True)
            self._vr = _ffi.cast("struct vu_vring *", self._vr_handle)
        self._counts = _ffi.new("uint32_t[2]")
        self._handles: list[Any] = []
        self._chains: Any = _ffi.NULL
        self._segs: Any = _ffi.NULL
        self._used: Any = _ffi.NULL
        self._ids: Any = _ffi.NULL
        self._chain_cap = self._seg_cap = 0

    @property
    def native(self) -> Any:
        return self._vr

    def clear(self) -> None:
        self._vr.num = 0
        self._release()

    def _release(self) -> None:
        for h in self._handles:
            _ffi.release(h)
        self._handles = []

    def _pointers(self, areas: Sequence[memoryview]) -> list[Any]:
        """(pointer, length) of each area, keeping the handles alive."""
        handles = [_ffi.from_buffer(v) for v in areas]
        self._release()
        self._handles = handles
        return [x for h, v in zip(handles, areas) for x in (_ffi.cast("uint8_t *", h), len(v))]

    def init(self, num: int, areas: Sequence[memoryview], event_idx: bool, base: int,
             in_order: bool = False) -> int:
        self.clear()
        pointers = self._pointers(areas)
        if 0 < num <= MAX_QUEUE_SIZE and num > self._chain_cap:
            self._chains = _ffi.new("struct vu_chain[]", num)
            self._used = _ffi.new("struct vu_used_elem[]", num)
            if self._PACKED:
                self._ids = _ffi.new("uint32_t[]", 2 * num)
            self._chain_cap = num
        flags = (_lib.VU_RING_PACKED if self._PACKED else 0) | (_lib.VU_RING_EVENT_IDX if event_idx else 0) | \
            (_lib.VU_RING_IN_ORDER if in_order else 0)
        ids_len = 2 * self._chain_cap if self._ids != _ffi.NULL else 0
        return int(_lib.vu_vring_init(self._vr, num, *pointers, flags, base & 0xFFFF_FFFF, self._ids, ids_len))

    def set_log(self, log: DirtyLogTarget | None, used_gpa: int, desc_gpa: int) -> None:
        vr = self._vr
        native = log.native if log is not None else None
        if log is not None and native is None:
            raise ValueError("a C ring marks pages in a C dirty log (struct vu_log)")
        vr.dirty = native if native is not None else _ffi.NULL
        vr.dirty_used = used_gpa & 0xFFFF_FFFF_FFFF_FFFF
        vr.dirty_desc = desc_gpa & 0xFFFF_FFFF_FFFF_FFFF

    def rebind(self, areas: Sequence[memoryview]) -> int:
        old = self._handles
        self._handles = []                 # kept alive until C points elsewhere
        pointers = self._pointers(areas)
        rc = int(_lib.vu_vring_rebind(self._vr, *pointers))
        for h in old:
            _ffi.release(h)
        return rc

    def base(self) -> int:
        return int(_lib.vu_vring_base(self._vr))

    def snapshot(self) -> dict[str, int]:
        state = {k: int(getattr(self._vr, k)) for k in self.STATE}
        if self._vr.packed and self._vr.num:
            state.update((f"ids[{i}]", int(self._vr.ids[i])) for i in range(2 * self._vr.num))
        return state

    @property
    def num(self) -> int:
        return int(self._vr.num)

    @property
    def used_idx(self) -> int:
        return int(self._vr.used_idx)

    @property
    def popped(self) -> int:
        return int(self._vr.popped)

    @property
    def broken(self) -> bool:
        return bool(self._vr.broken)

    @property
    def error(self) -> int:
        return int(self._vr.error)

    # ------------------------------------------------------------ data path

    def pop(self, memory: RingMemory, max_chains: int, max_segs: int,
            max_bytes: int = NO_BYTE_LIMIT) -> PopResult:
        rc, nc, ns, chains, segs = self.pop_raw(memory, max_chains, max_segs, max_bytes)
        if not nc:
            return rc, [], []
        return (rc, list(_CHAIN.iter_unpack(_ffi.buffer(chains, _CHAIN.size * nc))),
                list(_SEG.iter_unpack(_ffi.buffer(segs, _SEG.size * ns))))

    def pop_raw(self, memory: RingMemory, max_chains: int, max_segs: int,
                max_bytes: int = NO_BYTE_LIMIT) -> tuple[int, int, int, Any, Any]:
        """One vu_vring_pop into arrays owned here, without building Python
        objects: (rc, n_chains, n_segs, chains, segs); the arrays are
        reused by the next pop."""
        if max_segs > self._seg_cap:
            self._segs = _ffi.new("struct vu_seg[]", max_segs)
            self._seg_cap = max_segs
        counts = self._counts
        rc = int(_lib.vu_vring_pop(self._vr, memory.native, self._chains, min(max_chains, self._chain_cap),
                                   self._segs, max_segs, max_bytes, counts, counts + 1))
        return rc, int(counts[0]), int(counts[1]), self._chains, self._segs

    def push(self, elems: Sequence[tuple[int, int]]) -> int:
        n = len(elems)
        try:
            if 0 < n <= self._chain_cap:
                struct.pack_into(f"={2 * n}I", _ffi.buffer(self._used, 8 * n), 0,
                                 *itertools.chain.from_iterable(elems))
            elif n:  # more than any ring here holds: C refuses without reading them
                struct.pack(f"={2 * n}I", *itertools.chain.from_iterable(elems))
        except struct.error:
            raise ValueError(f"used elements out of range: {list(elems)!r}") from None
        return int(_lib.vu_vring_push(self._vr, self._used, n))

    def unpop(self, n: int) -> int:
        return int(_lib.vu_vring_unpop(self._vr, n))

    def need_notify(self) -> int:
        return int(_lib.vu_vring_need_notify(self._vr))

    def set_notification(self, enable: bool) -> None:
        _lib.vu_vring_set_notification(self._vr, 1 if enable else 0)

    def avail_pending(self) -> int:
        return int(_lib.vu_vring_avail_pending(self._vr))


class NativeSplitRing(_NativeRing):
    """The split ring (spec 2.7) in C."""

    layout: ClassVar[str] = "split"
    STATE = PySplitRing.STATE

    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        return split_area_sizes(num)

    @staticmethod
    def num_ok(num: int) -> bool:
        return PySplitRing.num_ok(num)


class NativePackedRing(_NativeRing):
    """The packed ring (spec 2.8) in C."""

    layout: ClassVar[str] = "packed"
    STATE = PyPackedRing.STATE

    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        return packed_area_sizes(num)

    @staticmethod
    def num_ok(num: int) -> bool:
        return PyPackedRing.num_ok(num)
    _PACKED = True
