"""The sans-I/O session on QEMU-like sequences (no sockets, no memory)."""

from __future__ import annotations

import pytest

from vuser import events as E
from vuser import protocol as P
from vuser import wire
from vuser.virtio import Status
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request as R

EVENT_IDX = 1 << 29
INDIRECT = 1 << 28
VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << 30
DEV_A = 1 << 0
DEV_B = 1 << 1
OFFERED = DEV_A | DEV_B | EVENT_IDX | INDIRECT | VERSION_1


def session(**kw) -> P.Session:
    return P.Session(offered_features=OFFERED, num_queues=3, has_config=True, **kw)


def send(s: P.Session, req: R, payload: dict | None = None, fds: list[int] | None = None,
         need_reply: bool = False) -> tuple[E.Event, bytes | None]:
    msg = wire.encode(req, payload or {}, flags=wire.FLAG_NEED_REPLY if need_reply else 0)
    header = wire.decode_header(msg[:12])
    event = s.receive(header, msg[12:], list(fds or []))
    return event, None


def roundtrip(s: P.Session, req: R, payload: dict | None = None, fds: list[int] | None = None,
              need_reply: bool = False, result=None):
    event, _ = send(s, req, payload, fds, need_reply)
    return event, s.reply(event, result)


def u64(reply: bytes) -> int:
    header = wire.decode_header(reply[:12])
    assert header.flags == 0x5
    return wire.U64.parse(reply[12:]).u64


def negotiate_protocol(s: P.Session, bits: int) -> None:
    roundtrip(s, R.SET_PROTOCOL_FEATURES, {"u64": bits})


ALL_PF = (1 << PF.MQ) | (1 << PF.REPLY_ACK) | (1 << PF.BACKEND_REQ) | (1 << PF.CONFIG) | (1 << PF.STATUS)


def test_qemu_connect_sequence_answers() -> None:
    s = session()
    _, r = roundtrip(s, R.GET_FEATURES)
    assert u64(r) == OFFERED | PROTOCOL_FEATURES
    _, r = roundtrip(s, R.GET_PROTOCOL_FEATURES)
    offered_pf = u64(r)
    for f in (PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.STATUS, PF.RESET_DEVICE,
              PF.CONFIGURE_MEM_SLOTS):
        assert offered_pf & (1 << f), f.name
    negotiate_protocol(s, ALL_PF)
    _, r = roundtrip(s, R.GET_QUEUE_NUM)
    assert u64(r) == 3
    ev, r = roundtrip(s, R.SET_BACKEND_REQ_FD, fds=[99], need_reply=True)
    assert isinstance(ev, E.BackendChannelSet) and ev.fd == 99
    assert u64(r) == 0  # REPLY_ACK success
    ev, r = roundtrip(s, R.SET_OWNER)
    assert r is None
    _, r = roundtrip(s, R.GET_MAX_MEM_SLOTS)
    assert u64(r) >= 32


def test_reply_ack_only_when_negotiated_and_asked() -> None:
    s = session()
    _, r = roundtrip(s, R.SET_VRING_NUM, {"index": 0, "num": 64}, need_reply=True)
    assert r is None  # REPLY_ACK not negotiated yet
    negotiate_protocol(s, 1 << PF.REPLY_ACK)
    _, r = roundtrip(s, R.SET_VRING_NUM, {"index": 0, "num": 64}, need_reply=False)
    assert r is None
    _, r = roundtrip(s, R.SET_VRING_NUM, {"index": 0, "num": 64}, need_reply=True)
    assert u64(r) == 0
    _, r = roundtrip(s, R.SET_CONFIG, {"offset": 0, "size": 1, "flags": 0, "payload": b"x"},
                     need_reply=True, result=E.Refusal("nope"))
    assert u64(r) == 1


