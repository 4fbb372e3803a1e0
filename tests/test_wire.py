"""Round-trip tests for every vhost-user message layout."""

from __future__ import annotations

import pytest

from vuser import wire
from vuser.wire import BackendRequest as B
from vuser.wire import Request as R

REGION = dict(guest_phys_addr=0x100000, memory_size=0x200000, userspace_addr=0x7F0000000000, mmap_offset=0x1000)

SAMPLES: dict[R, tuple[dict, int]] = {
    R.GET_FEATURES: ({}, 0),
    R.SET_FEATURES: ({"u64": (1 << 32) | (1 << 29)}, 0),
    R.SET_OWNER: ({}, 0),
    R.RESET_OWNER: ({}, 0),
    R.SET_MEM_TABLE: ({"nregions": 2, "regions": [REGION, REGION]}, 2),
    R.SET_LOG_BASE: ({"mmap_size": 4096, "mmap_offset": 0}, 1),
    R.SET_LOG_FD: ({}, 1),
    R.SET_VRING_NUM: ({"index": 1, "num": 256}, 0),
    R.SET_VRING_ADDR: ({"index": 0, "flags": 0, "desc_user_addr": 1, "used_user_addr": 2,
                        "avail_user_addr": 3, "log_guest_addr": 4}, 0),
    R.SET_VRING_BASE: ({"index": 2, "num": 7}, 0),
    R.GET_VRING_BASE: ({"index": 2, "num": 0}, 0),
    R.SET_VRING_KICK: ({"u64": 1}, 1),
    R.SET_VRING_CALL: ({"u64": 1}, 1),
    R.SET_VRING_ERR: ({"u64": 1 | wire.VRING_NOFD_MASK}, 0),
    R.GET_PROTOCOL_FEATURES: ({}, 0),
    R.SET_PROTOCOL_FEATURES: ({"u64": 0x1B}, 0),
    R.GET_QUEUE_NUM: ({}, 0),
    R.SET_VRING_ENABLE: ({"index": 0, "num": 1}, 0),
    R.SEND_RARP: ({"mac": b"\x52\x54\x00\x12\x34\x56"}, 0),
    R.NET_SET_MTU: ({"u64": 9000}, 0),
    R.SET_BACKEND_REQ_FD: ({}, 1),
    R.IOTLB_MSG: ({"iova": 1, "size": 2, "uaddr": 3, "perm": 3, "type": 2}, 0),
    R.SET_VRING_ENDIAN: ({"index": 0, "num": 0}, 0),
    R.GET_CONFIG: ({"offset": 0, "size": 8, "flags": 0, "payload": bytes(8)}, 0),
    R.SET_CONFIG: ({"offset": 4, "size": 4, "flags": 0, "payload": b"\x01\x02\x03\x04"}, 0),
    R.CREATE_CRYPTO_SESSION: ({"session_id": -1, "rest": b"\x00" * 40}, 0),
    R.CLOSE_CRYPTO_SESSION: ({"u64": 5}, 0),
    R.POSTCOPY_ADVISE: ({}, 0),
    R.POSTCOPY_LISTEN: ({}, 0),
    R.POSTCOPY_END: ({}, 0),
    R.GET_INFLIGHT_FD: ({"mmap_size": 0, "mmap_offset": 0, "num_queues": 2, "queue_size": 256}, 0),
    R.SET_INFLIGHT_FD: ({"mmap_size": 4096, "mmap_offset": 0, "num_queues": 2, "queue_size": 256}, 1),
    R.GPU_SET_SOCKET: ({}, 1),
    R.RESET_DEVICE: ({}, 0),
    R.VRING_KICK: ({"index": 0, "num": 0}, 0),
    R.GET_MAX_MEM_SLOTS: ({}, 0),
    R.ADD_MEM_REG: ({"region": REGION}, 1),
    R.REM_MEM_REG: ({"region": REGION}, 1),
    R.SET_STATUS: ({"u64": 0xF}, 0),
    R.GET_STATUS: ({}, 0),
    R.GET_SHARED_OBJECT: ({"uuid": bytes(range(16))}, 0),
    R.SET_DEVICE_STATE_FD: ({"direction": 0, "phase": 0}, 1),
    R.CHECK_DEVICE_STATE: ({}, 0),
}

BACKEND_SAMPLES: dict[B, tuple[dict, int]] = {
    B.IOTLB_MSG: ({"iova": 1, "size": 2, "uaddr": 3, "perm": 1, "type": 1}, 0),
    B.CONFIG_CHANGE_MSG: ({}, 0),
    B.VRING_HOST_NOTIFIER_MSG: ({"u64": 0, "size": 4096, "offset": 0}, 1),
    B.VRING_CALL: ({"index": 0, "num": 0}, 0),
    B.VRING_ERR: ({"index": 0, "num": 0}, 0),
    B.SHARED_OBJECT_ADD: ({"uuid": bytes(16)}, 0),
    B.SHARED_OBJECT_REMOVE: ({"uuid": bytes(16)}, 0),
    B.SHARED_OBJECT_LOOKUP: ({"uuid": bytes(16)}, 0),
}


