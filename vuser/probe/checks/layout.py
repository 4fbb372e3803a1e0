"""The seeds' question (000, 001): which rule numbers the back-end's
queues that depend on features — *offered* (what QEMU and Linux do, and
what design.md requires), *negotiated*, or the spec's *fixed* numbers.

The probe declines chosen features that bring queues, sets up every queue
index any rule could give the feature-dependent queue it can observe, puts
one buffer on each, and watches which one the back-end serves in that
role.  For the balloon the observable queue is reporting_vq: a reported
buffer's pages are released from the probe's memfd (virtio 5.5.6.7).
Predictions come from vuser's own declaration of the device under each
policy (``Device.queue_layout``), the one home of the numbering rules.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import trio

from vuser.device import POLICIES, Device, Feature
from vuser.frontend import Frontend
from vuser.frontend.queue import DriverQueueBase
from vuser.probe.checks.data import released
from vuser.probe.context import CheckSpec, Probe
from vuser.probe.work import PAGE_SIZE, Fail, Skip

OBSERVED_ROLE = "reporting_vq"
REPORT_SIZE = 16 * PAGE_SIZE


@dataclass(frozen=True)
class Trial:
    declined: tuple[Feature, ...]
    predicted: dict[str, int | None]   # policy -> index of the observed role
    served: tuple[int, ...]            # indexes whose buffer was handled in that role

    def describe(self) -> str:
        what = "+".join(f.short for f in self.declined) or "nothing"
        seen = ",".join(map(str, self.served)) or "none"
        rules = ", ".join(f"{k} {v}" for k, v in self.predicted.items())
        return f"declined {what}: served at {seen} ({rules})"


def _model(cls: type[Device], offered: int, policy: str) -> Device:
    unoffered = [f.name for f in cls.features if not offered >> f.bit & 1]
    return cls(without=unoffered, queue_policy=policy)


async def _observe(p: Probe, fe: Frontend, queues: dict[int, DriverQueueBase], candidates: list[int]) -> tuple[int, ...]:
    """One reporting-sized buffer on each candidate queue; the indexes
    whose pages left the memfd."""
    region = fe.memory.regions[0]
    placed = {}
    for index in candidates:
        gpa = fe.memory.alloc(REPORT_SIZE, PAGE_SIZE, region=region.index)
        fe.memory.fill(gpa, REPORT_SIZE, 0x5A)
        placed[index] = gpa
        queues[index].add_segments([(gpa, REPORT_SIZE, True)])
        queues[index].kick(force=True)
    done: set[int] = set()
    with trio.move_on_after(p.timeout):
        while len(done) < len(candidates):
            for index in candidates:
                if queues[index].get_used():
                    done.add(index)
            if any(released(region, placed[i], REPORT_SIZE) for i in done):
                with trio.move_on_after(p.quiet):   # the others get a moment too
                    while len(done) < len(candidates):
                        done.update(i for i in candidates if queues[i].get_used())
                        await trio.sleep(0.02)
                break
            await trio.sleep(0.02)
    return tuple(i for i in candidates if i in done and released(region, placed[i], REPORT_SIZE))


async def queue_layout(p: Probe) -> str:
    cls = p.profile.layout
    if cls is None:
        raise Skip(f"{p.profile.name}'s queues do not depend on features")
    async with p.session() as fe:
        offered = fe.backend_features or 0
    observed = next((f for f in cls.features if OBSERVED_ROLE in f.queues), None)
    if observed is None or not offered >> observed.bit & 1:
        raise Skip(f"{OBSERVED_ROLE}'s feature not offered: nothing the probe can watch")
    earlier = [f for f in cls.features if f.queues and f is not observed and offered >> f.bit & 1]
    trials = []
    for n in range(len(earlier) + 1):
        for declined in itertools.combinations(earlier, n):
            trials.append(await _trial(p, cls, offered, declined))
    matching = [policy for policy in POLICIES
                if all(t.served == (t.predicted[policy],) for t in trials)]
    p.queue_policy = "offered" if "offered" in matching else matching[0] if len(matching) == 1 else "unknown"
    seen = "; ".join(t.describe() for t in trials)
    if p.queue_policy != "offered":
        rule = {"negotiated": "numbers queues over the negotiated features",
                "fixed": "keeps the spec's fixed numbers",
                "unknown": "follows none of the rules"}[p.queue_policy]
        raise Fail(f"the back-end {rule}; QEMU and Linux number by offered features: {seen}")
    also = " (the fixed numbers coincide here)" if "fixed" in matching else ""
    return f"queues follow offered features{also}: {seen}"


async def _trial(p: Probe, cls: type[Device], offered: int, declined: tuple[Feature, ...]) -> Trial:
    async with p.session() as fe:
        drv = p.driver(fe, decline=tuple(f.bit for f in declined), queues=range(fe.num_queues))
        await drv.probe()
        negotiated = drv.negotiated_features or 0
        predicted = {policy: _model(cls, offered, policy).queue_layout(negotiated).index_of(OBSERVED_ROLE)
                     for policy in POLICIES}
        candidates = sorted({i for i in predicted.values() if i is not None and i < fe.num_queues})
        if not candidates:
            raise Fail(f"the back-end has {fe.num_queues} queues, too few for {OBSERVED_ROLE} under any rule")
        served = await _observe(p, fe, drv.queues, candidates)
    return Trial(declined, predicted, served)


CHECKS = (
    CheckSpec("queue-layout", "seeds 000, 001; design.md semantics 2", queue_layout, ("balloon",)),
)

__all__ = ["CHECKS", "Trial"]
