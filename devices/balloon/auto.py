"""The built-in balloon policy ``auto``, in the spirit of oVirt MOM's
balloon rules (``balloon.rules``: shrink guests while the host is under
pressure, in bounded steps, never taking a guest below its free-memory
reserve or its floor; grow them back otherwise).

    vuser run balloon --policy auto[:key=value,...]

Keys (sizes are bytes with a unit, ``128M``, or a share of guest RAM,
``25%``; fractions are ``0.2`` or ``20%``):

=============  =======  ======================================================
key            default  meaning
=============  =======  ======================================================
``floor``      ``25%``  the guest keeps at least this much RAM: the balloon
                        never grows past guest RAM minus the floor
``step``       ``5%``   most the balloon grows in one decision (MOM's
                        max_balloon_change_percent)
``pressure``   ``0.2``  the host is short while less than this share of its
                        memory is available (MOM's pressure_threshold)
``relax``      ``0.3``  the host has room again from this share on; between
                        ``pressure`` and ``relax`` nothing moves (hysteresis)
``guest-free`` ``0.2``  the guest is short while less than this share of the
                        memory it can use is available (MOM's
                        min_guest_free_percent)
=============  =======  ======================================================

Plus the keys of every policy (``policy``): ``interval``, ``meminfo``,
``cgroup``.

Rules, first match wins (sizes in bytes; "total" and "available" are the
guest's, from its stats):

1. no guest stats yet                 -> hold
2. guest short, or will be by its     -> deflate by the shortfall plus a step
   next stats at the rate it last        (fast: the guest must not reach OOM)
   used memory (the fall of its
   available memory between its last
   two samples, less what the balloon
   itself took)
3. balloon above RAM - floor          -> deflate to RAM - floor
4. the guest lags more than a step    -> hold (asking for more would only pile
   behind the target                     up an unmet target)
5. host short                         -> inflate by a step, but leave the guest
                                         its reserve plus a step (so rule 2
                                         does not fire at once), and never
                                         past RAM - floor
6. host has room                      -> deflate by a step
7. otherwise                          -> hold

Changes under ``MIN_CHANGE`` are not made (MOM's min_balloon_change).
"""

from __future__ import annotations

from dataclasses import dataclass

from vuser.device import DeviceError

from .pages import PAGE_SIZE, parse_size
from .policy import PolicyInput, Target

MIN_CHANGE = 1 << 20
MiB = 1 << 20


@dataclass(frozen=True)
class Amount:
    """A size: bytes, or a share of guest RAM."""

    bytes: int = 0
    share: float | None = None

    @classmethod
    def parse(cls, key: str, text: str) -> Amount:
        if text.endswith("%"):
            return cls(share=_fraction(key, text))
        try:
            return cls(bytes=parse_size(text) * PAGE_SIZE)
        except DeviceError:
            raise DeviceError(f"{key}={text!r} is not a size (128M) or a share of RAM (25%)") from None

    def of(self, ram: int) -> int:
        return int(ram * self.share) if self.share is not None else self.bytes


def _fraction(key: str, text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise DeviceError(f"{key}={text!r} is not a fraction (0.2 or 20%)") from None
    if not 0 <= value <= 1:
        raise DeviceError(f"{key}={text!r} is outside 0..1")
    return value


class AutoPolicy:
    """See the module docstring; an instance is the policy callable."""

    def __init__(self, *, floor: str = "25%", step: str = "5%", pressure: str = "0.2", relax: str = "0.3",
                 guest_free: str = "0.2") -> None:
        self.floor = Amount.parse("floor", floor)
        self.step = Amount.parse("step", step)
        self.pressure = _fraction("pressure", pressure)
        self.relax = _fraction("relax", relax)
        self.guest_free = _fraction("guest-free", guest_free)
        # The last stats sample seen (its time, available, balloon actual)
        # and what the guest used between it and the one before (rule 2).
        self._sample: tuple[float, int, int] | None = None
        self._use = 0
        if self.relax < self.pressure:
            raise DeviceError(f"relax={relax} is below pressure={pressure}")
        if self.step.of(1 << 30) <= 0:
            raise DeviceError(f"step={step} is no step")

    def __call__(self, inputs: PolicyInput) -> Target:
        total, available = inputs.guest_total, inputs.guest_available
        if total is None or available is None:
            return Target(inputs.target, "no guest stats yet")
        ram, target = inputs.guest_ram, inputs.target
        step = self.step.of(ram)
        ceiling = max(0, ram - self.floor.of(ram))
        reserve = int(self.guest_free * total)
        guest = f"guest {available // MiB} of {total // MiB} MiB available"
        use = self._guest_use(inputs, available)
        if available - use < reserve:
            shortfall = reserve - (available - use)
            using = f", using {use // MiB} MiB a sample" if use else ""
            return Target(max(0, target - shortfall - step),
                          f"guest short: {guest}{using} < {self.guest_free:.0%} reserve")
        if target > ceiling:
            return Target(ceiling, f"floor: the guest keeps {(ram - ceiling) // MiB} MiB")
        if inputs.actual < target - step:
            return Target(target, f"guest lags: balloon {inputs.actual // MiB} of {target // MiB} MiB")
        host = inputs.host
        if host is None:
            return Target(target, "host figures unreadable")
        share = host.available_fraction
        if share < self.pressure:
            grow = min(step, available - reserve - step, ceiling - target)
            if grow < MIN_CHANGE:
                return Target(target, f"host short ({share:.0%} available) but {guest}: nothing to take")
            return Target(target + grow, f"host short: {share:.0%} available < {self.pressure:.0%}; {guest}")
        if share >= self.relax and target > 0:
            return Target(max(0, target - step), f"host has room: {share:.0%} available >= {self.relax:.0%}")
        return Target(target, f"host {share:.0%} available; {guest}")

    def _guest_use(self, inputs: PolicyInput, available: int) -> int:
        """What the guest itself took between its last two stats samples:
        the fall of its available memory less what the balloon took (an
        inflation lowers it too, a deflation raises it).  As much again may
        go before the next sample, so rule 2 looks ahead by that (a hungry
        program would otherwise eat the reserve between two looks)."""
        if inputs.stats_age is None:
            return 0
        taken = inputs.time - inputs.stats_age
        last = self._sample
        if last is None or taken > last[0]:
            if last is not None:
                self._use = max(0, (last[1] - available) - (inputs.actual - last[2]))
            self._sample = (taken, available, inputs.actual)
        return self._use
