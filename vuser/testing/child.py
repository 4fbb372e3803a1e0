"""Child-process primitives shared by the guest (QEMU) and ``vuser run``
helpers: race an operation against children's exits, stop a child's process
group with escalating signals, read its log without failing.

Both callers start their child in a session of its own
(``start_new_session=True``), so the child is its process group's leader:
signalling the group also reaches anything it started, and a Ctrl-C at the
terminal reaches only us, who then stop the child in order.  (A parent-death
signal, PR_SET_PDEATHSIG, cannot help: trio forks from a worker thread, and
the signal fires when that thread ends, not the process.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Awaitable, Callable, Sequence, TypeVar

import trio

__all__ = ["KILL_WAIT", "TERM_THEN_KILL", "TERM_WAIT", "Exit", "gone",
           "race_exits", "read_text", "stop_group", "until_exit"]

_T = TypeVar("_T")
# One thing whose end ends an operation: an async "wait until it is gone"
# and the exception to raise then.
Exit = tuple[Callable[[], Awaitable[object]], Callable[[], BaseException]]

# SIGTERM first (what Ctrl-C or systemd would do: a clean exit is part of
# what we test), SIGKILL if that is not honoured in time.
TERM_WAIT = 10.0   # seconds to exit after SIGTERM
KILL_WAIT = 5.0    # seconds to be reaped after SIGKILL
TERM_THEN_KILL: Sequence[tuple[signal.Signals, float]] = (
    (signal.SIGTERM, TERM_WAIT), (signal.SIGKILL, KILL_WAIT))


async def race_exits(fn: Callable[[], Awaitable[_T]], exits: Sequence[Exit]) -> _T:
    """Run ``fn``, but raise the matching ``on_exit()`` as soon as one of
    ``exits``' waits returns first (a child exited).

    Error handling: an exception from ``fn`` propagates unchanged (it is
    re-raised outside the nursery, so it is not wrapped in a group).
    """
    outcome: list[tuple[bool, object]] = []
    ended: list[Callable[[], BaseException]] = []

    async with trio.open_nursery() as nursery:
        async def main() -> None:
            try:
                outcome.append((True, await fn()))
            except Exception as exc:   # re-raised below, outside the nursery
                outcome.append((False, exc))
            nursery.cancel_scope.cancel()

        async def watch(wait: Callable[[], Awaitable[object]],
                        on_exit: Callable[[], BaseException]) -> None:
            await wait()
            await trio.sleep(0.05)   # let the last bytes of its output arrive
            ended.append(on_exit)
            nursery.cancel_scope.cancel()

        nursery.start_soon(main)
        for wait, on_exit in exits:
            nursery.start_soon(watch, wait, on_exit)
    if not outcome:
        raise ended[0]()
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]  # fn's own result


async def until_exit(proc: trio.Process, fn: Callable[[], Awaitable[_T]],
                     on_exit: Callable[[], BaseException]) -> _T:
    """:func:`race_exits` against one child."""
    return await race_exits(fn, [(proc.wait, on_exit)])


async def stop_group(proc: trio.Process,
                     steps: Sequence[tuple[signal.Signals, float]] = TERM_THEN_KILL) -> int | None:
    """Signal ``proc``'s process group with each ``(signal, seconds)`` step in
    turn until it has exited; returns its exit status (None only if even the
    last step did not reap it).

    Resource handling: only a child not yet reaped is signalled, so its pid
    (and group id) cannot have been reused.  Bounded by the sum of the
    steps' seconds; never raises for a child that is already gone.
    """
    for sig, wait in steps:
        if proc.returncode is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:   # not a group leader we may signal: the child alone
            proc.send_signal(sig)
        with trio.move_on_after(wait):
            await proc.wait()
    rc: int | None = proc.returncode
    return rc


def gone(pid: int) -> bool:
    """True once no process has ``pid`` (what tests check after a stop;
    a zombie not yet reaped still counts as there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def read_text(path: Path) -> str:
    """A log file's text so far (bytes that are not UTF-8 replaced), or ""."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""