def test_feature_rewrites_are_not_final_until_features_ok() -> None:
    # Seeds 002/004: features may be written several times, including 0,
    # and config may be read before any of it.
    s = session()
    negotiate_protocol(s, ALL_PF)
    ev, r = roundtrip(s, R.GET_CONFIG, {"offset": 0, "size": 4, "flags": 0, "payload": bytes(4)},
                      result=b"\x01\x02\x03\x04")
    assert isinstance(ev, E.ConfigRead) and r is not None and r.endswith(b"\x01\x02\x03\x04")
    assert s.accepted_features is None
    for value in (DEV_A | DEV_B | VERSION_1, 0, DEV_A | VERSION_1):
        ev, _ = roundtrip(s, R.SET_FEATURES, {"u64": value})
        assert isinstance(ev, E.FeaturesSet) and s.accepted_features == value
        assert s.negotiated_features is None
    ev, _ = send(s, R.SET_STATUS, {"u64": Status.FEATURES_OK | 3})
    assert isinstance(ev, E.StatusSet) and ev.features_ok_requested and ev.accepted == DEV_A | VERSION_1
    s.reply(ev, None)
    assert s.negotiated_features == DEV_A | VERSION_1
    _, r = roundtrip(s, R.GET_STATUS)
    assert u64(r) & Status.FEATURES_OK


def test_refused_features_ok_does_not_stick() -> None:
    s = session()
    negotiate_protocol(s, ALL_PF)
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_B})
    ev, r = roundtrip(s, R.SET_STATUS, {"u64": Status.FEATURES_OK | 3}, need_reply=True,
                      result=E.Refusal("DEV_B needs DEV_A"))
    assert u64(r) == 1
    assert s.negotiated_features is None
    _, r = roundtrip(s, R.GET_STATUS)
    assert not u64(r) & Status.FEATURES_OK
    # The driver may try again with another subset.
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A | DEV_B})
    roundtrip(s, R.SET_STATUS, {"u64": Status.FEATURES_OK | 3})
    assert s.negotiated_features == DEV_A | DEV_B


def test_without_status_features_final_when_ring_starts() -> None:
    # QEMU 7.2 rng / DPDK without STATUS: one late SET_FEATURES, then rings.
    s = session()
    negotiate_protocol(s, 1 << PF.REPLY_ACK)
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A | EVENT_IDX})
    assert s.negotiated_features is None
    assert s.effective_features == DEV_A | EVENT_IDX
    ev, _ = roundtrip(s, R.SET_VRING_KICK, {"u64": 0}, fds=[10])
    assert isinstance(ev, E.VringFd) and ev.fd == 10
    assert s.negotiated_features == DEV_A | EVENT_IDX


def test_unoffered_feature_bits_accepted_with_warning(caplog) -> None:
    s = P.Session(offered_features=DEV_A, num_queues=1)
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A | EVENT_IDX | INDIRECT})
    assert s.accepted_features == DEV_A | EVENT_IDX | INDIRECT
    assert "not offered" in caplog.text


def test_status_zero_resets() -> None:
    s = session()
    negotiate_protocol(s, ALL_PF)
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A})
    roundtrip(s, R.SET_STATUS, {"u64": 0xF})
    ev, _ = roundtrip(s, R.SET_STATUS, {"u64": 0})
    assert isinstance(ev, E.StatusSet) and ev.status == 0
    assert s.accepted_features is None and s.negotiated_features is None and s.status == 0


def test_needs_reset_reported_through_status() -> None:
    s = session()
    s.mark_needs_reset()
    _, r = roundtrip(s, R.GET_STATUS)
    assert u64(r) & Status.DEVICE_NEEDS_RESET


def test_get_vring_base_reply_carries_result() -> None:
    s = session()
    ev, r = roundtrip(s, R.GET_VRING_BASE, {"index": 2, "num": 0}, result=0x1234)
    assert isinstance(ev, E.VringStop)
    assert wire.VringState.parse(r[12:]) == dict(index=2, num=0x1234)


