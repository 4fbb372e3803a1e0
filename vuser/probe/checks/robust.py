"""Checks of what outlives a connection: reconnect (the guest's rings
survive a back-end that went away), and hostile messages (the back-end
survives them and serves the next connection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from vuser import wire
from vuser.frontend import BackendDisconnected, BackendTimeout, Driver, Frontend, GuestRam
from vuser.frontend.vring import DriverQueue
from vuser.probe.context import CheckSpec, Probe
from vuser.probe.target import BackendGone, exit_description, killed
from vuser.probe.work import Fail, Skip, Work, serve
from vuser.wire import Request

RAM = 64 << 20
FAR_AWAY = 0x7F00_0000_0000     # a guest-physical address in no region


async def reconnect(p: Probe) -> str:
    """The connection goes away without GET_VRING_BASE (with ``--exec`` the
    back-end is restarted too); a new connection resumes the same rings
    from the used index, as QEMU does for split rings after a reconnect."""
    memory = GuestRam.create(RAM)
    restarted = ""
    try:
        async with p.session(memory=memory, own_memory=False) as fe:
            drv, work = await p.start(fe)
            q = drv.queue(work.queue)
            await serve(q, work, 4, timeout=p.timeout)
            queues, features = dict(drv.queues), drv.features
            fe.queues.clear()   # the guest's rings (and their eventfds) outlive the connection
        if p.target.managed:
            await p.target.restart()
            restarted = "the back-end restarted, "
        async with p.session(memory=memory, own_memory=False) as fe2:
            for i, dq in queues.items():
                fe2.queues[i] = dq
                if isinstance(dq, DriverQueue):
                    fe2.vring_bases[i] = dq.last_used_idx
            await fe2.start(queues, features=features)
            await serve(q, work, 4, timeout=p.timeout)
            base = (await fe2.stop()).get(work.queue)
    finally:
        memory.close()
    if base != 8:
        raise Fail(f"resumed at 4, GET_VRING_BASE after 4 more requests: {base}, expected 8")
    return f"connection dropped after 4 requests; {restarted}resumed at base 4, 4 more served, GET_VRING_BASE 8"


# ---------------------------------------------------------------- hostile messages

Send = Callable[[Frontend, Driver | None, Work | None], Awaitable[None]]


@dataclass(frozen=True)
class Hostile:
    name: str
    what: str
    send: Send
    started: bool = False     # sent to a running device (else right after the handshake)


def _raw(code: int, payload: bytes = b"", size: int | None = None, flags: int = 0) -> bytes:
    return wire.encode_header(code, flags, len(payload) if size is None else size) + payload


async def _unknown_request(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    await fe.send_raw(_raw(0x7FFF, b"\0" * 8, flags=wire.FLAG_NEED_REPLY))


async def _huge_size(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    await fe.send_raw(_raw(Request.SET_FEATURES, size=0x7FFF_FFFF))


async def _short_payload(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    await fe.send_raw(_raw(Request.SET_VRING_NUM, b"\0\0\0\0"))


async def _mem_table_overflow(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    region = fe.memory.regions[0]
    body = wire.MemTable.build({"nregions": 1, "regions": [region.table_entry()]})
    lying = (1000).to_bytes(4, "little") + body[4:]    # nregions says 1000, one region follows
    await fe.send_raw(_raw(Request.SET_MEM_TABLE, lying), [region.fd])


async def _vring_index(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    for code in (Request.SET_VRING_NUM, Request.SET_VRING_BASE):
        await fe.send_raw(_raw(code, wire.VringState.build({"index": 0x7FFF_FFFF, "num": 256})))


async def _kick_without_fd(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    await fe.send_raw(_raw(Request.SET_VRING_KICK, (0).to_bytes(8, "little")))


def _queue(drv: Driver | None, work: Work | None) -> DriverQueue:
    assert drv is not None and work is not None
    q = drv.queue(work.queue)
    if not isinstance(q, DriverQueue):
        raise Skip("split ring case")
    return q


async def _outside_memory(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    q = _queue(drv, work)
    q.add_segments([(FAR_AWAY, 4096, True)])
    q.kick(force=True)


async def _descriptor_loop(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    q = _queue(drv, work)
    scratch = fe.memory.alloc(64)
    head = q.num - 1
    q.write_desc(head, scratch, 64, 1, head)   # VIRTQ_DESC_F_NEXT back to itself
    q.push_avail(head)
    q.kick(force=True)


async def _avail_jump(fe: Frontend, drv: Driver | None, work: Work | None) -> None:
    q = _queue(drv, work)
    q.set_avail_idx(q.avail_idx + 3 * q.num)   # more entries than the ring has
    q.kick(force=True)


HOSTILE = (
    Hostile("unknown-request", "request code 0x7fff with NEED_REPLY", _unknown_request),
    Hostile("huge-size", "a header announcing 2 GiB of payload, then nothing", _huge_size),
    Hostile("short-payload", "SET_VRING_NUM with 4 of its 8 bytes", _short_payload),
    Hostile("mem-table-overflow", "SET_MEM_TABLE saying 1000 regions, carrying 1", _mem_table_overflow),
    Hostile("vring-index", "SET_VRING_NUM / SET_VRING_BASE for queue 0x7fffffff", _vring_index),
    Hostile("kick-without-fd", "SET_VRING_KICK without an fd and without the no-fd bit", _kick_without_fd),
    Hostile("ring-outside-memory", "a descriptor at a guest address in no region", _outside_memory, True),
    Hostile("descriptor-loop", "a descriptor chained to itself", _descriptor_loop, True),
    Hostile("avail-idx-jump", "avail idx moved by 3 times the ring size", _avail_jump, True),
)


async def _answer(fe: Frontend, quiet: float) -> str:
    try:
        msg = await fe.recv_raw(timeout=quiet)
    except BackendTimeout:
        return "ignored it"
    if msg is None:
        return "closed the connection"
    msg.close_fds()
    return f"answered with {wire.request_name(msg.request)}"


def hostile_check(case: Hostile) -> Callable[[Probe], Awaitable[str]]:
    async def run(p: Probe) -> str:
        exits = p.target.clean_exits
        async with p.session() as fe:
            drv = work = None
            if case.started:
                drv, work = await p.start(fe)
            try:
                await case.send(fe, drv, work)
            except BackendDisconnected:
                reaction = "closed the connection"
            else:
                reaction = await _answer(fe, p.quiet)
        died = await p.target.settle()
        if died is not None and killed(died):
            raise BackendGone(f"{case.what}: the back-end was {exit_description(died)}")
        if died is not None:
            raise Fail(f"{case.what}: the back-end {exit_description(died)} instead of serving the next connection")
        async with p.running() as r:
            await r.serve(2)
            await r.stop()
        again = " (started again: it exits after each connection)" if p.target.clean_exits > exits else ""
        return f"{case.what}: the back-end {reaction}; the next connection was served{again}"
    run.__name__ = f"hostile_{case.name.replace('-', '_')}"
    return run


CHECKS = (
    CheckSpec("reconnect", "vhost-user.rst 'Communication' (reconnection); design.md (QEMU reconnect=)",
              reconnect),
    *(CheckSpec(f"hostile/{h.name}", "style.md 'the guest is hostile'; vhost-user.rst 'Communication'",
                hostile_check(h)) for h in HOSTILE),
)

__all__ = ["CHECKS", "HOSTILE", "Hostile"]
