"""Balloon policies: what sets the balloon's target when nobody types
``set-target``.

A policy is a Python callable, ``policy(inputs: PolicyInput) -> target``:
the guest's stats and the host's memory figures in, the balloon size in
bytes out (a number, or a ``Target(size, reason)`` to say why).  It is
named by a spec ``NAME[:key=value,...]`` (``vuser run balloon --policy``,
``vuser ctl PATH policy set``) and found in the entry-point group
``vuser.balloon_policies``, the way devices are found in ``vuser.devices``;
vuser's own ``auto`` (``auto.AutoPolicy``) is registered there too.

Keys every policy takes (this module uses them): ``interval=S``, seconds
between consultations, which is also the guest's stats interval while the
policy is on (default ``DEFAULT_INTERVAL``); ``meminfo=PATH`` and
``cgroup=DIR``, where host memory is read (``host``).  The other keys are
the policy's own: an entry point naming a class is instantiated with them
as keyword arguments (dashes become underscores, values stay strings), so
the class checks them when the policy is set; a function finds them in
``inputs.params``.

Failure (the device keeps serving at the last target): a policy that
raises, answers something that is not a number, a negative number or more
than the guest's RAM, or takes longer than ``TIMEOUT`` seconds is switched
off with one log line.  A policy runs in a worker thread, so a slow one
does not stall the device's queues.

Every decision that changes the target is logged at INFO with its inputs
(one that keeps it at DEBUG) and kept (the last ``KEPT_DECISIONS``) for
``policy show`` and recorded time series.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import numbers
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, cast

import trio

from vuser.device import DeviceError
from vuser.registry import discover, load_object

from .host import PROC_MEMINFO, HostMemory, HostSource
from .pages import PAGE_SIZE

log = logging.getLogger(__name__)

GROUP = "vuser.balloon_policies"
# Used when vuser runs from a tree that was never installed (no entry-point
# metadata); an installed vuser registers these in pyproject.toml.
_BUILTIN = {"auto": "vuser.devices.balloon.auto:AutoPolicy"}
DEFAULT_INTERVAL = 2.0
MIN_INTERVAL = 0.1
MAX_INTERVAL = 3600.0
TIMEOUT = 5.0
KEPT_DECISIONS = 64
DRIVER_KEYS = ("interval", "meminfo", "cgroup")
MiB = 1 << 20
# Decision numbers, one sequence for every policy of the process: a row's
# cursor stays meaningful when the policy is replaced.
_SEQ = itertools.count(1)


class PolicyFailed(Exception):
    """The policy raised, answered nonsense or took too long: switch it off."""


@dataclass(frozen=True)
class Target:
    """A policy's answer with its reason (a bare number is an answer too)."""

    size: int | float
    reason: str = ""


@dataclass(frozen=True)
class PolicyInput:
    """What a policy sees; sizes in bytes.

    ``target`` and ``actual`` are balloon sizes (what the balloon should hold
    and what the guest says it holds); ``stats`` are the guest's latest
    statistics by name (``free-memory``, ``available-memory``,
    ``total-memory``, ... see ``vuser.virtio.BalloonStat``; empty before
    the first), ``stats_age`` their age in seconds; ``host`` is None when
    the host figures could not be read."""

    time: float
    guest_ram: int
    target: int
    actual: int
    stats: Mapping[str, int]
    stats_age: float | None
    deflate_on_oom: bool
    host: HostMemory | None
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def guest_total(self) -> int | None:
        """Memory the guest can use now.  Linux takes inflated pages out of
        MemTotal, except with DEFLATE_ON_OOM (they stay counted, since the
        guest may take them back): subtract them there."""
        total = self.stats.get("total-memory")
        if total is None:
            return None
        return max(0, total - self.actual) if self.deflate_on_oom else total

    @property
    def guest_available(self) -> int | None:
        return self.stats.get("available-memory", self.stats.get("free-memory"))

    def summary(self) -> dict[str, Any]:
        """The inputs worth logging and recording with a decision."""
        return {"guest_ram": self.guest_ram, "actual": self.actual, "guest_total": self.guest_total,
                "guest_available": self.guest_available, "stats_age": self.stats_age,
                "host": None if self.host is None else self.host.as_dict()}