@pytest.mark.parametrize("req,payload,fds,fault", [
    (R.SET_VRING_NUM, {"index": 3, "num": 64}, [], "index 3 out of range"),
    (R.SET_VRING_NUM, {"index": 0, "num": 100}, [], "power of 2"),
    (R.SET_VRING_NUM, {"index": 0, "num": 0}, [], "power of 2"),
    (R.SET_VRING_ADDR, {"index": 9, "flags": 0, "desc_user_addr": 0, "used_user_addr": 0,
                        "avail_user_addr": 0, "log_guest_addr": 0}, [], "out of range"),
    (R.SET_VRING_BASE, {"index": 0, "num": 0x10000}, [], "split ring"),
    (R.SET_VRING_KICK, {"u64": 0}, [], "no fd attached"),
    (R.SET_VRING_CALL, {"u64": wire.VRING_NOFD_MASK}, [5], "no-fd flag is set"),
    (R.SET_VRING_ERR, {"u64": 1 << 12}, [], "reserved bits"),
    (R.SET_VRING_ENABLE, {"index": 0, "num": 2}, [], "not 0 or 1"),
    (R.SET_PROTOCOL_FEATURES, {"u64": 1 << PF.INFLIGHT_SHMFD}, [], "INFLIGHT_SHMFD"),
    (R.SET_VRING_ADDR, {"index": 0, "flags": 2, "desc_user_addr": 0, "used_user_addr": 0,
                        "avail_user_addr": 0, "log_guest_addr": 0}, [], "unknown flags 0x2"),
    (R.SET_BACKEND_REQ_FD, {}, [7], "BACKEND_REQ not negotiated"),
    (R.IOTLB_MSG, {"iova": 0, "size": 0, "uaddr": 0, "perm": 0, "type": 0}, [], "not supported"),
    (R.SET_LOG_BASE, {"mmap_size": 4096, "mmap_offset": 0}, [3], "LOG_SHMFD not negotiated"),
    # The postcopy family and device state transfer stay refused by name.
    (R.POSTCOPY_ADVISE, {}, [], "POSTCOPY_ADVISE: not supported"),
    (R.POSTCOPY_LISTEN, {}, [], "POSTCOPY_LISTEN: not supported"),
    (R.POSTCOPY_END, {}, [], "POSTCOPY_END: not supported"),
    (R.SET_DEVICE_STATE_FD, {"direction": 0, "phase": 0}, [3], "SET_DEVICE_STATE_FD: not supported"),
    (R.CHECK_DEVICE_STATE, {}, [], "CHECK_DEVICE_STATE: not supported"),
    (R.ADD_MEM_REG, {"region": dict(guest_phys_addr=0, memory_size=4096, userspace_addr=0, mmap_offset=0)},
     [3], "CONFIGURE_MEM_SLOTS not negotiated"),
    (R.SET_STATUS, {"u64": 0x100}, [], "8 bits"),
    (R.GET_CONFIG, {"offset": 250, "size": 8, "flags": 0, "payload": bytes(8)}, [], "beyond config"),
])
def test_protocol_errors_name_request_and_break_session(req, payload, fds, fault) -> None:
    s = session()
    with pytest.raises(P.ProtocolError, match=fault) as info:
        send(s, req, payload, fds)
    assert info.value.request == req.name
    # Sticky: nothing more is processed on this connection.
    with pytest.raises(P.ProtocolError):
        send(s, R.GET_FEATURES)


def test_wire_errors_become_protocol_errors() -> None:
    s = session()
    header = wire.RawHeader(R.SET_FEATURES, 1, 4)
    with pytest.raises(P.ProtocolError, match="SET_FEATURES: payload is 4 bytes"):
        s.receive(header, b"\0" * 4, [])
    s2 = session()
    with pytest.raises(P.ProtocolError, match="unknown request"):
        s2.receive(wire.RawHeader(77, 1, 0), b"", [])


def test_mem_table_fd_count_must_match_regions() -> None:
    s = session()
    region = dict(guest_phys_addr=0, memory_size=4096, userspace_addr=0, mmap_offset=0)
    with pytest.raises(P.ProtocolError, match="2 regions but 1 fds"):
        send(s, R.SET_MEM_TABLE, {"nregions": 2, "regions": [region, region]}, [4])


