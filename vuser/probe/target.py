"""The back-end under test and how each check reaches it.

Three ways (``vuser probe`` options):

* ``--socket PATH``: the back-end listens on PATH; every check connects.
* ``--listen``: the probe listens on PATH and the back-end connects to it
  (its client mode, as under QEMU's ``server=on``); every check accepts one
  connection, so the back-end must come back after each one.
* ``--exec 'CMD {socket}'``: the probe starts the back-end itself (``{socket}``
  replaced by PATH), in a session of its own, stdin a pipe kept open (some
  back-ends, such as testpmd, end at end of input), stdout and stderr in a
  log file.  A back-end that exits cleanly after a connection (bookworm's
  virtiofsd serves one) is started again for the next check; a crash is
  reported by ``settle`` and the back-end is started again too.

Resource handling: ``ProbeTarget`` is an async context manager; the back-end
is started by the first session (a start that fails is that check's
error; after two in a row the probe stops trying).  On exit the
back-end it started gets end of input, then SIGTERM, then SIGKILL
(``vuser.testing.child.stop_group``), each bounded in time.

Error handling: ``BackendGone`` when there is nothing to talk to (nothing
listens, nothing connects, the back-end exited before it listened);
every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, AsyncIterator, Sequence

import trio

from vuser.frontend import Frontend, FrontendError
from vuser.testing.child import stop_group

SOCKET_PLACEHOLDER = "{socket}"
START_TIMEOUT = 30.0     # a back-end's start-up (testpmd takes seconds on a busy machine)
CONNECT_TIMEOUT = 3.0    # to find a listening back-end
ACCEPT_TIMEOUT = 10.0    # for a client back-end to (re)connect; vuser backs off up to 2 s
STOP_STEPS = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
GIVE_UP_AFTER = 2        # failed starts in a row before the probe stops trying


class BackendGone(Exception):
    """Nothing to talk to: the back-end crashed, exited or does not listen."""


def killed(returncode: int) -> bool:
    """Did a signal end the back-end (a crash: SIGSEGV, SIGABRT...)?"""
    return returncode < 0


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def expand_command(argv: Sequence[str], socket_path: str) -> list[str]:
    """``argv`` with ``{socket}`` replaced by the socket path (ValueError
    when no argument names it)."""
    if not any(SOCKET_PLACEHOLDER in a for a in argv):
        raise ValueError(f"the command must name the socket as {SOCKET_PLACEHOLDER}")
    return [a.replace(SOCKET_PLACEHOLDER, socket_path) for a in argv]


class ProbeTarget:
    """One back-end under test; see the module docstring.

    ``command``: the back-end's argv with ``{socket}`` (None: the back-end
    runs already).  ``timeout``: seconds for every reply.
    """

    def __init__(self, socket_path: str, *, listen: bool = False, command: Sequence[str] | None = None,
                 log_path: str | None = None, timeout: float = 3.0,
                 start_timeout: float = START_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.listen = listen
        self.argv = None if command is None else expand_command(command, socket_path)
        self.log_path = log_path
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.proc: trio.Process | None = None
        self.starts = 0
        self.clean_exits = 0      # exits with status 0 (one connection per process)
        self.failed_starts = 0    # in a row
        self._log: IO[bytes] | None = None

    # ---------------------------------------------------------- process

    @property
    def managed(self) -> bool:
        return self.argv is not None

    def exited(self) -> str | None:
        """How the back-end we started ended, or None while it runs."""
        rc = None if self.proc is None else self.proc.poll()
        return None if rc is None else exit_description(rc)

    async def settle(self, grace: float = 0.2) -> int | None:
        """After a check: give a back-end we started ``grace`` seconds to
        exit; its exit status when that was not a clean exit (None: it
        runs, exited cleanly, or is not ours)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with trio.move_on_after(grace):
                await self.proc.wait()
        rc = self.proc.poll()
        if rc is None:
            return None
        if rc == 0:
            self.clean_exits += 1
            self.proc = None
            return None
        self.proc = None
        return int(rc)

    async def start(self) -> None:
        """Start the back-end (``--exec``) and, unless it connects to us,
        wait for its socket."""
        assert self.argv is not None
        if not self.listen:
            _remove_stale_socket(self.socket_path)
        if self._log is None:
            self._log = open(self.log_path, "ab") if self.log_path else open(os.devnull, "wb")
        self.proc = await trio.lowlevel.open_process(
            self.argv, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.starts += 1
        if self.listen:
            return
        problem = None
        with trio.move_on_after(self.start_timeout):
            while not _is_socket(self.socket_path):
                rc = self.proc.poll()
                if rc is not None:
                    problem = f"the back-end {exit_description(rc)} before listening on {self.socket_path}"
                    break
                await trio.sleep(0.02)
            else:
                return
        await self.stop()   # it is not counted as a death of the check's making
        raise BackendGone((problem or f"the back-end did not listen on {self.socket_path} within "
                                      f"{self.start_timeout}s") + self._log_note())

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            await proc.stdin.aclose()
        with trio.move_on_after(0.5):  # end of input is enough for some (testpmd)
            await proc.wait()
        await stop_group(proc, STOP_STEPS)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def ensure_running(self) -> None:
        if not self.managed or (self.proc is not None and self.proc.poll() is None):
            return
        self.proc = None
        if self.failed_starts >= GIVE_UP_AFTER:
            raise BackendGone(f"the back-end did not start {self.failed_starts} times in a row; not tried again")
        try:
            await self.start()
        except BackendGone:
            self.failed_starts += 1
            raise
        self.failed_starts = 0

    def _log_note(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    # ---------------------------------------------------------- sessions

    @asynccontextmanager
    async def session(self, **options: Any) -> AsyncIterator[Frontend]:
        """One front-end connection to the back-end (``Frontend`` options;
        the handshake runs unless ``handshake=False``)."""
        await self.ensure_running()
        options.setdefault("timeout", self.timeout)
        if self.listen:
            opened = Frontend.listen(self.socket_path, accept_timeout=ACCEPT_TIMEOUT, **options)
        else:
            opened = Frontend.connect(self.socket_path, connect_timeout=CONNECT_TIMEOUT, **options)
        entered = False
        try:
            async with opened as fe:
                entered = True
                yield fe
        except FrontendError as exc:
            if entered or exc.request not in ("connect", "accept"):
                raise
            died = self.exited()
            raise BackendGone(exc.problem + (f"; the back-end {died}" if died else "")) from None

    # ---------------------------------------------------------- context

    async def __aenter__(self) -> ProbeTarget:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with trio.CancelScope(shield=True):
            await self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove_stale_socket(path: str) -> None:
    """A socket file left by an earlier back-end would look ready before the
    new one listens; only a socket is ever removed."""
    if _is_socket(path):
        Path(path).unlink(missing_ok=True)


__all__ = ["BackendGone", "ProbeTarget", "exit_description", "expand_command", "killed"]
