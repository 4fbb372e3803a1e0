"""What every provisioning step shares: the error type, progress output and
running a command.

Standard library only, like the whole of :mod:`vuser.testing.provision`:
provisioning runs before vuser's dependencies are installed.
"""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["ProvisionError", "Timer", "log", "run", "set_quiet"]

_quiet = False


class ProvisionError(Exception):
    """A step failed; the message says which command and what it printed."""


def set_quiet(quiet: bool) -> None:
    """``--quiet``: progress lines off (the final summary still prints)."""
    global _quiet
    _quiet = quiet


def log(msg: str) -> None:
    if not _quiet:
        print(msg, flush=True)


# No step may hang a test run: a download that stalls this long fails.
RUN_TIMEOUT = 900.0


def run(cmd: list[str], *, cwd: Path | None = None, check: bool = True,
        env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to completion, output captured; ProvisionError carrying
    the output's tail if it fails and ``check``, or takes over ``timeout``
    seconds (it is killed then)."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(f"command took over {timeout:g}s, killed: {' '.join(exc.cmd)}") from None
    if check and proc.returncode != 0:
        raise ProvisionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


class Timer:
    """Named steps, each announced and timed (the summary line lists them)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        log(f"==> {name}")
        try:
            yield
        finally:
            dt = time.monotonic() - t0
            self.steps.append((name, dt))
        log(f"    done in {dt:.1f}s")