def test_features_cannot_change_after_features_ok() -> None:
    s = session()
    negotiate_protocol(s, ALL_PF)
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A})
    roundtrip(s, R.SET_STATUS, {"u64": 0xB})
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A | (1 << 26)})  # LOG_ALL toggles are fine
    with pytest.raises(P.ProtocolError, match="after FEATURES_OK"):
        send(s, R.SET_FEATURES, {"u64": DEV_A | DEV_B})


def test_legacy_driver_features_final_at_driver_ok() -> None:
    # Seed 003: a legacy driver (VERSION_1 not accepted) has no FEATURES_OK
    # step; with the STATUS protocol feature its features become final at
    # DRIVER_OK.
    s = session()
    negotiate_protocol(s, ALL_PF)
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A | EVENT_IDX})
    roundtrip(s, R.SET_STATUS, {"u64": Status.ACKNOWLEDGE | Status.DRIVER})
    assert s.negotiated_features is None
    roundtrip(s, R.SET_STATUS, {"u64": Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK})
    assert s.negotiated_features == DEV_A | EVENT_IDX


def test_modern_driver_needs_features_ok_not_driver_ok() -> None:
    s = session()
    negotiate_protocol(s, ALL_PF)
    roundtrip(s, R.SET_FEATURES, {"u64": DEV_A | VERSION_1})
    roundtrip(s, R.SET_STATUS, {"u64": Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK})
    assert s.negotiated_features is None


# ---------------------------------------------------------------- migration: the dirty log

def test_log_shmfd_is_offered() -> None:
    _, r = roundtrip(session(), R.GET_PROTOCOL_FEATURES)
    assert u64(r) & (1 << PF.LOG_SHMFD)


@pytest.mark.parametrize("need_reply", [False, True])
def test_set_log_base_replies_u64_zero(need_reply: bool) -> None:
    # QEMU waits for a reply to SET_LOG_BASE once LOG_SHMFD is negotiated
    # (vhost_user_set_log_base), with or without NEED_REPLY: one reply, a
    # u64 0, as libvhost-user and passt send.
    s = session()
    negotiate_protocol(s, ALL_PF | (1 << PF.LOG_SHMFD))
    ev, r = roundtrip(s, R.SET_LOG_BASE, {"mmap_size": 0x2000, "mmap_offset": 0x1000}, [9], need_reply=need_reply)
    assert isinstance(ev, E.LogBaseSet) and (ev.size, ev.offset, ev.fd) == (0x2000, 0x1000, 9)
    assert r is not None
    header = wire.decode_header(r[:12])
    assert header.request == R.SET_LOG_BASE and header.flags == wire.VERSION | wire.FLAG_REPLY
    assert u64(r) == 0


@pytest.mark.parametrize("payload,fds,fault", [
    ({"mmap_size": 0x1000, "mmap_offset": 0}, [], "no log fd attached"),
    ({"mmap_size": 0x1000, "mmap_offset": 2**64 - 0x800}, [9], "wraps 2\\^64"),
])
def test_set_log_base_refusals(payload: dict, fds: list[int], fault: str) -> None:
    s = session()
    negotiate_protocol(s, 1 << PF.LOG_SHMFD)
    with pytest.raises(P.ProtocolError, match=fault):
        send(s, R.SET_LOG_BASE, payload, fds)


def test_set_log_fd_and_vring_log_flag() -> None:
    s = session()
    ev, r = roundtrip(s, R.SET_LOG_FD, {}, [11])
    assert isinstance(ev, E.LogFdSet) and ev.fd == 11 and r is None
    ev, _ = roundtrip(s, R.SET_VRING_ADDR, {"index": 1, "flags": wire.VRING_F_LOG, "desc_user_addr": 0x1000,
                                            "used_user_addr": 0x3000, "avail_user_addr": 0x2000,
                                            "log_guest_addr": 0xABC000})
    assert isinstance(ev, E.VringAddr) and ev.flags == wire.VRING_F_LOG and ev.log == 0xABC000
