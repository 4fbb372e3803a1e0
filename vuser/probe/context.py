"""What every check works with: the target, the device profile, the
timeouts, and the steps most checks share (a session as a given front-end,
a Linux-like driver probe, the requests that make the back-end work).

A check is ``async fn(Probe) -> str``: the detail of a pass; it raises
``Fail`` (the back-end broke the spec or a seed), ``Skip`` (does not apply
here), ``BackendGone`` (nothing to talk to: an error); a ``FrontendError``
from the harness (no reply, a bad reply, a refusal, a disconnect) is a
failure of the request it names.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from vuser.device import ConfigField
from vuser.frontend import Driver, Frontend, Personality, UsedElem
from vuser.frontend.queue import DriverQueueBase
from vuser.probe.profiles import Profile
from vuser.probe.target import ProbeTarget
from vuser.probe.work import Fail, Skip, Work, serve
from vuser.virtio import Transport, has
from vuser.wire import ProtocolFeature as PF

# Seconds to wait for requests the back-end must complete.
SERVE_TIMEOUT = 5.0
# Seconds during which the back-end must *not* do something (complete a
# request on a ring that does not exist, call when not asked): the probe
# can only look for so long, so these checks catch a misbehaviour that
# shows within it.
QUIET = 0.5


@dataclass
class Probe:
    """The probe run as checks see it."""

    target: ProbeTarget
    profile: Profile
    timeout: float = SERVE_TIMEOUT
    quiet: float = QUIET
    # Facts from the last handshake: what the back-end offers.
    features: int | None = None
    protocol_features: int | None = None
    queue_num: int | None = None
    queue_policy: str | None = None
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------- sessions

    @asynccontextmanager
    async def session(self, personality: str | Personality = "qemu-11.1",
                      **options: Any) -> AsyncIterator[Frontend]:
        """A connection as ``personality``, with the profile's queue count,
        config size and protocol features unless ``options`` say otherwise."""
        queues = self.profile.num_queues or self.queue_num
        if queues is not None:   # a personality that does not ask (DPDK) gets the count QEMU got
            options.setdefault("num_queues", queues)
        if self.profile.config_size:
            options.setdefault("config_size", self.profile.config_size)
        if self.profile.protocol_features is not None:
            options.setdefault("protocol_features", self.profile.protocol_features)
        async with self.target.session(personality=personality, **options) as fe:
            if fe.backend_features is not None:
                self.features = fe.backend_features
                self.protocol_features = fe.offered_protocol_features or 0
            if fe.queue_num:
                self.queue_num = fe.queue_num
            yield fe

    @asynccontextmanager
    async def running(self, personality: str | Personality = "qemu-11.1", *, session: dict[str, Any] | None = None,
                      needs: tuple[Transport, str] | None = None, **driver_options: Any) -> AsyncIterator[Running]:
        """A session with the device probed and started (``driver_options``:
        ``Driver`` options).  ``needs``: a ring feature and its name; the
        check is skipped when the back-end does not offer it or the driver
        did not negotiate it."""
        if needs is not None:
            self.require(needs[0], needs[1])
        async with self.session(personality, **(session or {})) as fe:
            drv, work = await self.start(fe, **driver_options)
            if needs is not None and not has(drv.negotiated_features or 0, needs[0]):
                raise Skip(f"{needs[1]} not negotiated")
            yield Running(self, fe, drv, work, drv.queue(work.queue))

    def driver(self, fe: Frontend, *, decline: tuple[int, ...] = (), **options: Any) -> Driver:
        options.setdefault("queues", self.profile.queues)
        options.setdefault("features", self.profile.driver_features)
        return Driver(fe, decline=(*self.profile.decline, *decline), **options)

    async def start(self, fe: Frontend, **options: Any) -> tuple[Driver, Work]:
        """A Linux-like probe of the device (``Driver`` options) and the
        requests that make it work."""
        drv = self.driver(fe, **options)
        await drv.probe()
        return drv, self.profile.work(drv)

    # ---------------------------------------------------------- facts

    def offers(self, bit: int) -> bool:
        return self.features is not None and has(self.features, bit)

    def offers_protocol(self, feature: PF) -> bool:
        return self.protocol_features is not None and has(self.protocol_features, feature)

    def require(self, bit: int, why: str) -> None:
        if self.features is not None and not has(self.features, bit):
            raise Skip(f"{why} not offered")

    def require_protocol(self, feature: PF, fe: Frontend) -> None:
        if not fe.has_protocol_feature(feature):
            raise Skip(f"protocol feature {feature.name} not offered")

    def existing_fields(self) -> list[ConfigField]:
        """Config fields that exist per the back-end's offered features
        (seed 002: a field exists when its feature is offered)."""
        bits = {f.short: f.bit for f in self.profile.features}
        return [f for f in self.profile.config_fields
                if f.feature is None or (f.feature in bits and self.offers(bits[f.feature]))]


@dataclass
class Running:
    """A started device: the session, the driver, the requests and the
    queue they go on."""

    probe: Probe
    fe: Frontend
    drv: Driver
    work: Work
    q: DriverQueueBase

    async def serve(self, count: int, **options: Any) -> list[UsedElem]:
        """``count`` requests served (``work.serve`` options)."""
        return await serve(self.q, self.work, count, timeout=self.probe.timeout, **options)

    async def stop(self, expected: int | None = None) -> int | None:
        """QEMU's power-off; the work queue's GET_VRING_BASE, which must be
        ``expected`` when given (only the vring-base and reconnect checks
        judge it, so one wrong base fails those, not every check)."""
        base = (await self.fe.stop()).get(self.work.queue)
        if expected is not None and base != expected:
            raise Fail(f"GET_VRING_BASE of queue {self.work.queue}: {base}, expected {expected}")
        return base


Check = Callable[[Probe], Awaitable[str]]


@dataclass(frozen=True)
class CheckSpec:
    """A named check, the spec section or seed it tests, the device types
    it applies to (None: all)."""

    name: str
    cites: str
    run: Check
    devices: tuple[str, ...] | None = None


__all__ = ["QUIET", "SERVE_TIMEOUT", "Check", "CheckSpec", "Probe", "Running"]
