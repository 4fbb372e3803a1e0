"""One table: every request row names an event type; the session has one
check per supported request that builds exactly that event; the handler
applies every event type; the harness expects a reply exactly where the
table says one comes."""

from __future__ import annotations

import pytest

from vuser import events as E
from vuser import wire
from vuser.frontend.connection import replies
from vuser.handler import Handler
from vuser.protocol import Session
from vuser.wire import ProtocolFeature as PF
from vuser.wire import Request as R


def test_every_request_is_one_row() -> None:
    assert set(wire.REQUESTS) == set(R)
    for req, spec in wire.REQUESTS.items():
        assert issubclass(spec.event, E.Event), req


def test_supported_rows_have_a_check_and_a_handler() -> None:
    supported = {req for req, spec in wire.REQUESTS.items() if spec.event is not E.Unsupported}
    assert set(Session._CHECKS) == supported
    assert {spec.event for req, spec in wire.REQUESTS.items() if req in supported} <= set(Handler._APPLY)


def test_unsupported_rows_are_refused_by_name() -> None:
    from vuser.protocol import ProtocolError

    for req, spec in wire.REQUESTS.items():
        if spec.event is not E.Unsupported:
            continue
        s = Session(offered_features=0, num_queues=1)
        sizes = [n for n in range(0, 64) if spec.size(bytes(n)) is None]
        try:
            payload = bytes(spec.layout.sizeof() if spec.layout.sizeof() in sizes else sizes[0])
        except Exception:  # a variable layout (crypto sessions)
            payload = bytes(sizes[0])
        nfds = spec.fds[0]
        header = wire.RawHeader(req, wire.VERSION, len(payload))
        with pytest.raises(ProtocolError, match=f"^{req.name}: not supported"):
            s.receive(header, payload, list(range(100, 100 + nfds)))


@pytest.mark.parametrize("req, protocol_features, expected", [
    (R.GET_FEATURES, 0, True),
    (R.GET_VRING_BASE, 0, True),
    (R.GET_CONFIG, 0, True),
    (R.IOTLB_MSG, 0, True),                       # the old hand-written list forgot this one
    (R.SET_LOG_BASE, 0, False),                   # replies only with LOG_SHMFD
    (R.SET_LOG_BASE, 1 << PF.LOG_SHMFD, True),
    (R.SET_VRING_KICK, 0, False),
    (R.SET_MEM_TABLE, 0, False),
    (999, 0, False),
])
def test_harness_reply_expectations_come_from_the_table(req: int, protocol_features: int,
                                                         expected: bool) -> None:
    assert replies(req, protocol_features) is expected
