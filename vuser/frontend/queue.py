"""What the driver sides of both ring layouts share (vring.py: split,
packed.py: packed): buffers allocated in guest memory, the kick and call
eventfds, waiting for completions, and the records of chains in flight.

Resource handling: a queue owns its kick and call eventfds; ``close()``
closes them.  Its ring and buffers live in the caller's ``GuestRam``;
buffers the harness allocated are freed when their chain completes.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Sequence

import trio

from vuser.frontend.memory import GuestRam


class UsedRingError(Exception):
    """The device put something impossible in the used ring."""


class QueueFull(Exception):
    """Not enough free descriptors for the chain."""


class QueueTimeout(Exception):
    """Nothing (or not enough) came back on the used ring in time."""


@dataclass
class Segment:
    """One buffer of a chain: guest-physical address, length, device-writable?"""

    gpa: int
    length: int
    writable: bool


@dataclass
class InFlight:
    """A chain the device holds: ``head`` is what it gives back (split:
    the head descriptor, packed: the buffer id); ``descs`` the descriptor
    slots it took."""

    head: int
    descs: list[int]
    segments: list[Segment]
    indirect_table: int | None
    owned: bool
    token: Any


@dataclass(frozen=True)
class UsedElem:
    """A completed chain: its head, the length the device reported, the bytes
    it wrote (device-writable buffers, truncated to ``length``) and the
    token given when the chain was added."""

    head: int
    length: int
    data: bytes
    token: Any = None


@dataclass
class QueueStats:
    added: int = 0
    completed: int = 0
    kicks: int = 0
    kicks_suppressed: int = 0
    calls: int = 0


class DriverQueueBase:
    """The layout-independent half of a driver queue; subclasses write the
    ring (``_add``, ``kick_prepare``, callbacks, ``get_used``)."""

    ring_layout = ""   # "split" or "packed"

    def __init__(self, memory: GuestRam, index: int, num: int, *, event_idx: bool, indirect: bool) -> None:
        self.memory = memory
        self.index = index
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._in_flight: dict[int, InFlight] = {}
        self.stats = QueueStats()
        # The region new buffers go to (None: round-robin over all of them).
        self.buffer_region: int | None = None

    # ---------------------------------------------------------- layout hooks

    def addresses(self) -> tuple[int, int, int]:
        """(descriptor, driver, device) area guest-physical addresses."""
        raise NotImplementedError

    def _add(self, segments: list[Segment], indirect: bool, token: Any, publish: bool, owned: bool) -> int:
        raise NotImplementedError

    def kick_prepare(self) -> bool:
        raise NotImplementedError

    def get_used(self) -> list[UsedElem]:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the ring stands, for timeout messages."""
        raise NotImplementedError

    @property
    def num_free(self) -> int:
        raise NotImplementedError

    # ---------------------------------------------------------- common

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def user_addresses(self) -> tuple[int, int, int]:
        """The areas as front-end virtual addresses, for SET_VRING_ADDR."""
        m = self.memory
        return tuple(m.gpa_to_uva(a) for a in self.addresses())  # type: ignore[return-value]

    def add_outbuf(self, data: bytes, *, token: Any = None) -> int:
        return self.add_chain(out=[data], token=token)

    def add_inbuf(self, size: int, *, token: Any = None) -> int:
        return self.add_chain(in_=[size], token=token)

    def add_chain(self, out: Sequence[bytes] = (), in_: Sequence[int] = (), *,
                  indirect: bool | None = None, token: Any = None, publish: bool = True,
                  poison: int = 0) -> int:
        """Allocate buffers in guest memory and add them as one chain:
        device-readable ``out`` buffers first, then device-writable buffers
        of the sizes in ``in_`` (filled with ``poison``).  ``indirect``
        None follows Linux: an indirect table when the queue uses indirect
        descriptors and the chain has more than one buffer.  Returns the head."""
        total = len(out) + len(in_)
        if total == 0:
            raise ValueError("a chain needs at least one buffer")
        use_indirect = (self.indirect and total > 1) if indirect is None else indirect
        if not use_indirect and total > self.num_free:
            raise QueueFull(f"queue {self.index}: {total} descriptors needed, {self.num_free} free")
        segments: list[Segment] = []
        try:
            for data in out:
                gpa = self.memory.alloc(len(data), 8, region=self.buffer_region)
                self.memory.write(gpa, data)
                segments.append(Segment(gpa, len(data), False))
            for size in in_:
                gpa = self.memory.alloc(size, 8, region=self.buffer_region)
                self.memory.fill(gpa, size, poison)
                segments.append(Segment(gpa, size, True))
        except BaseException:
            for seg in segments:
                self.memory.free(seg.gpa)
            raise
        return self._add(segments, use_indirect, token, publish, owned=True)

    def add_segments(self, segments: Sequence[Segment | tuple[int, int, bool]], *,
                     indirect: bool = False, token: Any = None, publish: bool = True) -> int:
        """Add a chain over caller-chosen guest addresses (no allocation, no
        checks: addresses outside memory, zero lengths, read-after-write
        order are all allowed for hostile tests)."""
        segs = [s if isinstance(s, Segment) else Segment(*s) for s in segments]
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        return self._add(segs, indirect, token, publish, owned=False)

    def notify(self) -> None:
        """Signal the kick eventfd unconditionally."""
        os.eventfd_write(self.kick_fd, 1)
        self.stats.kicks += 1

    def kick(self, *, force: bool = False) -> bool:
        """Kick if the device asked for it (or ``force``); returns whether it did."""
        if self.kick_prepare() or force:
            self.notify()
            return True
        self.stats.kicks_suppressed += 1
        return False

    def drain_calls(self) -> int:
        """Read (and reset) the call eventfd counter; returns the signal count."""
        try:
            n = os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0
        self.stats.calls += n
        return n

    async def wait_call(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the device to signal the call
        eventfd; returns how many signals were counted (0 on timeout)."""
        n = self.drain_calls()
        if n:
            return n
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self.call_fd)
        return self.drain_calls()

    def _free_buffers(self, chain: InFlight) -> None:
        if chain.indirect_table is not None:
            self.memory.free(chain.indirect_table)
        if chain.owned:
            for seg in chain.segments:
                self.memory.free(seg.gpa)

    def _completed(self, chain: InFlight, length: int) -> UsedElem:
        """Check the device's length for ``chain`` and read what it wrote."""
        writable = sum(s.length for s in chain.segments if s.writable)
        if length > writable:
            raise UsedRingError(f"queue {self.index}: used len {length} for id {chain.head} exceeds "
                                f"its {writable} device-writable bytes")
        return UsedElem(chain.head, length, self._read_written(chain, length), chain.token)

    def _read_written(self, chain: InFlight, length: int) -> bytes:
        parts = []
        left = length
        for seg in chain.segments:
            if not seg.writable or left <= 0:
                continue
            take = min(left, seg.length)
            parts.append(self.memory.read(seg.gpa, take))
            left -= take
        return b"".join(parts)

    async def wait_used(self, count: int = 1, timeout: float = 5.0,
                        poll_interval: float = 0.05) -> list[UsedElem]:
        """Wait until at least ``count`` chains completed; returns all the
        completions collected.  Waits on the call eventfd but also polls
        every ``poll_interval`` s, since a device may rightly skip a call
        (NO_INTERRUPT, EVENT_IDX) — ``stats.calls`` tells whether it called."""
        got: list[UsedElem] = []
        try:
            with trio.fail_after(timeout):
                while True:
                    self.drain_calls()
                    got.extend(self.get_used())
                    if len(got) >= count:
                        return got
                    await self.wait_call(poll_interval)
        except trio.TooSlowError:
            raise QueueTimeout(f"queue {self.index}: {len(got)} of {count} used elements after "
                               f"{timeout}s ({self.describe()})") from None

    # ---------------------------------------------------------- teardown

    def renew_fds(self) -> None:
        """Fresh kick and call eventfds (the guest's queue outlives the
        front-end that closed the old ones: a back-end reconnect)."""
        self.close()
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def close(self) -> None:
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as exc:  # pragma: no cover
                    if exc.errno != errno.EBADF:
                        raise
                setattr(self, name, -1)



__all__ = ["DriverQueueBase", "InFlight", "QueueFull", "QueueStats", "QueueTimeout", "Segment", "UsedElem",
           "UsedRingError"]
