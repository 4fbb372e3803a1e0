"""Checks of the rings: GET_VRING_BASE (split, index wrap, packed),
EVENT_IDX both ways, indirect chains, SET_VRING_ENABLE 0 and 1."""

from __future__ import annotations

import trio

from vuser.frontend import Driver
from vuser.frontend.packed import PackedDriverQueue
from vuser.frontend.vring import DriverQueue
from vuser.probe.context import CheckSpec, Probe
from vuser.probe.work import Fail, Skip
from vuser.rings.packed_ref import packed_base
from vuser.virtio import Transport

WRAP_START = 0xFFFA      # split: 12 requests from here cross 0xFFFF
PACKED_SIZE = 8          # packed: a small ring wraps after 8 slots
EVENT_IDX = (Transport.EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX")


async def split_base(p: Probe) -> str:
    """GET_VRING_BASE is the next avail index: 0 -> 5, and a restart from
    that base continues to 12 (QEMU's stop / cont)."""
    async with p.running() as r:
        await r.serve(5)
        await r.stop(5)
        await r.fe.start(r.drv.queues, features=r.drv.features)
        await r.serve(7)
        await r.stop(12)
        return "0 -> 5 after 5 requests; restarted at 5 -> 12 after 7 more"


def _at_wrap(drv: Driver) -> None:
    """Every ring as if it had carried WRAP_START chains (the Driver's
    setup hook: after the rings exist, before DRIVER_OK)."""
    for q in drv.queues.values():
        if not isinstance(q, DriverQueue):
            raise Skip("split rings only")
        q.resume_at(WRAP_START)
        drv.fe.vring_bases[q.index] = WRAP_START


async def split_wrap(p: Probe) -> str:
    async with p.running(setup=_at_wrap) as r:
        await r.serve(12)
        expected = (WRAP_START + 12) & 0xFFFF
        await r.stop(expected)
        return f"SET_VRING_BASE {WRAP_START:#x}, 12 requests across 0xFFFF: GET_VRING_BASE {expected}"


def _halves(value: int) -> str:
    return (f"avail {value & 0x7FFF} wrap {value >> 15 & 1}, "
            f"used {value >> 16 & 0x7FFF} wrap {value >> 31 & 1}")


async def packed_base_check(p: Probe) -> str:
    """Packed GET_VRING_BASE: bits 0-14 next avail, 15 its wrap counter,
    16-30 next used, 31 its wrap counter; both halves, also after the
    ring wrapped, and a restart from it continues."""
    async with p.running(session={"packed": True}, needs=(Transport.RING_PACKED, "VIRTIO_F_RING_PACKED"),
                         queue_size=PACKED_SIZE) as r:
        q = r.q
        assert isinstance(q, PackedDriverQueue)
        done = 0
        for count in (5, 6):  # 11 requests on 8 slots: both wrap counters flip
            await r.serve(count)
            done += count
            expected = packed_base(q.next_avail, q.avail_wrap, q.last_used, q.used_wrap)
            got = await r.stop() or 0
            if got != expected:
                half = "avail half" if got & 0xFFFF != expected & 0xFFFF else "used half"
                raise Fail(f"after {done} requests on {PACKED_SIZE} slots: GET_VRING_BASE {got:#x} "
                           f"({_halves(got)}), expected {expected:#x} ({_halves(expected)}): wrong {half}")
            await r.fe.start(r.drv.queues, features=r.drv.features)
        await r.stop()
        return f"{expected:#x} ({_halves(expected)}) after 11 requests on {PACKED_SIZE} slots, both halves right"


async def event_idx_used(p: Probe) -> str:
    """Device to driver: with used_event set ahead, no call for the
    requests before it (SHOULD NOT) and a call for the one that reaches it
    (MUST)."""
    async with p.running(needs=EVENT_IDX) as r:
        q = r.q
        if not isinstance(q, DriverQueue):
            raise Skip("split rings only")
        # vhost back-ends call unconditionally once after a ring starts
        # (signalled_used not valid yet): one request first.
        await r.serve(1)
        q.set_used_event(q.last_used_idx + 3)   # a call when used idx passes last_used + 3
        q.drain_calls()
        start = q.stats.calls                   # wait_used counts the calls it drains
        await r.serve(3)
        await trio.sleep(p.quiet)
        q.drain_calls()
        early = q.stats.calls - start
        await r.serve(1)
        if q.stats.calls - start == early:
            await q.wait_call(p.timeout)
        due = q.stats.calls - start - early
        await r.stop()
        if not due:
            raise Fail("no call when the used index reached used_event (2.7.10: MUST)")
        if early:
            raise Fail(f"{early} call(s) for requests before used_event (2.7.10: SHOULD NOT)")
        return "no call for 3 requests before used_event, a call for the one reaching it"


async def event_idx_avail(p: Probe) -> str:
    """Driver to device: the driver kicks only when avail_event asks; a
    back-end that does not publish avail_event stalls."""
    async with p.running(needs=EVENT_IDX) as r:
        for i in range(8):
            try:
                await r.serve(1)
            except Fail as exc:
                raise Fail(f"request {i + 1}: {exc} (avail_event not moved on?)") from None
        await r.stop()
        return f"8 requests, each kicked only as avail_event asked ({r.q.stats.kicks} kicks)"


async def indirect(p: Probe) -> str:
    async with p.running(needs=(Transport.INDIRECT_DESC, "VIRTIO_RING_F_INDIRECT_DESC")) as r:
        await r.serve(4, segments=3, indirect=True)
        await r.serve(4, segments=3, indirect=False)
        await r.serve(2, segments=1, indirect=True)
        await r.stop()
        return "indirect tables of 3 and 1 descriptors and direct chains served"


async def enable_restart(p: Probe) -> str:
    """SET_VRING_ENABLE 0 then 1 while running: every request is completed
    exactly once and the base stays exact (the ring may be processed while
    disabled, without side effects: vhost-user.rst 'Ring states')."""
    async with p.running() as r:
        if not r.fe.offers_protocol_features:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered (rings start enabled)")
        await r.serve(2)
        await r.fe.set_vring_enable(r.work.queue, False)
        for _ in range(3):
            r.work.add(r.q)
        r.q.kick(force=True)
        await trio.sleep(p.quiet)
        while_disabled = r.q.get_used()
        await r.fe.set_vring_enable(r.work.queue, True)
        r.q.kick(force=True)
        rest = await r.q.wait_used(3 - len(while_disabled), timeout=p.timeout)
        problems = [x for x in map(r.work.check, [*while_disabled, *rest]) if x]
        if problems:
            raise Fail("; ".join(problems[:3]))
        await r.stop()
        held = {0: "held until SET_VRING_ENABLE 1", 3: "processed while disabled (allowed: 'started but disabled')"}
        how = held.get(len(while_disabled), f"{len(while_disabled)} processed while disabled, the rest after")
        return f"3 requests kicked while disabled: {how}; each completed once"


CHECKS = (
    CheckSpec("vring-base/split", "vhost-user.rst GET_VRING_BASE; virtio 2.7", split_base),
    CheckSpec("vring-base/split-wrap", "vhost-user.rst GET_VRING_BASE; virtio 2.7.6 (16-bit indexes wrap)",
              split_wrap),
    CheckSpec("vring-base/packed", "vhost-user.rst GET_VRING_BASE (packed: both halves, QEMU 8.2+); virtio 2.8",
              packed_base_check),
    CheckSpec("event-idx/used-event", "virtio 2.7.7.2, 2.7.10 (device to driver)", event_idx_used),
    CheckSpec("event-idx/avail-event", "virtio 2.7.10 (driver to device)", event_idx_avail),
    CheckSpec("indirect", "virtio 2.7.5.3", indirect),
    CheckSpec("vring-enable/stop-restart", "vhost-user.rst 'Ring states', SET_VRING_ENABLE", enable_restart),
)

__all__ = ["CHECKS"]
