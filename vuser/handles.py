"""What a device sees of a queue: ``QueueHandle`` (chains as memoryviews,
for devices written in Python) and ``RawQueue`` (the C ring and call fd,
for devices with their own C data path).  Both are views of one slot of
the connection's queue runtime; neither lets a device change the slot.

A handle lives as long as its connection; after ``Device.detach`` it is
stale (``running`` is False, pops return nothing).
"""

from __future__ import annotations

from typing import Any, Sequence

from .memory import GuestMemory
from .queues import QueueRuntime, QueueSlot
from .virtqueue import Chain, RingError


class _QueueView:
    """One slot of a queue runtime, seen from a device."""

    def __init__(self, runtime: QueueRuntime, slot: QueueSlot) -> None:
        self._rt = runtime
        self._slot = slot

    @property
    def index(self) -> int:
        return self._slot.index

    @property
    def role(self) -> str | None:
        """The queue's name in the device's layout (None: the layout has
        no queue at this index)."""
        return self._slot.role


class QueueHandle(_QueueView):
    """Pop chains, push used buffers, signal the guest."""

    @property
    def buffers(self) -> int:
        return self._slot.buffers

    @property
    def memory(self) -> GuestMemory:
        """Where the chains' buffers live: ``memory.read(view)`` and
        ``memory.write(view, data)`` copy under the SIGBUS guard."""
        return self._rt.memory

    def pop(self, max_chains: int = 256) -> list[Chain]:
        """The available chains (one call into the ring code), within what
        is left of this round's budget (queues.RoundBudget: the first chain
        of a round is taken whatever its size; then chains stop at the byte
        or segment budget, and the rest waits for the next round)."""
        vq = self._slot.vq
        budget = self._slot.budget
        if vq is None or self._rt.broken is not None or budget.spent:
            return []
        chains = vq.pop_all(max_chains, max(budget.bytes, 0))
        budget.bytes -= sum(c.out_len + c.in_len for c in chains)
        # Zero-length descriptors make no segment but are work all the same.
        budget.segments -= sum(max(len(c.readable) + len(c.writable), c.descriptors) for c in chains)
        if vq.error is not None:
            # The chains before the bad one are good and are still served;
            # nothing after it is touched (the ring is marked broken).
            self._rt.fault(self._slot, vq.error)
        self._slot.buffers += len(chains)
        return chains

    def push(self, used: Sequence[tuple[int, int]], notify: bool = True) -> None:
        """Return chains (head, bytes written) in one batch; signal the guest
        if it wants an interrupt."""
        vq = self._slot.vq
        if vq is None or not used:
            return
        vq.push(used)
        if notify:
            self.notify()

    def notify(self) -> None:
        self._rt.notify(self._slot)


class RawQueue(_QueueView):
    """A queue for a C data path: its ring struct, its call fd, and one way
    to report what C found wrong with the ring."""

    @property
    def running(self) -> bool:
        return self._slot.vq is not None

    @property
    def enabled(self) -> bool:
        return self._slot.enabled

    @property
    def ring(self) -> Any:
        """The C ring struct while the queue runs, enabled, on a device the
        guest has not broken; else None (C must not touch it then)."""
        vq = self._slot.vq
        if vq is None or not self._slot.enabled or self._rt.broken is not None:
            return None
        return vq.native_ring

    @property
    def call_fd(self) -> int:
        """The call eventfd, or -1."""
        fd = self._slot.call.fd
        return -1 if fd is None else fd

    def consumed(self, chains: int) -> None:
        """Count chains the C data path took from this queue."""
        self._slot.buffers += chains

    def report_ring_error(self, code: int) -> None:
        """C found guest garbage in this ring (a VU_ERR_* code): the device
        needs a reset.  Reported once; later reports are ignored."""
        vq = self._slot.vq
        if vq is None:
            return
        if vq.error is None:
            vq.error = RingError(code)
        self._rt.fault(self._slot, vq.error)

    @property
    def ring_broken(self) -> int:
        """The VU_ERR_* code C left in the ring, or 0."""
        vq = self._slot.vq
        if vq is None or vq.error is not None:
            return 0
        ring = vq.ring
        return ring.error if ring.num and ring.broken else 0