@dataclass(frozen=True)
class PolicySpec:
    """``NAME[:key=value,...]``."""

    name: str
    params: Mapping[str, str]

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        name, _, rest = text.strip().partition(":")
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise DeviceError(f"policy spec {text!r}: expected NAME[:key=value,...]")
        params: dict[str, str] = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise DeviceError(f"policy spec {text!r}: {item!r} is not key=value")
            params[key.strip()] = value.strip()
        return cls(name, params)

    def __str__(self) -> str:
        return ":".join([self.name, ",".join(f"{k}={v}" for k, v in self.params.items())]).rstrip(":")


def available() -> dict[str, str]:
    """Policy name -> "module:object"."""
    return discover(GROUP, _BUILTIN)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DeviceError(f"policy interval {text!r} is not a number of seconds") from None
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise DeviceError(f"policy interval {value:g} is outside {MIN_INTERVAL:g}..{MAX_INTERVAL:g} seconds")
    return value


class ActivePolicy:
    """A policy loaded from its spec and switched on for one device."""

    def __init__(self, spec: PolicySpec, fn: Callable[[PolicyInput], Any], *, interval: float,
                 host: HostSource) -> None:
        self.spec = spec
        self.fn = fn
        self.interval = interval
        self.host = host
        self.own_params = {k: v for k, v in spec.params.items() if k not in DRIVER_KEYS}
        self.decisions: deque[dict[str, Any]] = deque(maxlen=KEPT_DECISIONS)
        self.seq = 0  # of this policy's last decision
        self.made = 0
        self.consulted = 0
        self.host_error: str | None = None
        self.last_host: HostMemory | None = None   # figures of the last consultation
        self.last_answer: dict[str, Any] | None = None   # and its answer, a decision or not

    @classmethod
    def load(cls, text: str) -> ActivePolicy:
        """Find, build and check the policy ``text`` names; DeviceError
        (a usage error) for an unknown name, a bad key or value, or a host
        source that cannot be read."""
        spec = PolicySpec.parse(text)
        targets = available()
        if spec.name not in targets:
            raise DeviceError(f"unknown balloon policy {spec.name!r} (available: {', '.join(sorted(targets))})")
        try:
            obj = load_object(targets[spec.name])
        except Exception as exc:  # a broken third-party package is its error, not ours
            raise DeviceError(f"balloon policy {spec.name}: cannot load {targets[spec.name]}: "
                              f"{type(exc).__name__}: {exc}") from None
        params = dict(spec.params)
        interval = _interval(params.get("interval", str(DEFAULT_INTERVAL)))
        host = HostSource(meminfo=params.get("meminfo", PROC_MEMINFO), cgroup=params.get("cgroup"))
        try:
            host.read()
        except OSError as exc:
            raise DeviceError(f"balloon policy {spec.name}: host memory: {exc}") from None
        own = {k.replace("-", "_"): v for k, v in params.items() if k not in DRIVER_KEYS}
        if isinstance(obj, type):
            try:
                fn = obj(**own)
            except Exception as exc:  # its refusal of a key or value (TypeError for an unknown one)
                raise DeviceError(f"balloon policy {spec.name}: {exc}") from None
        else:
            fn = obj
        if not callable(fn):
            raise DeviceError(f"balloon policy {spec.name}: {targets[spec.name]} is not callable")
        return cls(spec, fn, interval=interval, host=host)

    # ------------------------------------------------------------ consulting

    def _read_host(self) -> HostMemory | None:
        try:
            host = self.host.read()
        except OSError as exc:  # e.g. a file being rewritten: this round goes without
            if str(exc) != self.host_error:
                log.warning("balloon policy %s: host memory unreadable: %s", self.spec.name, exc)
            self.host_error = str(exc)
            return None
        self.host_error = None
        self.last_host = host
        return host

    def _evaluate(self, inputs: PolicyInput) -> tuple[PolicyInput, Any]:
        """In the worker thread: host figures, then the policy."""
        inputs = replace(inputs, host=self._read_host(), params=self.own_params)
        return inputs, self.fn(inputs)

    async def consult(self, inputs: PolicyInput) -> dict[str, Any] | None:
        """Ask the policy; the decision if it moves the target (None if
        not).  Raises PolicyFailed."""
        self.consulted += 1
        answer: Any = None
        with trio.move_on_after(TIMEOUT) as scope:
            try:
                inputs, answer = await _in_thread(self._evaluate, inputs)
            except Exception as exc:
                raise PolicyFailed(f"raised {type(exc).__name__}: {exc}") from exc
        if scope.cancelled_caught:
            raise PolicyFailed(f"gave no answer within {TIMEOUT:g}s (its thread is left to finish)")
        target, reason = _checked(answer, inputs.guest_ram)
        self.last_answer = {"time": inputs.time, "target": target, "reason": reason}
        if target == inputs.target:
            log.debug("balloon policy %s: target stays %d MiB (%s)", self.spec.name, target // MiB,
                      reason or "no reason given")
            return None
        self.seq = next(_SEQ)
        self.made += 1
        decision = {"seq": self.seq, "time": inputs.time, "policy": self.spec.name,
                    "action": "inflate" if target > inputs.target else "deflate",
                    "from": inputs.target, "to": target, "reason": reason, "inputs": inputs.summary()}
        self.decisions.append(decision)
        log.info("balloon policy %s: %s %d -> %d MiB (%s); inputs: %s", self.spec.name, decision["action"],
                 inputs.target // MiB, target // MiB, reason or "no reason given", _describe(inputs))
        return decision

    def decisions_since(self, seq: int | None) -> list[dict[str, Any]]:
        return [d for d in self.decisions if seq is None or d["seq"] > seq]

    def describe(self) -> dict[str, Any]:
        return {"spec": str(self.spec), "name": self.spec.name, "params": dict(self.spec.params),
                "interval": self.interval, "host": self.host.describe(), "host_error": self.host_error,
                "consulted": self.consulted, "decisions": self.made,
                "last": self.decisions[-1] if self.decisions else None, "last_answer": self.last_answer}


def _checked(answer: Any, guest_ram: int) -> tuple[int, str]:
    """The target in bytes (whole pages) and the reason, or PolicyFailed."""
    reason = ""
    if isinstance(answer, Target):
        answer, reason = answer.size, str(answer.reason)
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise PolicyFailed(f"answered {type(answer).__name__} {str(answer)[:60]!r}, not a number of bytes")
    value = float(answer)
    if not math.isfinite(value) or value < 0:
        raise PolicyFailed(f"answered {value:g}, not a size")
    if value > guest_ram:
        raise PolicyFailed(f"answered {value:.0f} bytes, more than the guest's {guest_ram} bytes of RAM")
    return int(value) // PAGE_SIZE * PAGE_SIZE, reason


def _describe(inputs: PolicyInput) -> str:
    def mib(n: int | None) -> str:
        return "?" if n is None else f"{n // MiB}"

    host = ("host unreadable" if inputs.host is None else
            f"host {mib(inputs.host.available)} of {mib(inputs.host.total)} MiB available "
            f"({inputs.host.source})")
    age = "no stats" if inputs.stats_age is None else f"stats {inputs.stats_age:.1f}s old"
    return (f"guest {mib(inputs.guest_available)} of {mib(inputs.guest_total)} MiB available, "
            f"balloon actual {mib(inputs.actual)} MiB of {mib(inputs.guest_ram)} MiB RAM, {age}; {host}")


async def _in_thread(fn: Callable[[PolicyInput], tuple[PolicyInput, Any]],
                     inputs: PolicyInput) -> tuple[PolicyInput, Any]:
    # A policy that never returns must not hold the device: the thread is
    # abandoned on timeout (trio 0.23 renamed the flag cancellable ->
    # abandon_on_cancel).
    run_sync = cast(Any, trio.to_thread.run_sync)
    result: tuple[PolicyInput, Any] = await run_sync(fn, inputs, **{_ABANDON_FLAG: True})
    return result


_ABANDON_FLAG = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
                 else "cancellable")
