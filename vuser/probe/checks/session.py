"""Checks of the session: the real front-ends' handshakes, feature
negotiation as the seeds read it, config space, REPLY_ACK."""

from __future__ import annotations

import dataclasses

from vuser.frontend import QEMU_11_1, BackendRefused, Frontend, FrontendError
from vuser.probe.context import CheckSpec, Probe
from vuser.probe.work import Fail, Skip, serve
from vuser.virtio import Status, Transport, mask
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request


def feature_names(p: Probe, bits: int) -> str:
    """Short names of feature bits: the device's, then transport ones."""
    names = {int(t): t.name for t in Transport}
    names.update({int(b): getattr(b, "name", f"bit{b}") for b in p.profile.driver_features})
    names.update({f.bit: f.short for f in p.profile.features})
    return ",".join(names.get(b, f"bit{b}") for b in range(64) if bits >> b & 1) or "none"


async def _handshake(p: Probe, personality: str) -> str:
    async with p.running(personality) as r:
        await r.serve(4)
        base = await r.stop()
        negotiated = feature_names(p, r.drv.negotiated_features or 0)
        return (f"{len(r.fe.sent())} messages as {personality}; negotiated {negotiated}; 4 requests served; "
                f"GET_VRING_BASE {base} (vring-base/* judge it)")


async def handshake_qemu_11(p: Probe) -> str:
    return await _handshake(p, "qemu-11.1")


async def handshake_qemu_7(p: Probe) -> str:
    return await _handshake(p, "qemu-7.2")


async def handshake_dpdk(p: Probe) -> str:
    return await _handshake(p, "dpdk")


# SET_FEATURES acknowledged (with REPLY_ACK), so a refusal shows at the value refused.
ACKED_FEATURES = dataclasses.replace(QEMU_11_1, name="qemu-11.1, SET_FEATURES acknowledged",
                                     need_reply=QEMU_11_1.need_reply | {Request.SET_FEATURES})


def _set_features_sent(fe: Frontend) -> str:
    return ", ".join(hex(e.fields.u64) for e in fe.trace if e.request == "SET_FEATURES" and e.fields is not None)


async def feature_rewrites(p: Probe) -> str:
    """Several SET_FEATURES before FEATURES_OK, the first 0 and one
    without EVENT_IDX: the last one counts.  With EVENT_IDX in the last
    set the driver kicks only when avail_event asks, so a back-end that kept
    an earlier set stalls."""
    async with p.session(ACKED_FEATURES) as fe:
        probe = p.driver(fe)
        probe.read_device_features()
        full = probe.initial_features()
        earlier = full & ~mask(Transport.EVENT_IDX)
        drv = p.driver(fe, feature_writes="each", pre_feature_writes=[0, earlier])
        try:
            await drv.probe()
        except FrontendError as exc:
            raise Fail(f"{exc} (SET_FEATURES sent: {_set_features_sent(fe)})") from None
        work = p.profile.work(drv)
        q = drv.queue(work.queue)
        for _ in range(3):
            await serve(q, work, 2, timeout=p.timeout)
        status = ""
        if fe.has_protocol_feature(PF.STATUS):
            got = await fe.get_status()
            if not got & Status.FEATURES_OK:
                raise Fail(f"FEATURES_OK not kept after the rewrites (status {got:#x})")
            status = ", FEATURES_OK kept"
        await fe.stop()
        event_idx = "with EVENT_IDX (kicks only when avail_event asked)" if q.event_idx else "without EVENT_IDX"
        return (f"SET_FEATURES {_set_features_sent(fe)}{status}; 6 requests served {event_idx} "
                f"under the last set")


async def config_before_features(p: Probe) -> str:
    fields = p.existing_fields()
    if not fields:
        raise Skip(f"{p.profile.name} has no config space")
    async with p.session() as fe:
        p.require_protocol(PF.CONFIG, fe)
        size = max(f.end for f in fields)
        assert "SET_FEATURES" not in fe.sent()
        try:
            data = await fe.get_config(0, size)
        except BackendRefused as exc:
            raise Fail(f"GET_CONFIG of {size} bytes before any SET_FEATURES refused ({exc.value:#x})") from None
        return f"GET_CONFIG of the {size} bytes the offered features define, before SET_FEATURES: {data.hex()}"


async def config_offered_fields(p: Probe) -> str:
    """Each field whose feature is offered reads at its fixed offset before
    features, and still reads the same after the driver declined every
    feature (seed 002: it exists because it is offered)."""
    fields = p.existing_fields()
    if not fields:
        raise Skip(f"{p.profile.name} has no config space")
    async with p.session() as fe:
        p.require_protocol(PF.CONFIG, fe)
        before = {}
        for f in fields:
            try:
                before[f.name] = await fe.get_config(f.offset, f.size)
            except BackendRefused:
                raise Fail(f"GET_CONFIG of {f.name} (offset {f.offset}, {f.size} bytes) refused") from None
        await fe.set_features(mask(Transport.VERSION_1))
        changed = []
        for f in fields:
            after = await fe.get_config(f.offset, f.size)
            if after != before[f.name] and not f.writable:
                changed.append(f"{f.name} {before[f.name].hex()} -> {after.hex()}")
        if changed:
            raise Fail("fields changed when their features were declined: " + "; ".join(changed))
        return "read alone and unchanged with only VERSION_1 accepted: " + ", ".join(f.name for f in fields)


EVERY_NEED_REPLY = dataclasses.replace(QEMU_11_1, name="qemu-11.1, NEED_REPLY on every request",
                                       need_reply=frozenset(Request))


async def reply_ack(p: Probe) -> str:
    async with p.running(EVERY_NEED_REPLY) as r:
        p.require_protocol(PF.REPLY_ACK, r.fe)
        await r.serve(2)
        await r.stop()
        asked = [e.request for e in r.fe.trace if e.need_reply]
        if not asked:
            raise Fail("no request was sent with NEED_REPLY")
        return f"{len(asked)} requests with NEED_REPLY ({', '.join(sorted(set(asked)))}), each acknowledged"


CHECKS = (
    CheckSpec("handshake/qemu-11.1", "design.md 'What real front-ends do'; vhost-user.rst 'Communication'",
              handshake_qemu_11),
    CheckSpec("handshake/qemu-7.2", "design.md 'What real front-ends do'", handshake_qemu_7),
    CheckSpec("handshake/dpdk", "design.md 'What real front-ends do' (virtio_user: SET_OWNER first, "
              "identity-mapped memory, two memory tables while running)", handshake_dpdk),
    CheckSpec("features/rewrite-and-zero", "seeds 002, 004; virtio 3.1.1 step 4", feature_rewrites),
    CheckSpec("config/before-features", "seed 002; virtio 2.5.1 'MUST allow reading ... before FEATURES_OK'",
              config_before_features),
    CheckSpec("config/offered-fields", "seed 002; design.md semantics 3", config_offered_fields),
    CheckSpec("reply-ack/every-request", "vhost-user.rst REPLY_ACK", reply_ack),
)

__all__ = ["CHECKS", "EVERY_NEED_REPLY", "feature_names"]
