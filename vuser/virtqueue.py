"""Virtqueue façade: one ring (``vuser.rings``) over ``GuestMemory``.

``VirtQueue`` is what the framework and devices use.  The ring walking is
a ``vuser.rings.base.Ring``: the C implementation (``impl="native"``, the
default) or its pure-Python twin (``impl="python"``); both give identical
results and this module never asks which it has.  One ``pop_all`` is one
call into the ring code that drains every available chain; devices get
``Chain`` objects whose buffers are memoryviews slicing the region
mappings (no copy).

Error handling
    Garbage the guest put in the ring never raises out of ``pop_all``: the
    chains before the bad one are returned, ``error`` is set to a
    ``RingError`` naming the fault, and the queue stays broken (later pops
    return nothing) until it is configured again; the device then needs a
    reset (style.md, "two error families").  Rings that do not lie in guest
    memory raise ``MemoryAccessError`` from ``configure``; a bad queue size
    raises ``ValueError``; so do bad arguments to ``push``.

Dirty logging (live migration)
    While the front-end has logging on, the ring marks its own used-ring
    writes in the log ``set_log`` gave it (``vuser.rings``), and ``push``
    marks the bytes a Python device wrote into each chain: the ``written``
    length, over the chain's device-writable segments in order (the
    device never sees guest addresses, so the framework logs for it).  The
    chains' segments are remembered from pop to push for that.

Resource handling
    The queue holds views of its ring areas, which keeps their mapping
    alive while it exists.  When the memory table changes under a
    configured queue (``GuestMemory.generation`` moves) the queue finds its
    rings again at the same guest-physical addresses, keeping the ring's
    state; if they are gone it becomes unconfigured (pops return nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence, cast

from .memory import GuestMemory, MemoryAccessError
from .rings import Ring, RingError, native_available, ring_class
from .rings.base import MAX_QUEUE_SIZE, NO_BYTE_LIMIT, DirtyLogTarget
from .rings.errors import DESCRIPTIONS, ERROR_NAMES

__all__ = ["Chain", "RingError", "VirtQueue", "MemoryAccessError", "native_available"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Chain:
    """One descriptor chain: device-readable buffers, then device-writable
    ones, as views into guest memory.  Give ``head`` back with ``push``."""
    head: int
    readable: list[memoryview]
    writable: list[memoryview]
    out_len: int
    in_len: int
    descriptors: int = 0  # buffer descriptors walked (zero-length ones too)


class VirtQueue:
    """One virtqueue; see the module docstring."""

    def __init__(self, memory: GuestMemory, *, impl: str = "native", layout: str = "split",
                 max_segs: int | None = None, ring_memory: memoryview | None = None) -> None:
        """``ring_memory``: where a C ring keeps its state (``vuser.ringstate``)."""
        cls = ring_class(layout, impl)
        self.memory = memory
        self.impl = impl
        self.layout = layout
        self._ring: Ring = cls() if ring_memory is None or impl != "native" else \
            cast(Any, cls)(memory=ring_memory)
        self._max_segs_wanted = max_segs
        self.error: RingError | None = None
        self._params: tuple[int, tuple[int, int, int], bool, bool] | None = None
        self._generation = -1
        self._stopped_at = 0
        self._areas: list[memoryview] = []  # ring views keeping the rings mapped
        self._ro: list[memoryview] = []     # per region: read-only view (device-readable buffers)
        self._rw: list[memoryview] = []     # per region: writable view (device-writable buffers)
        self._seg_cap = 0
        self._gpas: list[int] = []          # per region: its guest-physical address
        # Device-writable pieces (gpa, length) of each chain popped and not
        # pushed yet, by head: what push marks dirty.
        self._writable: dict[int, list[tuple[int, int]]] = {}
        self._log: tuple[DirtyLogTarget, int] | None = None

    # ------------------------------------------------------------ set-up

    def configure(self, num: int, desc_gpa: int, driver_gpa: int, device_gpa: int, *,
                  event_idx: bool, base: int, in_order: bool = False) -> None:
        """SET_VRING_NUM/ADDR/BASE: (re)start the ring with fresh state
        (split: used_idx is read from the used ring; packed: both indexes
        and wrap counters come from ``base``; errors are cleared).  The
        areas are guest-physical: the descriptor area, driver area and
        device area (split: descriptor table, avail ring, used ring;
        packed: descriptor ring and the two event suppression structures).
        ValueError for a queue size or base the layout does not allow."""
        if not self._ring.num_ok(num):
            raise ValueError(f"queue size {num} is not allowed for a {self.layout} ring "
                             f"(1..{MAX_QUEUE_SIZE}{', a power of 2' if self.layout == 'split' else ''})")
        self._detach()
        self._params = None
        gpas = (desc_gpa, driver_gpa, device_gpa)
        self._attach(num, gpas)
        rc = self._ring.init(num, self._areas, bool(event_idx), base, in_order)
        if rc:  # a packed base beyond the queue size
            self._detach()
            raise ValueError(f"{ERROR_NAMES[rc]}: {DESCRIPTIONS[rc]} (base {base:#x}, size {num})")
        self._params = (num, gpas, bool(event_idx), bool(in_order))
        self.error = None
        self._apply_log()

    def set_log(self, log: DirtyLogTarget | None, used_gpa: int = 0) -> None:
        """Mark the ring's used-area writes in ``log`` at ``used_gpa`` (the
        front-end's log_guest_addr) from now on, across re-configuration;
        None: stop."""
        self._log = None if log is None else (log, used_gpa)
        self._apply_log()

    def _apply_log(self) -> None:
        if self._params is None:
            return
        if self._log is None:
            self._ring.set_log(None, 0, 0)
        else:
            self._ring.set_log(self._log[0], self._log[1], self._params[1][0])

    def shaped(self, num: int, event_idx: bool, in_order: bool) -> bool:
        """Configured with this size and these ring features?"""
        return self._ready() and self._params is not None and \
            (self._params[0], self._params[2], self._params[3]) == (num, bool(event_idx), bool(in_order))

    def relocate(self, desc_gpa: int, driver_gpa: int, device_gpa: int) -> None:
        """The same running ring at (possibly) new guest-physical addresses:
        every state field is kept, in-flight buffers included.
        MemoryAccessError if the areas are not in guest memory."""
        assert self._params is not None
        num, _, event_idx, in_order = self._params
        gpas = (desc_gpa, driver_gpa, device_gpa)
        old = self._areas
        self._attach(num, gpas)
        self._ring.rebind(self._areas)
        for a in old:
            a.release()
        self._params = (num, gpas, event_idx, in_order)
        self._apply_log()

    def _attach(self, num: int, gpas: tuple[int, int, int]) -> None:
        """Find the ring areas in memory (MemoryAccessError if not)."""
        mem = self.memory
        self._areas = [mem.gpa_view(gpa, size, writable=True)
                       for gpa, size in zip(gpas, self._ring.area_sizes(num))]
        self._ro = [r.readonly for r in mem.regions]
        self._rw = [r.view for r in mem.regions]
        self._gpas = [r.gpa for r in mem.regions]
        self._generation = mem.generation
        self._seg_cap = self._max_segs_wanted or 2 * max(num, 1024)

    def _detach(self) -> None:
        """Forget the ring areas; the ring will not touch memory until the
        next init."""
        self._ring.clear()
        for a in self._areas:
            a.release()
        self._areas = []
        self._ro = []
        self._rw = []
        self._writable.clear()

    def _ready(self) -> bool:
        """Configured, with ring pointers valid for the current memory table."""
        if self._params is None:
            return False
        if self._generation != self.memory.generation:
            self._follow_memory()
        return self._params is not None

    def _follow_memory(self) -> None:
        assert self._params is not None
        try:
            self.relocate(*self._params[1])
        except MemoryAccessError as exc:
            log.debug("ring no longer in guest memory after a table change: %s", exc)
            self._stopped_at = self._ring.base()
            self._params = None
            self._detach()

    # ------------------------------------------------------------ state

    @property
    def configured(self) -> bool:
        return self._ready()

    @property
    def num(self) -> int:
        return self._params[0] if self._params else 0

    @property
    def event_idx(self) -> bool:
        return self._params[2] if self._params else False

    @property
    def last_avail_idx(self) -> int:
        """Where the device resumes: GET_VRING_BASE's value (packed: the
        vhost-user encoding of both indexes and wrap counters)."""
        if not self._ready():
            return self._stopped_at
        return self._ring.base()

    @property
    def used_idx(self) -> int:
        if not self._ready():
            return 0
        return self._ring.used_idx

    @property
    def popped(self) -> int:
        """Chains popped so far (less those given back), modulo 2^32."""
        return self._ring.popped if self._ready() else 0

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def ring(self) -> Ring:
        """The ring implementation (current for the memory table)."""
        self._ready()
        return self._ring

    @property
    def native_ring(self) -> Any:
        """The C ring struct for C data paths (net); None for Python rings."""
        self._ready()
        return self._ring.native

    def stop(self) -> int:
        """GET_VRING_BASE: the exact index to resume from; the queue is
        unconfigured afterwards (chains not yet pushed are dropped)."""
        idx = self.last_avail_idx
        self._stopped_at = idx
        self._params = None
        self._detach()
        return idx

    # ------------------------------------------------------------ the data path

    def pop_all(self, max_chains: int = 256, max_bytes: int = NO_BYTE_LIMIT) -> list[Chain]:
        """Every available chain, up to ``max_chains`` and ``max_bytes``
        (the first chain is taken whatever its size).  On guest garbage: the
        good chains before it, with ``error`` set (see module doc)."""
        chains: list[Chain] = []
        if not self._ready() or self.error is not None:
            return chains
        ro, rw, gpas, writable = self._ro, self._rw, self._gpas, self._writable
        while len(chains) < max_chains:
            want = max_chains - len(chains)
            rc, batch, segs = self._ring.pop(self.memory, want, self._seg_cap, max_bytes)
            views = [(rw[r] if f else ro[r])[o:o + n] for o, n, r, f in segs]
            chains += [Chain(head, views[first:first + nread], views[first + nread:first + nsegs],
                             out_len, in_len, ndescs)
                       for first, nsegs, nread, out_len, in_len, head, ndescs in batch]
            for first, nsegs, nread, _, in_len, head, _ in batch:
                if in_len:
                    writable[head] = [(gpas[r] + o, n) for o, n, r, _ in segs[first + nread:first + nsegs]]
            if rc < 0:
                self.error = RingError(rc)
                break
            # Stopped short for lack of segment space: go again (not under
            # a byte budget: a second call would take its first chain
            # whatever its size, and the caller comes back anyway).
            if (not batch or len(batch) == want or max_bytes != NO_BYTE_LIMIT
                    or not self.avail_pending()):
                break
        return chains

    def unpop(self, n: int) -> None:
        """Give back the last ``n`` chains popped (nothing was pushed for
        them): the next pop returns them again."""
        if self._ready() and n:
            rc = self._ring.unpop(n)
            if rc:
                raise ValueError(f"{ERROR_NAMES[rc]}: {DESCRIPTIONS[rc]}")

    def push(self, used: Sequence[tuple[int, int]]) -> None:
        """Return chains as (head, bytes written), publishing the used
        index once per batch.  A no-op on an unconfigured (stopped) queue."""
        if not self._ready() or not used:
            return
        self._log_written(used)
        for start in range(0, len(used), self.num):  # a batch holds at most num entries
            part = used[start:start + self.num]
            rc = self._ring.push(part)
            if rc:
                raise ValueError(f"{ERROR_NAMES[rc]}: {DESCRIPTIONS[rc]}: {list(part)!r}")

    def _log_written(self, used: Sequence[tuple[int, int]]) -> None:
        """Forget the pushed chains' segments; while logging, mark the
        first ``written`` bytes of each dirty (see the module docstring)."""
        log = self.memory.dirty_log
        writable = self._writable
        for head, written in used:
            pieces = writable.pop(head, None)
            if log is None or not pieces or written <= 0:
                continue
            for gpa, n in pieces:
                log.write(gpa, min(n, written))
                written -= n
                if written <= 0:
                    break

    def need_notify(self) -> bool:
        """Whether the guest wants an interrupt for what was pushed."""
        return self._ready() and self._ring.need_notify() > 0

    def set_notification(self, enable: bool) -> None:
        """Ask the guest for kicks (or not).  After enabling, check
        ``avail_pending`` again: a buffer may have raced with the change."""
        if self._ready():
            self._ring.set_notification(enable)

    def avail_pending(self) -> bool:
        """Whether the guest made chains available that are not popped yet."""
        return self._ready() and bool(self._ring.avail_pending())
