"""What a probe run found: one result per check, the JSON object the
contract fixes, the human-readable table, the exit status.

JSON (``vuser probe --json``), exactly::

    {"device": str,
     "checks": [{"name": str, "result": "pass"|"fail"|"skip"|"error", "detail": str}, ...],
     "queue_policy": "offered"|"negotiated"|"fixed"|"unknown",   # devices whose queues
                                                                 # depend on features
     "summary": {"pass": n, "fail": n, "skip": n, "error": n}}

Exit status 0 when no check failed or errored, 1 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESULTS = ("pass", "fail", "skip", "error")
QUEUE_POLICIES = ("offered", "negotiated", "fixed", "unknown")


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, ``pass``/``fail``/``skip``/``error`` and what
    was seen (with the spec section or seed it tests)."""

    name: str
    result: str
    detail: str

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"result {self.result!r} is not one of {', '.join(RESULTS)}")

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "result": self.result, "detail": self.detail}


@dataclass
class Report:
    """Every check of one probe run, in the order they ran."""

    device: str
    checks: list[CheckResult] = field(default_factory=list)
    # Set for devices whose queues depend on features (balloon).
    queue_policy: str | None = None

    def add(self, check: CheckResult) -> None:
        self.checks.append(check)

    def summary(self) -> dict[str, int]:
        counts = dict.fromkeys(RESULTS, 0)
        for c in self.checks:
            counts[c.result] += 1
        return counts

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "checks": [c.as_json() for c in self.checks]}
        if self.queue_policy is not None:
            if self.queue_policy not in QUEUE_POLICIES:
                raise ValueError(f"queue policy {self.queue_policy!r} is not one of {QUEUE_POLICIES}")
            out["queue_policy"] = self.queue_policy
        out["summary"] = self.summary()
        return out

    @property
    def exit_code(self) -> int:
        s = self.summary()
        return 1 if s["fail"] or s["error"] else 0

    def table(self, title: str = "") -> str:
        """The human-readable form: one line per check."""
        width = max((len(c.name) for c in self.checks), default=4)
        lines = [title] if title else []
        for c in self.checks:
            lines.append(f"{c.result.upper():5}  {c.name:{width}}  {c.detail}")
        if self.queue_policy is not None:
            lines.append(f"queue policy: {self.queue_policy}")
        s = self.summary()
        lines.append(", ".join(f"{s[r]} {r}" for r in RESULTS))
        return "\n".join(lines)


__all__ = ["QUEUE_POLICIES", "RESULTS", "CheckResult", "Report"]
