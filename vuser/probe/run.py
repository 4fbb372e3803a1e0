"""Runs the checks of one device type against one back-end and collects
the report.

Each check runs under a deadline; whatever it raises becomes its result
(``context`` says which exception means what).  After each check the
back-end, if the probe started it, gets a moment to show it died: one
killed by a signal (a crash) turns that check into an error, one that
exited with an error status turns a pass into a failure; either is started
again for the next check.
"""

from __future__ import annotations

import logging

import trio

from vuser.frontend import FrontendError, QueueFull, QueueTimeout, UsedRingError
from vuser.probe.checks import ALL
from vuser.probe.context import CheckSpec, Probe
from vuser.probe.profiles import PROFILES
from vuser.probe.report import CheckResult, Report
from vuser.probe.target import BackendGone, ProbeTarget, exit_description, killed
from vuser.probe.work import Fail, Skip

log = logging.getLogger(__name__)

CHECK_DEADLINE = 60.0    # seconds one check may take, whatever it waits for


def _leaf(exc: BaseException) -> BaseException:
    """The exception that matters inside (possibly nested) groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def classify(exc: BaseException) -> tuple[str, str]:
    """(result, detail) for what a check raised."""
    exc = _leaf(exc)
    if isinstance(exc, Skip):
        return "skip", str(exc)
    if isinstance(exc, Fail):
        return "fail", str(exc)
    if isinstance(exc, BackendGone):
        return "error", str(exc)
    if isinstance(exc, (FrontendError, QueueTimeout, UsedRingError, QueueFull)):
        return "fail", str(exc)
    if isinstance(exc, trio.TooSlowError):
        return "error", f"the check did not finish within {CHECK_DEADLINE:.0f}s"
    return "error", f"probe error: {type(exc).__name__}: {exc}"


async def run_check(p: Probe, spec: CheckSpec, deadline: float = CHECK_DEADLINE) -> CheckResult:
    try:
        with trio.fail_after(deadline):
            result, detail = "pass", await spec.run(p)
    except Exception as exc:  # every failure of a check is its result
        result, detail = classify(exc)
        if result == "error" and detail.startswith("probe error"):
            log.debug("%s", spec.name, exc_info=exc)
    died = await p.target.settle()
    if died is not None and killed(died):    # a crash is an error, whatever the check saw
        result, detail = "error", f"the back-end was {exit_description(died)} during this check; {detail}"
    elif died is not None:
        result = "fail" if result == "pass" else result
        detail = f"{detail}; then the back-end {exit_description(died)}"
    log.debug("%s: %s: %s", spec.name, result, detail)
    return CheckResult(spec.name, result, f"{detail} [{spec.cites}]")


async def run_probe(target: ProbeTarget, device: str, *, only: list[str] | None = None) -> Report:
    """Every check of ``device`` (a ``PROFILES`` name) against ``target``;
    ``only``: names (or name prefixes such as ``hostile/``) to run."""
    profile = PROFILES[device]
    p = Probe(target, profile)
    report = Report(device)
    for spec in ALL:
        if spec.devices is not None and device not in spec.devices:
            continue
        if only and not any(spec.name == o or (o.endswith("/") and spec.name.startswith(o)) for o in only):
            continue
        report.add(await run_check(p, spec))
    if profile.layout is not None:
        report.queue_policy = p.queue_policy or "unknown"
    return report


__all__ = ["CHECK_DEADLINE", "classify", "run_check", "run_probe"]
