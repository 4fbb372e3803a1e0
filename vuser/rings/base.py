"""The ring interface: what every ring implementation offers the virtqueue.

A ring is the device side of one virtqueue's memory layout (split, spec
2.7, or packed, 2.8), in C (``native/``) or in pure Python (the reference
twin).
Implementations are classes of the ``Ring`` protocol; ``vuser.virtqueue``
picks one by (layout, impl) and never branches on which it got, and the
property suite compares the two implementations of each layout through this
interface on hostile rings.

A pop returns plain tuples, identical for every implementation:

* chain ``(first_seg, nsegs, nread, out_len, in_len, head, ndescs)`` —
  the field order of ``struct vu_chain`` (``head``: the id to push back,
  the head descriptor's index for split rings and the buffer id for packed
  ones; ``ndescs``: the buffer descriptors walked, zero-length ones
  included: what the chain cost);
* segment ``(offset, len, region, flags)`` — ``struct vu_seg``: region
  index into ``memory.regions``, offset in that region, ``SEG_WRITE`` for
  device-writable.

Semantics shared by all (zero-length descriptors, region spanning,
segment space, sticky errors) and the packed ring's own (wrap counters,
buffer ids, batched used descriptors, the vhost-user base encoding) are
documented once, in ``native/vring.h``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, Sequence

from ..virtio import MAX_QUEUE_SIZE as MAX_QUEUE_SIZE  # (re-exported: the rings check sizes)

MAX_REGIONS = 64
MAX_INDIRECT = 32768     # entries in one indirect table
MAX_CHAIN_DESCS = 1024   # buffer descriptors in one chain, zero-length ones included
NO_BYTE_LIMIT = (1 << 64) - 1
SEG_WRITE = 1            # segment flag: device-writable

ChainTuple = tuple[int, int, int, int, int, int, int]
SegTuple = tuple[int, int, int, int]
PopResult = tuple[int, list[ChainTuple], list[SegTuple]]


class RegionLike(Protocol):
    """A mapped region: guest-physical ``[gpa, gpa + size)`` as ``view``."""

    @property
    def gpa(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def view(self) -> memoryview: ...


class RingMemory(Protocol):
    """What a ring reads buffers through: the regions (Python) and the
    ``struct vu_mem *`` mirroring them (C)."""

    @property
    def regions(self) -> Sequence[RegionLike]: ...
    @property
    def native(self) -> Any: ...


class DirtyLogTarget(Protocol):
    """A dirty page log (``vuser.dirtylog``): where writes to guest memory
    are marked while the front-end migrates the guest."""

    def write(self, gpa: int, length: int) -> None:
        """Mark the pages of guest-physical ``[gpa, gpa + length)``."""
        ...

    @property
    def native(self) -> Any:
        """The ``struct vu_log *`` C paths mark pages in (None without C)."""
        ...


class Ring(Protocol):
    """One ring's device side.  Methods return 0 / a count / a flag, or a
    negative error code (``vuser.rings.errors``)."""

    layout: ClassVar[str]   # "split" or "packed"
    impl: ClassVar[str]     # "native" or "python"

    @staticmethod
    def area_sizes(num: int) -> tuple[int, int, int]:
        """Bytes of the descriptor area, driver area and device area."""
        ...

    @staticmethod
    def num_ok(num: int) -> bool:
        """Is ``num`` a queue size this layout allows?"""
        ...

    def init(self, num: int, areas: Sequence[memoryview], event_idx: bool, base: int,
             in_order: bool = False) -> int:
        """Start over on these areas (writable views of the sizes above);
        ``base`` is SET_VRING_BASE's value; ``in_order``: VIRTIO_F_IN_ORDER."""
        ...

    def rebind(self, areas: Sequence[memoryview]) -> int:
        """The same ring, every state field kept, at new views of its areas
        (the memory table was replaced)."""
        ...

    def clear(self) -> None:
        """Forget the areas: nothing touches memory until the next init."""
        ...

    def set_log(self, log: DirtyLogTarget | None, used_gpa: int, desc_gpa: int) -> None:
        """Mark every write to the used area (split) or device area (packed)
        in ``log`` at ``used_gpa`` + its offset (SET_VRING_ADDR's
        log_guest_addr), and a packed ring's used descriptors at
        ``desc_gpa`` + theirs; None: stop (vring.h, "Dirty logging").
        ``init`` forgets it."""
        ...

    def pop(self, memory: RingMemory, max_chains: int, max_segs: int,
            max_bytes: int = NO_BYTE_LIMIT) -> PopResult:
        """Pop up to ``max_chains`` chains in ``max_segs`` segments, stopping
        before a chain that would take the call past ``max_bytes`` (unless
        it is the first)."""
        ...

    def push(self, elems: Sequence[tuple[int, int]]) -> int:
        """Publish used (id, written) pairs once; ValueError for values
        that do not fit 32 bits."""
        ...

    def unpop(self, n: int) -> int:
        """Give back the last ``n`` chains popped (nothing published for
        them): they will be popped again."""
        ...

    def need_notify(self) -> int: ...

    def set_notification(self, enable: bool) -> None: ...

    def avail_pending(self) -> int: ...

    def base(self) -> int:
        """GET_VRING_BASE's value: where the driver side resumes."""
        ...

    def snapshot(self) -> dict[str, int]:
        """Every state field by name (the property tests compare them),
        packed rings' id table included as ``ids[i]``."""
        ...

    @property
    def num(self) -> int: ...
    @property
    def used_idx(self) -> int: ...
    @property
    def popped(self) -> int:
        """Chains popped less those given back, modulo 2^32: whether a
        round made progress (positions repeat after whole laps)."""
        ...
    @property
    def broken(self) -> bool: ...
    @property
    def error(self) -> int: ...
    @property
    def native(self) -> Any:
        """The C struct for C data paths (net); None for Python rings."""
        ...