def test_every_request_has_a_sample() -> None:
    assert set(SAMPLES) == set(R)
    assert set(BACKEND_SAMPLES) == set(B)


def _strip(obj):  # construct Containers -> plain values for comparison
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@pytest.mark.parametrize("req", list(R), ids=lambda r: r.name)
def test_request_round_trip(req: R) -> None:
    payload, nfds = SAMPLES[req]
    msg = wire.encode(req, payload, flags=wire.FLAG_NEED_REPLY)
    header = wire.decode_header(msg[: wire.HEADER_SIZE])
    assert header.request == req
    assert header.need_reply and not header.is_reply
    assert header.size == len(msg) - wire.HEADER_SIZE
    parsed = wire.decode_payload(header.request, msg[wire.HEADER_SIZE:], nfds)
    assert _strip(dict(parsed)) == _strip(payload) if payload else parsed == {}
    assert wire.encode(req, parsed, flags=wire.FLAG_NEED_REPLY) == msg


@pytest.mark.parametrize("req", list(B), ids=lambda r: r.name)
def test_backend_round_trip(req: B) -> None:
    payload, nfds = BACKEND_SAMPLES[req]
    msg = wire.encode(req, payload, backend=True)
    header = wire.decode_header(msg[: wire.HEADER_SIZE])
    parsed = wire.decode_payload(header.request, msg[wire.HEADER_SIZE:], nfds, backend=True)
    assert wire.encode(req, parsed, backend=True) == msg


def test_reply_flags_exactly_version_and_reply() -> None:
    # DPDK's virtio_user insists on flags == 0x5 in replies (design.md).
    reply = wire.encode_u64_reply(R.GET_FEATURES, 7)
    assert wire.Header.parse(reply[:12]).flags == 0x5
    assert wire.decode_reply(R.GET_FEATURES, reply[12:]).u64 == 7


def test_header_checks() -> None:
    with pytest.raises(wire.WireError, match="version"):
        wire.decode_header(wire.Header.build(dict(request=1, flags=2, size=0)))
    with pytest.raises(wire.WireError, match="reserved flag"):
        wire.decode_header(wire.Header.build(dict(request=1, flags=0x101, size=0)))
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.decode_header(wire.Header.build(dict(request=1, flags=1, size=1 << 20)))
    with pytest.raises(wire.WireError):
        wire.decode_header(b"\x00" * 5)


@pytest.mark.parametrize("req,payload,nfds,fault", [
    (R.SET_FEATURES, b"\x00" * 4, 0, "payload is 4 bytes"),
    (R.SET_VRING_NUM, b"\x00" * 12, 0, "expected 8"),
    (R.SET_VRING_KICK, b"\x00" * 8, 2, "carries 2 fds"),
    (R.SET_BACKEND_REQ_FD, b"", 0, "carries 0 fds"),
    (R.SET_FEATURES, b"\x00" * 8, 1, "carries 1 fds"),
    (R.SET_MEM_TABLE, (9).to_bytes(4, "little") + bytes(4), 0, "at most 8"),
    (R.SET_MEM_TABLE, (1).to_bytes(4, "little") + bytes(4 + 16), 0, "for 1 regions"),
    (R.GET_CONFIG, (0).to_bytes(4, "little") + (300).to_bytes(4, "little") + bytes(4), 0, "exceeds"),
    (R.GET_CONFIG, (0).to_bytes(4, "little") + (8).to_bytes(4, "little") + bytes(4 + 4), 0, "header says"),
])
def test_bad_sizes_and_fds(req: R, payload: bytes, nfds: int, fault: str) -> None:
    with pytest.raises(wire.WireError, match=fault) as info:
        wire.decode_payload(req, payload, nfds)
    assert info.value.request == req.name


def test_unknown_request() -> None:
    with pytest.raises(wire.WireError, match="unknown request"):
        wire.decode_payload(99, b"", 0)


def test_full_eight_slot_mem_table_accepted() -> None:
    body = wire.MemTable.build(dict(nregions=1, regions=[REGION])) + bytes(7 * wire.MEMORY_REGION_SIZE)
    parsed = wire.decode_payload(R.SET_MEM_TABLE, body, 1)
    assert parsed.nregions == 1 and parsed.regions[0].memory_size == REGION["memory_size"]
