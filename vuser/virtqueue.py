"""Virtqueue façade: split rings (virtio 1.x, spec 2.7) over ``GuestMemory``.

``VirtQueue`` is what the framework and devices use.  The ring walking is
``native/vring.c`` (``impl="native"``, the default) or its pure-Python twin
``vuser/ring_ref.py`` (``impl="python"``); both give identical results.
One ``pop_all`` is one call into the ring code that drains every available
chain; devices get ``Chain`` objects whose buffers are memoryviews slicing
the region mappings (no copy).  Semantics (zero-length descriptors, buffers
crossing adjacent regions, segment space, sticky errors) are documented in
``native/vring.h``.

Error handling
    Garbage the guest put in the ring never raises out of ``pop_all``: the
    chains before the bad one are returned, ``error`` is set to a
    ``RingError`` naming the fault, and the queue stays broken (later pops
    return nothing) until it is configured again; the device then needs a
    reset (style.md, "two error families").  Rings that do not lie in guest
    memory raise ``MemoryAccessError`` from ``configure``; a bad queue size
    raises ``ValueError``; so do bad arguments to ``push``.

Resource handling
    The queue holds views of its three ring areas, which keeps their
    mapping alive while it exists.  When the memory table changes under a
    configured queue (``GuestMemory.generation`` moves) the queue finds its
    rings again at the same guest-physical addresses, keeping its indexes;
    if they are gone it becomes unconfigured (pops return nothing).

Raw batch API (for future C data paths)
    ``ring`` is the ``struct vu_vring *`` and ``memory.native`` the
    ``struct vu_mem *``; ``pop_raw`` fills ``chain_buffer`` / ``seg_buffer``
    without building Python objects.
"""

from __future__ import annotations

import itertools
import logging
import struct
from dataclasses import dataclass
from typing import Any, Sequence

from . import ring_ref
from .memory import GuestMemory, MemoryAccessError

try:
    from vuser._native import ffi as _ffi, lib as _lib
except ImportError:
    _ffi = _lib = None

__all__ = ["Chain", "RingError", "VirtQueue", "MemoryAccessError", "native_available"]

log = logging.getLogger(__name__)

# Host-order layouts of struct vu_chain and struct vu_seg (checked below).
_CHAIN = struct.Struct("=IIIIIHH")  # first_seg, nsegs, nread, out_len, in_len, head, reserved
_SEG = struct.Struct("=QIHH")       # offset, len, region, flags
_U32_MAX = 0xFFFF_FFFF

if _ffi is not None:
    assert _ffi.sizeof("struct vu_chain") == _CHAIN.size
    assert _ffi.sizeof("struct vu_seg") == _SEG.size
    for _name, _code in vars(ring_ref).items():
        if _name.startswith("ERR_"):
            assert getattr(_lib, "VU_" + _name) == _code, _name

DESCRIPTIONS = {
    ring_ref.ERR_AVAIL_IDX: "avail index moved more than the queue size ahead",
    ring_ref.ERR_HEAD: "avail ring names a head descriptor beyond the table",
    ring_ref.ERR_NEXT: "descriptor next index beyond its table",
    ring_ref.ERR_LOOP: "descriptor chain loops",
    ring_ref.ERR_DESC_ADDR: "buffer outside guest memory",
    ring_ref.ERR_CHAIN_LEN: "chain longer than 4 GiB - 1",
    ring_ref.ERR_INDIRECT_NEXT: "indirect descriptor with NEXT set",
    ring_ref.ERR_INDIRECT_NESTED: "indirect descriptor inside an indirect table",
    ring_ref.ERR_INDIRECT_POS: "indirect descriptor that is not the chain head",
    ring_ref.ERR_INDIRECT_LEN: "indirect table length 0, not a multiple of 16 or too long",
    ring_ref.ERR_INDIRECT_ADDR: "indirect table not inside one guest memory region",
    ring_ref.ERR_ORDER: "device-readable descriptor after a device-writable one",
    ring_ref.ERR_CHAIN_SEGS: "chain has more segments than the queue's segment space",
    ring_ref.ERR_NOT_READY: "ring not configured",
    ring_ref.ERR_NUM: "queue size not a power of 2 in 1..32768",
    ring_ref.ERR_RING_SIZE: "ring area too small",
    ring_ref.ERR_PUSH_COUNT: "more used elements than the queue size in one batch",
    ring_ref.ERR_PUSH_ID: "used element id beyond the queue size",
}


