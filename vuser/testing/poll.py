"""Wait until something becomes true: the one poller of vuser's tooling.

::

    status = await wait_until(lambda: vp.status(), 30, "vuser to connect")   # async
    await wait_until(lambda: dev.actual == 0, 60, "the balloon to deflate")   # sync

Tests, the demo and the benchmarks all wait on state they cannot be told
about (a counter in another process, a guest's balloon, a file appearing):
this is the loop they share, so every wait is bounded and every timeout says
what it was waiting for and what it last saw.

Resource handling: nothing is held between polls; the predicate runs in the
caller's task, so it is cancelled with it.  Error handling: an exception
raised by the predicate propagates at once (catch it in the predicate if it
means "not yet"); running out of time raises :class:`PollTimeout`.
"""

from __future__ import annotations

import inspect
from typing import Awaitable, Callable, TypeVar, overload

import trio

__all__ = ["PollTimeout", "wait_until"]

_T = TypeVar("_T")

# Cheap predicates (an attribute, a file's existence) can be read often;
# callers whose predicate costs a round trip pass a larger interval.
DEFAULT_INTERVAL = 0.01


class PollTimeout(TimeoutError):
    """A :func:`wait_until` ran out of time.  ``what`` is the caller's
    description, ``last`` the last (false) value the predicate returned."""

    def __init__(self, what: str, timeout: float, last: object) -> None:
        super().__init__(f"timed out after {timeout:g}s waiting for {what} (last value: {last!r})")
        self.what = what
        self.timeout = timeout
        self.last = last


@overload
async def wait_until(predicate: Callable[[], Awaitable[_T]], timeout: float, what: str,
                     interval: float = DEFAULT_INTERVAL) -> _T: ...


@overload
async def wait_until(predicate: Callable[[], _T], timeout: float, what: str,
                     interval: float = DEFAULT_INTERVAL) -> _T: ...


async def wait_until(predicate: Callable[[], object], timeout: float, what: str,
                     interval: float = DEFAULT_INTERVAL) -> object:
    """Call ``predicate`` (sync, or async and awaited) every ``interval``
    seconds until it returns something true, and return that value.

    The whole wait, predicate calls included, is bounded by ``timeout``: an
    async predicate that hangs is cancelled when the time is up.  Raises
    :class:`PollTimeout` naming ``what`` and the last value seen.
    """
    last: object = None
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
            await trio.sleep(interval)
    raise PollTimeout(what, timeout, last)
