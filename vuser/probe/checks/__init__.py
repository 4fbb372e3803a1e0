"""Every check the probe runs, in order: the session (handshakes,
negotiation, config, REPLY_ACK), the rings, the memory table, what
outlives a connection (reconnect, hostile messages), the devices' data,
and the queue-layout rule (seeds 000, 001)."""

from vuser.probe.checks import data, layout, memory, rings, robust, session
from vuser.probe.context import CheckSpec

ALL: tuple[CheckSpec, ...] = (*session.CHECKS, *rings.CHECKS, *memory.CHECKS, *robust.CHECKS, *data.CHECKS,
                              *layout.CHECKS)

__all__ = ["ALL"]
