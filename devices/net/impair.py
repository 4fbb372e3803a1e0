"""Network impairment specs (netem's vocabulary) and their C state.

A spec is a list of tokens, as ``vuser ctl PATH impair PORT SPEC...`` and
``vuser run net --impair PORT:SPEC`` take them:

    loss=P%[/C%]            random loss, C the correlation (netem ``loss P C``)
    loss=gemodel:p,r,1-h,1-k  Gilbert-Elliott (percentages; r defaults to 100%-p,
                            1-h to 100%, 1-k to 0%), as netem's ``loss gemodel``
    delay=T  jitter=T       T in ms (``100ms``), s or us
    distribution=uniform|normal|pareto   how jitter is drawn (default uniform)
    duplicate=P%[/C%]  corrupt=P%[/C%]  reorder=P%[/C%]  gap=N
    rate=Nbit|Nkbit|Nmbit|Ngbit
    limit=N                 frames held at most (default 1000, netem's)
    seed=N                  the same seed and frames give the same decisions

What each does, and in which order, is native/impair.h; all of it runs in
C per frame.  Reordering needs a delay (a frame can only overtake one that
waits), as with netem; ``reorder`` without ``gap`` means gap 1.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

try:
    from vuser._native import ffi, lib
except ImportError:  # pragma: no cover - the extension is required for net
    ffi = lib = None

DEFAULT_LIMIT = 1000
DISTRIBUTIONS = {"uniform": 0, "normal": 1, "pareto": 2}
LOSS_RANDOM, LOSS_GEMODEL = 0, 1
COUNTERS = ("offered", "dropped", "duplicated", "corrupted", "reordered", "delayed", "limit_dropped", "unheld")
_TIME = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_TIME_UNITS = {"us": 1, "ms": 1000, "s": 1_000_000}
_RATE_UNITS = {"bit": 1, "kbit": 1000, "mbit": 1_000_000, "gbit": 1_000_000_000}


class ImpairError(ValueError):
    """A spec that cannot be understood (the user's error)."""


def percent(text: str) -> float:
    if not text.endswith("%"):
        raise ImpairError(f"{text!r}: a percentage ends with %")
    try:
        value = float(text[:-1])
    except ValueError:
        raise ImpairError(f"{text!r} is not a percentage") from None
    if not 0 <= value <= 100:
        raise ImpairError(f"{text!r} is not within 0%..100%")
    return value


def fraction32(pct: float) -> int:
    """A percentage as a fraction of 2^32 (impair.h), 100% as 2^32 - 1."""
    return min(int(pct / 100 * (1 << 32)), (1 << 32) - 1)


def micros(text: str) -> int:
    m = _TIME.match(text)
    if not m:
        raise ImpairError(f"{text!r} is not a time (like 100ms, 1s, 500us)")
    return int(float(m[1]) * _TIME_UNITS[m[2]])


def bits_per_second(text: str) -> int:
    m = _RATE.match(text.lower())
    if not m:
        raise ImpairError(f"{text!r} is not a rate (like 10mbit, 512kbit)")
    value = int(float(m[1]) * _RATE_UNITS[m[2]])
    if value <= 0:
        raise ImpairError(f"{text!r}: a rate must be positive")
    return value


@dataclass
class ImpairSpec:
    """What a port's frames go through (percentages in 0..100)."""

    loss: float = 0.0
    loss_corr: float = 0.0
    gemodel: tuple[float, float, float, float] | None = None   # p, r, 1-h, 1-k
    delay_us: int = 0
    jitter_us: int = 0
    distribution: str = "uniform"
    duplicate: float = 0.0
    duplicate_corr: float = 0.0
    corrupt: float = 0.0
    corrupt_corr: float = 0.0
    reorder: float = 0.0
    reorder_corr: float = 0.0
    gap: int = 0
    rate_bps: int = 0
    limit: int = DEFAULT_LIMIT
    seed: int | None = None
    tokens: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return " ".join(self.tokens)


def _prob(value: str) -> tuple[float, float]:
    p, sep, c = value.partition("/")
    return percent(p), percent(c) if sep else 0.0


def _gemodel(value: str) -> tuple[float, float, float, float]:
    parts = [percent(v) for v in value.split(",")]
    if not 1 <= len(parts) <= 4:
        raise ImpairError(f"gemodel:{value}: p[,r[,1-h[,1-k]]]")
    p = parts[0]
    r = parts[1] if len(parts) > 1 else 100.0 - p
    one_h = parts[2] if len(parts) > 2 else 100.0
    one_k = parts[3] if len(parts) > 3 else 0.0
    return p, r, one_h, one_k


def parse_spec(tokens: Sequence[str]) -> ImpairSpec:
    """The spec of ``tokens`` (see the module docstring); ImpairError
    naming the token otherwise."""
    spec = ImpairSpec(tokens=list(tokens))
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not value:
            raise ImpairError(f"{token!r}: tokens are KEY=VALUE (loss=, delay=, jitter=, distribution=, "
                              "duplicate=, corrupt=, reorder=, gap=, rate=, limit=, seed=)")
        try:
            if key == "loss" and value.startswith("gemodel:"):
                spec.gemodel = _gemodel(value[len("gemodel:"):])
            elif key == "loss":
                spec.loss, spec.loss_corr = _prob(value)
            elif key in ("duplicate", "corrupt", "reorder"):
                p, c = _prob(value)
                setattr(spec, key, p)
                setattr(spec, f"{key}_corr", c)
            elif key == "delay":
                spec.delay_us = micros(value)
            elif key == "jitter":
                spec.jitter_us = micros(value)
            elif key == "distribution":
                if value not in DISTRIBUTIONS:
                    raise ImpairError(f"one of {', '.join(DISTRIBUTIONS)}")
                spec.distribution = value
            elif key == "rate":
                spec.rate_bps = bits_per_second(value)
            elif key in ("gap", "limit", "seed"):
                n = int(value)
                if n < 0 or (key == "limit" and not 1 <= n <= lib.VU_IMPAIR_MAX_LIMIT):
                    raise ImpairError(f"out of range (limit: 1..{lib.VU_IMPAIR_MAX_LIMIT})")
                setattr(spec, key, n)
            else:
                raise ImpairError("unknown impairment")
        except ImpairError as exc:
            raise ImpairError(f"{token}: {exc}") from None
        except ValueError:
            raise ImpairError(f"{token}: {value!r} is not a number") from None
    if spec.reorder and not spec.gap:
        spec.gap = 1  # as tc does: reorder alone means "any frame may go ahead"
    return spec


class Impairment:
    """One port's ``struct vu_net_impair`` and the memory it holds frames
    in (limit slots of VU_IMPAIR_SLOT bytes: 9 MiB for the default 1000)."""

    def __init__(self, spec: ImpairSpec) -> None:
        self.spec = spec
        c = self.c = ffi.new("struct vu_net_impair *")
        limit = spec.limit
        self._keep = [ffi.new("struct vu_impair_held[]", limit), ffi.new("uint32_t[]", limit),
                      ffi.new("uint8_t[]", limit * lib.VU_IMPAIR_SLOT)]
        c.heap, c.free_slots, c.arena = self._keep
        for i in range(limit):
            c.free_slots[i] = i
        c.nfree, c.limit = limit, limit
        for name in ("loss", "duplicate", "corrupt", "reorder"):
            prob = getattr(c, name)
            prob.p = fraction32(getattr(spec, name))
            prob.rho = fraction32(getattr(spec, f"{name}_corr"))
        if spec.gemodel is not None:
            c.loss_model = LOSS_GEMODEL
            c.ge_p, c.ge_r, c.ge_h, c.ge_k = (fraction32(v) for v in spec.gemodel)
        c.gap = spec.gap
        c.delay_us, c.jitter_us = spec.delay_us, spec.jitter_us
        c.dist = DISTRIBUTIONS[spec.distribution]
        c.rate_bps = spec.rate_bps
        seed = spec.seed if spec.seed is not None else struct.unpack("=Q", os.urandom(8))[0]
        lib.vu_impair_seed(c, seed & (2**64 - 1))

    def status(self) -> dict[str, Any]:
        c = self.c
        out: dict[str, Any] = {"spec": self.spec.describe(), "held": int(c.nheld)}
        out.update((name, int(getattr(c, name))) for name in COUNTERS)
        return out


__all__ = ["COUNTERS", "DEFAULT_LIMIT", "ImpairError", "ImpairSpec", "Impairment", "parse_spec"]