def native_available() -> bool:
    return _lib is not None


class RingError(Exception):
    """The guest put garbage in a ring (``code`` is a VU_ERR_* value)."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.name = ring_ref.ERROR_NAMES.get(code, f"VU_ERR_{-code}")
        super().__init__(f"{self.name}: {DESCRIPTIONS.get(code, 'unknown ring error')}")


@dataclass(slots=True)
class Chain:
    """One descriptor chain: device-readable buffers, then device-writable
    ones, as views into guest memory.  Give ``head`` back with ``push``."""
    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    out_len: int
    in_len: int


def _check_num(num: int) -> None:
    if not 1 <= num <= ring_ref.MAX_QUEUE_SIZE or num & (num - 1):
        raise ValueError(f"queue size {num} is not a power of 2 in 1..{ring_ref.MAX_QUEUE_SIZE}")


class VirtQueue:
    """One split virtqueue; see the module docstring."""

    def __init__(self, memory: GuestMemory, *, impl: str = "native", max_segs: int | None = None) -> None:
        if impl not in ("native", "python"):
            raise ValueError(f"impl must be 'native' or 'python', not {impl!r}")
        if impl == "native" and _lib is None:
            raise RuntimeError("vuser._native is not built (pip install . or python native/build_vring.py)")
        self.memory = memory
        self.impl = impl
        self._max_segs_wanted = max_segs
        self.error: RingError | None = None
        self._params: tuple[int, int, int, int, bool] | None = None
        self._generation = -1
        self._stopped_at = 0
        self._areas: list[Any] = []      # ring views (+ cffi handles) keeping the rings mapped
        self._ro: list[memoryview] = []  # per region: read-only view (device-readable buffers)
        self._rw: list[memoryview] = []  # per region: writable view (device-writable buffers)
        self._seg_cap = 0
        self._ref = ring_ref.RefVring()
        self._vr: Any = None
        if impl == "native":
            self._vr = _ffi.new("struct vu_vring *")
            self._counts = _ffi.new("uint32_t[2]")
            self.chain_buffer: Any = _ffi.NULL
            self.seg_buffer: Any = _ffi.NULL
            self._used: Any = _ffi.NULL
            self._chain_cap = 0

    # ------------------------------------------------------------ set-up

    def configure(self, num: int, desc_gpa: int, avail_gpa: int, used_gpa: int, *,
                  event_idx: bool, last_avail_idx: int) -> None:
        """SET_VRING_NUM/ADDR/BASE: (re)start the ring with fresh state
        (used_idx is read from the used ring; errors are cleared)."""
        _check_num(num)
        self._detach()
        self._params = None
        self._attach(num, desc_gpa, avail_gpa, used_gpa)
        rc = self._init(num, bool(event_idx), last_avail_idx & 0xFFFF)
        if rc:  # cannot happen after the checks above
            raise RingError(rc)
        self._params = (num, desc_gpa, avail_gpa, used_gpa, bool(event_idx))
        self.error = None

    def _attach(self, num: int, desc_gpa: int, avail_gpa: int, used_gpa: int) -> None:
        """Find the three ring areas in memory (MemoryAccessError if not)."""
        mem = self.memory
        desc = mem.gpa_view(desc_gpa, 16 * num)
        avail = mem.gpa_view(avail_gpa, 6 + 2 * num)
        used = mem.gpa_view(used_gpa, 6 + 8 * num, writable=True)
        self._areas = [desc, avail, used]
        self._ro = [r.readonly for r in mem.regions]
        self._rw = [r.view for r in mem.regions]
        self._generation = mem.generation
        cap = self._max_segs_wanted or 2 * max(num, 1024)
        if self.impl == "native":
            handles = [_ffi.from_buffer(v) for v in (desc, avail, used)]
            self._areas += handles
            self._ptrs = [_ffi.cast("uint8_t *", h) for h in handles]
            if cap != self._seg_cap:
                self.seg_buffer = _ffi.new("struct vu_seg[]", cap)
            if num > self._chain_cap:
                self.chain_buffer = _ffi.new("struct vu_chain[]", num)
                self._used = _ffi.new("struct vu_used_elem[]", num)
                self._chain_cap = num
        self._seg_cap = cap

    def _init(self, num: int, event_idx: bool, last_avail_idx: int) -> int:
        desc, avail, used = self._areas[:3]
        if self.impl == "native":
            d, a, u = self._ptrs
            return int(_lib.vu_vring_init(self._vr, num, d, len(desc), a, len(avail), u, len(used),
                                          event_idx, last_avail_idx))
        return self._ref.init(num, desc, avail, used, event_idx, last_avail_idx)

    def _detach(self) -> None:
        """Forget the ring areas; the ring code will not touch memory until
        the next init (num = 0)."""
        self._clear_ring()
        for a in self._areas[3:]:
            _ffi.release(a)
        for a in self._areas[:3]:
            a.release()
        self._areas = []
        self._ro = []
        self._rw = []

    def _ready(self) -> bool:
        """Configured, with ring pointers valid for the current memory table."""
        if self._params is None:
            return False
        if self._generation != self.memory.generation:
            self._follow_memory()
        return self._params is not None

    def _follow_memory(self) -> None:
        assert self._params is not None
        num, desc_gpa, avail_gpa, used_gpa, _ = self._params
        state = self._save_state()
        self._detach()
        try:
            self._attach(num, desc_gpa, avail_gpa, used_gpa)
        except MemoryAccessError as exc:
            log.debug("ring no longer in guest memory after a table change: %s", exc)
            self._stopped_at = state["last_avail_idx"]
            self._params = None
            return
        self._init(num, self._params[4], state["last_avail_idx"])
        self._restore_state(state)

    _STATE = ("last_avail_idx", "used_idx", "signalled_used", "signalled_used_valid",
              "notification", "broken", "error")

    def _save_state(self) -> dict[str, int]:
        src = self._vr if self.impl == "native" else self._ref
        return {k: int(getattr(src, k)) for k in self._STATE}

    def _restore_state(self, state: dict[str, int]) -> None:
        if self.impl == "native":
            for k, v in state.items():
                setattr(self._vr, k, v)
        else:
            for k, v in state.items():
                setattr(self._ref, k, bool(v) if k in ("signalled_used_valid", "notification", "broken") else v)

    def _clear_ring(self) -> None:
        if self.impl == "native":
            self._vr.num = 0
        else:
            self._ref = ring_ref.RefVring()

    # ------------------------------------------------------------ state

    @property
    def configured(self) -> bool:
        return self._ready()

    @property
    def num(self) -> int:
        return self._params[0] if self._params else 0

    @property
    def event_idx(self) -> bool:
        return self._params[4] if self._params else False

    @property
    def last_avail_idx(self) -> int:
        if not self._ready():
            return self._stopped_at
        return int(self._vr.last_avail_idx) if self.impl == "native" else self._ref.last_avail_idx

    @property
    def used_idx(self) -> int:
        if not self._ready():
            return 0
        return int(self._vr.used_idx) if self.impl == "native" else self._ref.used_idx

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def ring(self) -> Any:
        """The ``struct vu_vring *`` (native only) for C data paths."""
        self._ready()
        return self._vr

    def stop(self) -> int:
        """GET_VRING_BASE: the exact avail index to resume from; the queue
        is unconfigured afterwards (chains not yet pushed are dropped)."""
        idx = self.last_avail_idx
        self._stopped_at = idx
        self._params = None
        self._detach()
        return idx

    # ------------------------------------------------------------ the data path

    def pop_all(self, max_chains: int = 256) -> list[Chain]:
        """Every available chain, up to ``max_chains``.  On guest garbage:
        the good chains before it, with ``error`` set (see module doc)."""
        chains: list[Chain] = []
        if not self._ready() or self.error is not None:
            return chains
        while len(chains) < max_chains:
            want = max_chains - len(chains)
            if self.impl == "native":
                rc, batch = self._pop_native(want)
            else:
                rc, batch = self._pop_python(want)
            chains += batch
            if rc < 0:
                self.error = RingError(rc)
                break
            # Stopped short for lack of segment space: go again.
            if not batch or len(batch) == want or not self.avail_pending():
                break
        return chains

    def pop_raw(self, max_chains: int) -> tuple[int, int, int]:
        """One vu_vring_pop into ``chain_buffer`` / ``seg_buffer``:
        (rc, n_chains, n_segs).  Native only; sets ``error`` like pop_all."""
        if self.impl != "native":
            raise RuntimeError("pop_raw needs impl='native'")
        if not self._ready():
            return ring_ref.ERR_NOT_READY, 0, 0
        max_chains = min(max_chains, self._chain_cap)
        rc = _lib.vu_vring_pop(self._vr, self.memory.native, self.chain_buffer, max_chains,
                               self.seg_buffer, self._seg_cap, self._counts, self._counts + 1)
        if rc < 0 and self.error is None:
            self.error = RingError(rc)
        return rc, self._counts[0], self._counts[1]

    def _pop_native(self, want: int) -> tuple[int, list[Chain]]:
        want = min(want, self._chain_cap)
        counts = self._counts
        rc = _lib.vu_vring_pop(self._vr, self.memory.native, self.chain_buffer, want,
                               self.seg_buffer, self._seg_cap, counts, counts + 1)
        nc, ns = counts[0], counts[1]
        if not nc:
            return rc, []
        ro, rw = self._ro, self._rw
        views = [(rw[r] if f else ro[r])[o:o + n]
                 for o, n, r, f in _SEG.iter_unpack(_ffi.buffer(self.seg_buffer, _SEG.size * ns))]
        return rc, [Chain(head, views[first:first + nread], views[first + nread:first + nsegs], out_len, in_len)
                    for first, nsegs, nread, out_len, in_len, head, _ in
                    _CHAIN.iter_unpack(_ffi.buffer(self.chain_buffer, _CHAIN.size * nc))]

    def _pop_python(self, want: int) -> tuple[int, list[Chain]]:
        rc, chains, segs = self._ref.pop(self.memory.regions, want, self._seg_cap)
        ro, rw = self._ro, self._rw
        views = [(rw[r] if f else ro[r])[o:o + n] for r, o, n, f in segs]
        return rc, [Chain(head, views[first:first + nread], views[first + nread:first + nsegs], out_len, in_len)
                    for head, first, nsegs, nread, out_len, in_len in chains]

    def push(self, used: Sequence[tuple[int, int]]) -> None:
        """Return chains as (head, bytes written), publishing used->idx
        once for the batch.  A no-op on an unconfigured (stopped) queue."""
        if not self._ready() or not used:
            return
        n = len(used)
        for start in range(0, n, self.num):  # a batch holds at most num entries
            part = used[start:start + self.num]
            if self.impl == "native":
                try:
                    struct.pack_into(f"={2 * len(part)}I", _ffi.buffer(self._used, 8 * len(part)), 0,
                                     *itertools.chain.from_iterable(part))
                except struct.error:
                    raise ValueError(f"used elements out of range: {list(part)!r}") from None
                rc = _lib.vu_vring_push(self._vr, self._used, len(part))
            else:
                if any(not 0 <= w <= _U32_MAX for _, w in part):
                    raise ValueError(f"used elements out of range: {list(part)!r}")
                rc = self._ref.push(part)
            if rc:
                raise ValueError(f"{ring_ref.ERROR_NAMES[rc]}: {DESCRIPTIONS[rc]}: {list(part)!r}")

    def need_notify(self) -> bool:
        """Whether the guest wants an interrupt for what was pushed."""
        if not self._ready():
            return False
        if self.impl == "native":
            return _lib.vu_vring_need_notify(self._vr) > 0
        return self._ref.need_notify() > 0

    def set_notification(self, enable: bool) -> None:
        """Ask the guest for kicks (or not).  After enabling, check
        ``avail_pending`` again: a buffer may have raced with the change."""
        if not self._ready():
            return
        if self.impl == "native":
            _lib.vu_vring_set_notification(self._vr, 1 if enable else 0)
        else:
            self._ref.set_notification(enable)

    def avail_pending(self) -> bool:
        """Whether the guest made chains available that are not popped yet."""
        if not self._ready():
            return False
        if self.impl == "native":
            return bool(_lib.vu_vring_avail_pending(self._vr))
        return bool(self._ref.avail_pending())
