"""Recorded time series of a running device: JSON lines, one row every
interval, for ``vuser plot`` (or anything that reads JSON).

A row is ``{"time": unix seconds, "device": NAME, ...}`` with the rest from
the device plugin's ``sample`` (balloon: target, actual, guest stats, bytes
released, policy decisions; net: per-port counters).  Control commands,
answered by the runner for every device:

=================================  ==========================================
``record FILE [--interval S]``     start writing rows to FILE (created or
                                   truncated, mode 0600; default interval
                                   ``DEFAULT_INTERVAL``)
``record stop``                    stop; every row written is a whole line
``record``                         the recording's file, interval, rows
``sample [CURSOR]``                one row now (``vuser ctl PATH stats
                                   --watch`` prints these)
=================================  ==========================================

One recording at a time: ``record FILE`` while one runs is refused (stop it
first).  A recording also ends when vuser exits or when a write fails (with
a log line).  ``vuser ctl`` makes FILE absolute before sending it: vuser's
working directory is not the user's.

A row may carry a ``cursor`` (balloon: the last decision's number); the
next ``sample`` gets it back so that a row holds only what is new.
Writes are short appends to a local file between two sleeps, as the pcap
writer does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import trio

from .errors import UsageError
from .fds import open_private_output

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.05
MAX_INTERVAL = 3600.0
STOP_WORDS = ("stop",)

Sampler = Callable[[Any], dict[str, Any]]
"""``sample(cursor) -> row``: the cursor of the previous row (or None)."""


class RecordUsageError(UsageError):
    """A record command given the wrong arguments."""


@dataclass(frozen=True)
class RecordRequest:
    """A parsed ``record`` command: action ``start``, ``stop`` or ``show``."""

    action: str
    path: str | None = None
    interval: float = DEFAULT_INTERVAL


def parse_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RecordUsageError(f"interval {text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and MIN_INTERVAL <= value <= MAX_INTERVAL):
        raise RecordUsageError(f"interval {text} is outside {MIN_INTERVAL:g}..{MAX_INTERVAL:g} seconds")
    return value


def parse_record(args: Sequence[str]) -> RecordRequest:
    """``[]``, ``["stop"]``, ``[FILE]``, ``[FILE, "--interval", S]`` (the
    option may also come first or as ``--interval=S``)."""
    words = list(args)
    interval = DEFAULT_INTERVAL
    rest = []
    while words:
        word = words.pop(0)
        if word == "--interval":
            if not words:
                raise RecordUsageError("record: --interval needs a value")
            interval = parse_interval(words.pop(0))
        elif word.startswith("--interval="):
            interval = parse_interval(word.partition("=")[2])
        elif word.startswith("--"):
            raise RecordUsageError(f"record: unknown option {word} (usage: record FILE [--interval S] | "
                                   f"record stop | record)")
        else:
            rest.append(word)
    if len(rest) > 1:
        raise RecordUsageError(f"record takes one FILE, got {len(rest)} words: {' '.join(rest)}")
    if not rest:
        return RecordRequest("show")
    if rest[0] in STOP_WORDS:
        return RecordRequest("stop")
    if not rest[0] or "\0" in rest[0]:
        raise RecordUsageError("record: FILE is empty or holds a NUL byte")
    return RecordRequest("start", rest[0], interval)


def absolute_record_args(args: Sequence[str], cwd: str) -> list[str]:
    """The ``record`` arguments with FILE made absolute against ``cwd``
    (the client's side; anything unparsable is left for the server to refuse)."""
    try:
        request = parse_record(args)
    except RecordUsageError:
        return list(args)
    if request.path is None:
        return list(args)
    return [os.path.join(cwd, request.path) if a == request.path else a for a in args]


@dataclass
class _Recording:
    path: str
    fd: int
    interval: float
    started: float        # unix time
    started_clock: float  # trio clock
    rows: int = 0
    cursor: Any = None

    def describe(self) -> dict[str, Any]:
        return {"recording": True, "file": self.path, "interval": self.interval, "started": self.started,
                "rows": self.rows}


class Recorder:
    """Writes rows of ``sample`` to one file at a time; ``run`` is its task
    (started next to the control socket), ``control`` the ``record``
    command.

    Error handling: a file that cannot be opened is a usage error of the
    command; a write that fails, or a sampler that raises, ends the
    recording with a log line, never the task or the process."""

    def __init__(self, sample: Sampler) -> None:
        self.sample = sample
        self._active: _Recording | None = None
        self._changed = trio.Event()
        self.last: dict[str, Any] | None = None   # how the previous recording ended

    def control(self, args: Sequence[str]) -> dict[str, Any]:
        request = parse_record(args)
        if request.action == "start":
            assert request.path is not None
            return self.start(request.path, request.interval)
        if request.action == "stop":
            return self.stop()
        return self.state()

    def state(self) -> dict[str, Any]:
        if self._active is not None:
            return self._active.describe()
        return {"recording": False, "last": self.last}

    def start(self, path: str, interval: float) -> dict[str, Any]:
        if self._active is not None:
            raise RecordUsageError(f"already recording to {self._active.path} (record stop first)")
        if not os.path.isabs(path):
            raise RecordUsageError(f"record: {path!r} is not an absolute path")
        try:
            fd = open_private_output(path)
        except OSError as exc:
            raise RecordUsageError(f"record: {path}: {exc.strerror or exc}") from None
        self._active = _Recording(path, fd, interval, time.time(), trio.current_time())
        log.info("recording to %s every %gs", path, interval)
        self._poke()
        return self._active.describe()

    def stop(self, why: str = "stopped") -> dict[str, Any]:
        rec = self._active
        if rec is None:
            return self.state()
        self._active = None
        os.close(rec.fd)
        self.last = {**rec.describe(), "recording": False, "ended": why}
        log.info("recording to %s %s after %d rows", rec.path, why, rec.rows)
        self._poke()
        return self.last

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _write_row(self, rec: _Recording) -> None:
        try:
            row = self.sample(rec.cursor)
            rec.cursor = row.get("cursor", rec.cursor)
            data = (json.dumps(row, separators=(",", ":"), default=str) + "\n").encode()
        except Exception as exc:  # a sampler's bug ends the recording, not vuser
            log.exception("recording to %s: cannot make a row", rec.path)
            self.stop(f"ended: cannot make a row: {type(exc).__name__}: {exc}")
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(rec.fd, view):]
        except OSError as exc:
            log.error("recording to %s: %s", rec.path, exc)
            self.stop(f"ended: write failed: {exc.strerror or exc}")
            return
        rec.rows += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                changed, rec = self._changed, self._active
                if rec is None:
                    await changed.wait()
                    continue
                self._write_row(rec)
                # Rows on a fixed grid from the start (no drift); after a
                # stall the grid moves on rather than catching up in a burst.
                now = trio.current_time()
                due = rec.started_clock + rec.rows * rec.interval
                if due < now:
                    rec.started_clock += now - due
                    due = now
                with trio.move_on_at(due):
                    await changed.wait()
        finally:
            if self._active is not None:
                self.stop("ended: vuser stopped")
