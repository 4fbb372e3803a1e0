"""virtio-balloon (virtio spec 5.5) over vhost-user.

Queues: inflateq and deflateq always; statsq, free_page_vq and reporting_vq
exist when STATS_VQ, FREE_PAGE_HINT and REPORTING are *offered* and are
numbered compactly in feature order (seed 000; the framework's default
policy; ``--queue-policy negotiated|fixed`` for experiments).

Memory effect: inflated pages and reported free ranges are given back to
the host by MADV_REMOVE on the shared mapping (it punches a hole in the
memfd, so QEMU's shared RSS drops too); a deflated page comes back zeroed on
the guest's next touch.  With PAGE_POISON negotiated and a non-zero
poison_val, reported ranges are *not* discarded: the driver relies on their
content being the poison pattern and a discarded page would come back zero
(virtio spec 5.5.6.2; QEMU skips them the same way).

Config: num_pages (the target, device-written), actual (driver-written),
free_page_hint_cmd_id, poison_val (driver-written).  Only actual and
poison_val are taken from config writes: QEMU 11.1's generic device writes
the whole config back from a stale copy (design.md).

Policies (``policy``): with one on, the stats timer consults it after each
fresh stats and applies the target it answers; one that fails is switched
off and the device goes on at the last target.  Pages the guest takes back
while the target says to keep them (its OOM notifier, DEFLATE_ON_OOM) are
counted as ``oom_deflated_pages``.

Bounded work (issue 9): PFNs are read per buffer in bounded pieces, only
those in guest RAM are kept (``pages``), a round pops at most
``BUFFERS_PER_ROUND`` buffers, and guest mistakes are logged at most once
per interval.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from typing import Any

import trio

from vuser.device import ConfigField, Device, DeviceContext, DeviceError, Feature
from vuser.handles import QueueHandle, RawQueue
from vuser.memory import MemoryAccessError
from vuser.ratelimit import RateLimitedLog
from vuser.virtio import BalloonFeature as BF
from vuser.virtio import BalloonStat, DeviceId

from .pages import PAGE_SHIFT, PAGE_SIZE, PageBitmap, in_ram, read_pfns, runs
from .policy import ActivePolicy, PolicyFailed, PolicyInput

log = logging.getLogger(__name__)

# Buffers of PFNs handled per round: each holds at most
# pages.MAX_PFNS_PER_BUFFER (Linux sends 256), so a round stays short.
BUFFERS_PER_ROUND = 16
# Bytes read from a stats or command buffer (16 stats tags are 160).
SMALL_BUFFER = 1024
# Seconds a policy waits for the stats it asked for before deciding on older ones.
STATS_WAIT = 1.0

CMD_ID_STOP = 0
CMD_ID_DONE = 1
_STAT = struct.Struct("<HQ")  # struct virtio_balloon_stat is packed: le16 tag, le64 val


def _stat_name(tag: int) -> str:
    try:
        return BalloonStat(tag).label
    except ValueError:
        return f"tag-{tag}"


class BalloonDevice(Device):
    name = "balloon"
    virtio_id = DeviceId.BALLOON
    description = "memory balloon with stats, free page hinting and page reporting (virtio-balloon)"
    base_queues = ("inflateq", "deflateq")
    features = (
        Feature(BF.MUST_TELL_HOST),
        Feature(BF.STATS_VQ, ("statsq",)),
        Feature(BF.DEFLATE_ON_OOM),
        Feature(BF.FREE_PAGE_HINT, ("free_page_vq",)),
        Feature(BF.PAGE_POISON),
        Feature(BF.REPORTING, ("reporting_vq",)),
    )
    config_fields = (
        ConfigField("num_pages", 0, 4),
        ConfigField("actual", 4, 4, writable=True),
        ConfigField("free_page_hint_cmd_id", 8, 4, feature="FREE_PAGE_HINT"),
        ConfigField("poison_val", 12, 4, feature="PAGE_POISON", writable=True),
    )

    def __init__(self, *, target_pages: int = 0, stats_interval: float = 2.0,
                 policy: ActivePolicy | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.num_pages = target_pages
        self.actual = 0
        self.poison_val = 0
        self.cmd_id = CMD_ID_STOP
        self._next_cmd_id = 2
        self.stats_interval = stats_interval
        self.negotiated = 0
        self.inflated = PageBitmap()
        self.bad_pages = 0
        self.ignored_pfns = 0
        self._warn = RateLimitedLog(log)
        self.bytes_released = 0
        self.bytes_reported = 0
        self.reported_skipped_poison = 0
        self.inflate_buffers = self.deflate_buffers = 0
        self.pages_inflated_total = self.pages_deflated_total = 0
        self.hinted_ranges = 0
        self.hinted_bytes = 0
        self.hint_active_id: int | None = None
        self.stats: dict[str, int] = {}
        self.stats_time: float | None = None
        self.stats_updates = 0
        self._stats_head: int | None = None
        self._stats_event = trio.Event()
        self.oom_deflated_pages = 0
        self.policy: ActivePolicy | None = None
        self.policy_off: str | None = None   # why the last policy was switched off
        self._own_stats_interval = stats_interval
        self._retimed = trio.Event()         # set when the timer's interval changes
        if policy is not None:
            self.set_policy(policy)

    # ------------------------------------------------------------ config

    def config_value(self, field: ConfigField) -> int:
        return {"num_pages": self.num_pages, "actual": self.actual,
                "free_page_hint_cmd_id": self.cmd_id, "poison_val": self.poison_val}[field.name]

    def config_written(self, field: ConfigField, value: int | bytes) -> None:
        assert isinstance(value, int)
        if field.name == "actual":
            self.actual = value
        elif field.name == "poison_val":
            self.poison_val = value

    def features_negotiated(self, features: int) -> None:
        self.negotiated = features

    def reset(self) -> None:
        self.negotiated = 0
        self._stats_head = None

    def attach(self, context: DeviceContext) -> None:
        super().attach(context)
        # A new front-end means a new guest (or a rebooted one): every page
        # it has is its own again.
        self.inflated.clear()
        self.actual = 0
        self._stats_head = None

    def detach(self) -> None:
        self._stats_head = None
        super().detach()

    def queue_started(self, queue: RawQueue) -> None:
        # A stats buffer held from an earlier ring belongs to no ring now.
        if queue.role == "statsq":
            self._stats_head = None

    def queue_stopped(self, queue: RawQueue) -> None:
        if queue.role == "statsq":
            self._stats_head = None

    # ------------------------------------------------------------ queues

    def on_kick(self, queue: QueueHandle) -> None:
        role = queue.role
        if role == "inflateq":
            self._inflate(queue)
        elif role == "deflateq":
            self._deflate(queue)
        elif role == "statsq":
            self._stats(queue)
        elif role == "free_page_vq":
            self._free_page_hint(queue)
        elif role == "reporting_vq":
            self._report(queue)
        else:  # a queue the active layout does not name: return buffers untouched
            queue.push([(c.head, 0) for c in queue.pop()])

    def _page_runs(self, queue: QueueHandle, chain: Any) -> list[tuple[int, int]]:
        """The runs of guest-RAM pages a buffer names; what it names
        outside guest RAM, or beyond what is read of one buffer, is the
        guest's mistake (counted, warned about at most once an interval)."""
        pfns, ignored = read_pfns(queue.memory, chain.readable)
        kept, outside = in_ram(queue.memory, runs(pfns))
        if ignored:
            self.ignored_pfns += ignored
            self._warn.warn("balloon: a buffer names %d more PFNs than the %d read from one buffer; "
                            "ignored", ignored, len(pfns))
        if outside:
            self.bad_pages += outside
            self._warn.warn("balloon: %d PFNs outside guest RAM (the guest's error); ignored", outside)
        return kept

    def _discard(self, queue: QueueHandle, first: int, count: int) -> int:
        try:
            return queue.memory.discard(first << PAGE_SHIFT, count << PAGE_SHIFT)
        except MemoryAccessError as exc:  # e.g. a memfd sealed against writes: MADV_REMOVE fails
            self._warn.warn("balloon: cannot release pfn %#x+%d: %s", first, count, exc)
            return 0

    def _inflate(self, queue: QueueHandle) -> None:
        used = []
        for chain in queue.pop(BUFFERS_PER_ROUND):
            for first, count in self._page_runs(queue, chain):
                self.bytes_released += self._discard(queue, first, count)
                self.inflated.set(first, count)
                self.pages_inflated_total += count
            self.inflate_buffers += 1
            used.append((chain.head, 0))
        queue.push(used)

    def _deflate(self, queue: QueueHandle) -> None:
        # MUST_TELL_HOST: the driver waits for this buffer before it reuses
        # the pages; the pages need nothing from us (they come back zeroed
        # on touch), so completing the buffer is the whole "telling".
        used = []
        for chain in queue.pop(BUFFERS_PER_ROUND):
            for first, count in self._page_runs(queue, chain):
                short_before = max(0, self.num_pages - self.inflated.count)
                self.inflated.unset(first, count)
                self.pages_deflated_total += count
                # Below the target: the guest took them back on its own (OOM).
                self.oom_deflated_pages += max(0, self.num_pages - self.inflated.count) - short_before
            self.deflate_buffers += 1
            used.append((chain.head, 0))
        queue.push(used)

    @staticmethod
    def _small(queue: QueueHandle, chain: Any) -> bytes:
        """The first SMALL_BUFFER device-readable bytes of a chain."""
        data = bytearray()
        for view in chain.readable:
            n = min(len(view), SMALL_BUFFER - len(data))
            if n <= 0:
                break
            data += queue.memory.read(view[:n])
        return bytes(data)

    def _stats(self, queue: QueueHandle) -> None:
        chains = queue.pop()
        for chain in chains:
            data = self._small(queue, chain)
            for off in range(0, len(data) - _STAT.size + 1, _STAT.size):
                tag, val = _STAT.unpack_from(data, off)
                self.stats[_stat_name(tag)] = val
            self.stats_time = time.time()
            self.stats_updates += 1
            if self._stats_head is not None:  # the driver only ever has one out
                queue.push([(self._stats_head, 0)])
            self._stats_head = chain.head
        if chains:
            self._stats_event.set()
            self._stats_event = trio.Event()

    def _free_page_hint(self, queue: QueueHandle) -> None:
        used = []
        for chain in queue.pop():
            if chain.readable:  # a command id: start (the active id) or STOP
                data = self._small(queue, chain)
                if len(data) >= 4:
                    cmd = int.from_bytes(data[:4], "little")
                    self.hint_active_id = None if cmd == CMD_ID_STOP else cmd
                    log.info("balloon: free page hinting %s (cmd id %d)",
                             "stopped" if cmd == CMD_ID_STOP else "started", cmd)
            for view in chain.writable:  # a free range the guest will not touch until DONE
                self.hinted_ranges += 1
                self.hinted_bytes += len(view)
            used.append((chain.head, 0))
        queue.push(used)

    def _poison_active(self) -> bool:
        return self.has("PAGE_POISON", self.negotiated) and self.poison_val != 0

    def _report(self, queue: QueueHandle) -> None:
        used = []
        poison = self._poison_active()
        for chain in queue.pop():
            size = sum(len(v) for v in chain.writable)
            self.bytes_reported += size
            if poison:
                self.reported_skipped_poison += size
            else:
                try:
                    self.bytes_released += queue.memory.discard_views(chain.writable)
                except MemoryAccessError as exc:  # MADV_REMOVE refused (a sealed memfd)
                    self._warn.warn("balloon: cannot release a reported range: %s", exc)
            used.append((chain.head, 0))
        queue.push(used)

    # ------------------------------------------------------------ stats timer

    async def run(self, context: DeviceContext) -> None:
        """Each interval hand the stats buffer back and let the driver
        refill it (virtio spec 5.5.6.3); with a policy on, consult it once
        the fresh stats are in (or after STATS_WAIT)."""
        while True:
            retimed, interval = self._retimed, self.stats_interval
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await retimed.wait()
                continue  # the interval changed: start over with the new one
            fresh = self._stats_event
            asked = self.request_stats()
            policy = self.policy
            if policy is None:
                continue
            if asked:
                with trio.move_on_after(min(interval, STATS_WAIT)):
                    await fresh.wait()
            await self._consult(policy)

    def request_stats(self) -> bool:
        if self.context is None or self._stats_head is None:
            return False
        q = self.context.queue("statsq")
        if q is None:
            return False
        head, self._stats_head = self._stats_head, None
        try:
            q.push([(head, 0)])
        except ValueError as exc:  # the ring changed under the held buffer: drop it
            log.debug("balloon: held stats buffer %d not returned: %s", head, exc)
            return False
        return True

    # ------------------------------------------------------------ control

    def set_target(self, pages: int) -> None:
        self.num_pages = pages
        log.info("balloon: target %d pages (%d MiB)", pages, (pages * PAGE_SIZE) >> 20)
        self.config_changed()

    def set_policy(self, policy: ActivePolicy | None) -> None:
        """Switch ``policy`` on (replacing any other), or off with None.  A
        policy sets the stats interval while it is on."""
        self.policy = policy
        self.policy_off = None
        self.stats_interval = policy.interval if policy is not None else self._own_stats_interval
        self._retimed.set()
        self._retimed = trio.Event()
        if policy is not None:
            log.info("balloon: policy %s on (every %gs, host memory from %s)", policy.spec, policy.interval,
                     policy.host.describe())
        else:
            log.info("balloon: policy off")

    def policy_input(self) -> PolicyInput | None:
        """What a policy sees now (host figures are added when it runs);
        None while no front-end gave a memory table."""
        ram = sum(r.size for r in self.context.memory) if self.context is not None else 0
        if ram <= 0:
            return None
        now = time.time()
        return PolicyInput(time=now, guest_ram=ram, target=self.num_pages * PAGE_SIZE,
                           actual=self.actual * PAGE_SIZE, stats=dict(self.stats),
                           stats_age=None if self.stats_time is None else max(0.0, now - self.stats_time),
                           deflate_on_oom=self.has("DEFLATE_ON_OOM", self.negotiated), host=None)

    async def _consult(self, policy: ActivePolicy) -> None:
        inputs = self.policy_input()
        if inputs is None:
            return
        try:
            decision = await policy.consult(inputs)
        except PolicyFailed as exc:
            if self.policy is policy:
                log.warning("balloon: policy %s switched off: %s; the target stays %d MiB", policy.spec, exc,
                            (self.num_pages * PAGE_SIZE) >> 20)
                self.set_policy(None)
                self.policy_off = f"{policy.spec}: {exc}"
            return
        if decision is not None and self.policy is policy:  # not replaced meanwhile
            self.set_target(decision["to"] // PAGE_SIZE)

    def hint(self, action: str) -> int:
        if action == "start":
            self.cmd_id = self._next_cmd_id
            self._next_cmd_id = self._next_cmd_id + 1 if self._next_cmd_id < 0xFFFFFFFF else 2
        elif action == "stop":
            # DONE both stops the driver and lets it free the hinted pages.
            self.cmd_id = CMD_ID_DONE
        else:
            raise DeviceError("hint takes start or stop")
        self.config_changed()
        return self.cmd_id

    def status(self) -> dict[str, Any]:
        return {
            # Sizes in bytes under the plain names; pages alongside.
            "target": self.num_pages * PAGE_SIZE,
            "actual": self.actual * PAGE_SIZE,
            "target_pages": self.num_pages,
            "target_bytes": self.num_pages * PAGE_SIZE,
            "actual_pages": self.actual,
            "actual_bytes": self.actual * PAGE_SIZE,
            "inflated_pages": self.inflated.count,
            "bad_pfns": self.bad_pages,
            "ignored_pfns": self.ignored_pfns,
            "bytes_released": self.bytes_released,
            "bytes_reported": self.bytes_reported,
            "reported_kept_for_poison": self.reported_skipped_poison,
            "poison_val": self.poison_val,
            "inflate_buffers": self.inflate_buffers,
            "deflate_buffers": self.deflate_buffers,
            "free_page_hint": {"cmd_id": self.cmd_id, "active_id": self.hint_active_id,
                               "ranges": self.hinted_ranges, "bytes": self.hinted_bytes},
            "stats": {"values": dict(self.stats), "time": self.stats_time, "updates": self.stats_updates,
                      "interval": self.stats_interval},
            "oom_deflated_pages": self.oom_deflated_pages,
            "policy": self.policy_status(),
        }

    def policy_status(self) -> dict[str, Any]:
        if self.policy is not None:
            return {"on": True, **self.policy.describe()}
        return {"on": False, "switched_off": self.policy_off}
