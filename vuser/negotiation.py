"""Feature negotiation over vhost-user: offered, accepted, negotiated.

vhost-user learns features late and in pieces (design.md semantics 1, 5,
6; seeds 002, 003, 004), so this is the one place that decides when a set
of features is final.  Sans-I/O: no sockets, no devices; the session
(``protocol.Session``) feeds it and raises ``NegotiationError`` as a
protocol error.

RULES
=====

1.  The device *offers* ``offered`` (fixed for the life of a connection).
2.  ``SET_FEATURES`` replaces the *accepted* set.  It may come any number
    of times, with 0 too (seeds 002, 004): no SET_FEATURES is final.
3.  Bits that were not offered are accepted with a warning: QEMU 7.2's
    vhost-user-rng forces EVENT_IDX and INDIRECT_DESC on (design.md).
4.  ``VHOST_F_LOG_ALL`` is a vhost bit, not a virtio one: it is toggled at
    any time (migration start and cancel) and never checked.
5.  Once FEATURES_OK has stuck, any other change of the accepted set
    without a reset is a protocol error.
6.  ``SET_STATUS`` that sets FEATURES_OK for the first time asks the device
    to validate the accepted set: refused, the bit does not stick (the
    driver reads it back, virtio spec 3.1.1 step 6); accepted, the
    accepted set becomes *negotiated*.
7.  A legacy driver (VERSION_1 not accepted, seed 003) has no FEATURES_OK
    step: its accepted set becomes negotiated at DRIVER_OK.
8.  A front-end without the STATUS protocol feature (QEMU 7.2's rng, DPDK
    without STATUS) sends SET_FEATURES once, when the device starts: its
    accepted set becomes negotiated when the first ring starts (kick fd).
9.  ``SET_STATUS 0`` and ``RESET_DEVICE`` forget accepted, negotiated and
    status: negotiation starts over.
10. Until something is negotiated, rings and devices follow the latest
    accepted set (``effective``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .virtio import Status, Transport, has, mask

log = logging.getLogger(__name__)

LOG_ALL = mask(Transport.LOG_ALL)


class NegotiationError(Exception):
    """The front-end broke a negotiation rule (a protocol error)."""


@dataclass(frozen=True)
class StatusChange:
    """What a SET_STATUS asks for (rule 6): ``features_ok_requested`` when
    this write sets FEATURES_OK for the first time."""

    status: int
    features_ok_requested: bool
    accepted: int


@dataclass
class Negotiation:
    offered: int
    accepted: int | None = None
    negotiated: int | None = None
    status: int = 0
    needs_reset: bool = False

    @property
    def effective(self) -> int:
        """Rule 10: what rings and the device follow right now."""
        if self.negotiated is not None:
            return self.negotiated
        return self.accepted or 0

    def set_features(self, value: int) -> None:
        """Rules 2-5."""
        unknown = value & ~self.offered & ~LOG_ALL
        if unknown:
            log.warning("SET_FEATURES accepts bits that were not offered: %#x", unknown)
        if (self.negotiated is not None and self.status & Status.FEATURES_OK
                and (value ^ self.negotiated) & ~LOG_ALL):
            raise NegotiationError("features changed after FEATURES_OK without a reset")
        self.accepted = value

    def set_status(self, value: int) -> StatusChange:
        """Rules 6, 7 and 9 (the device's verdict comes with ``settle``)."""
        if value == 0:
            self.reset()
            return StatusChange(0, False, 0)
        first_ok = bool(value & Status.FEATURES_OK) and not self.status & Status.FEATURES_OK
        if (value & Status.DRIVER_OK and not value & Status.FEATURES_OK and self.negotiated is None
                and self.accepted is not None and not has(self.accepted, Transport.VERSION_1)):
            self.negotiated = self.accepted  # rule 7
        return StatusChange(value, first_ok, self.accepted or 0)

    def settle(self, change: StatusChange, refused: bool) -> None:
        """Rule 6: the device validated (or refused) the accepted set."""
        if change.status == 0:
            return
        value = change.status
        if change.features_ok_requested:
            if refused:
                value &= ~int(Status.FEATURES_OK)
            else:
                self.negotiated = change.accepted
        self.status = value

    def ring_started(self, status_protocol: bool) -> None:
        """Rule 8."""
        if self.negotiated is None and not status_protocol and self.accepted is not None:
            self.negotiated = self.accepted

    def reset(self) -> None:
        """Rule 9."""
        self.accepted = None
        self.negotiated = None
        self.status = 0
        self.needs_reset = False

    @property
    def device_status(self) -> int:
        """GET_STATUS: the status, with DEVICE_NEEDS_RESET once the guest
        broke a ring (virtio spec 2.1.2)."""
        return self.status | (Status.DEVICE_NEEDS_RESET if self.needs_reset else 0)
