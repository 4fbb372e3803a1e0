"""``vuser run`` as a child process: the one helper the demo, the benchmarks
and the tests start, query and stop vuser with.

::

    async with VuserProcess("rng", sockets=[sock], control=ctl) as vp:
        ...                                   # sockets listen, control answers
        print((await vp.status())["negotiated_features"])
    # stopped with SIGTERM (then SIGKILL); a non-zero exit is an error

The child is ``vuser [GLOBAL_ARGS] run DEVICE --socket S [--socket S2 ...]
[--client] [--control C] [ARGS]``, where ``vuser`` is :func:`vuser_command`
unless ``command`` says otherwise.  Its stdout and stderr go to one log file.

Resource handling: the child runs in a session of its own and is stopped on
the way out of the context whatever happens in the body — an exception,
a cancellation — first with SIGTERM (the clean exit users get from Ctrl-C
or systemd), then SIGKILL, each bounded in time; nothing is left running.
The log is kept, and its folder named, when something failed; a temporary
log folder this class made is removed otherwise.

Error handling: :class:`VuserProcessError`, carrying the tail of the log,
when the child exits before it is ready, is not ready in time, or exits
with a non-zero status (on its own, or when asked to stop) while the body
succeeded.  When the body raised, that exception propagates with a note
naming the log instead.  A caller that stops the child itself
(:meth:`VuserProcess.stop`, :meth:`VuserProcess.kill`) gets the status and
judges it; the context does not judge it again.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Collection, Mapping, Sequence

import trio

from vuser.control import call as control_call
from vuser.testing.child import KILL_WAIT, TERM_WAIT, read_text, stop_group, until_exit
from vuser.testing.errors import tail
from vuser.testing.poll import PollTimeout, wait_until

__all__ = ["VuserProcess", "VuserProcessError", "vuser_command"]

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]
# Starting a Python process on a loaded 2-core machine can take seconds.
START_TIMEOUT = 30.0
READY_POLL = 0.05


class VuserProcessError(Exception):
    """``vuser run`` did not become ready, or did not exit cleanly."""


def vuser_command() -> list[str]:
    """The ``vuser`` console script installed next to this Python, else the
    one on PATH, else ``python -m vuser.cli``."""
    sibling = Path(sys.executable).parent / "vuser"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    found = shutil.which("vuser")
    if found:
        return [found]
    return [sys.executable, "-m", "vuser.cli"]


class VuserProcess:
    """One ``vuser run DEVICE`` child process; an async context manager.

    ``sockets``: the vhost-user socket path(s), one ``--socket`` each.  In
    server mode (the default) the context is entered once every one exists;
    with ``client=True`` vuser connects to front-ends listening there, so
    they are not waited for.  ``control``: the control socket, which must
    also answer ``status`` (None: no ``--control``).  ``args`` follow the
    device name (device options), ``global_args`` precede ``run`` (such as
    ``--log-level DEBUG``).  ``log_path``: where stdout and stderr go
    (default: ``vuser.log`` in a new temporary folder).  ``command``
    replaces the ``vuser`` argv prefix, ``env`` the environment, ``cwd`` the
    working directory.  ``cpus``: pin the child to these CPUs from its start.
    ``start_timeout`` bounds the wait for readiness, ``stop_timeout`` the
    wait after SIGTERM before SIGKILL.
    """

    def __init__(self, device: str, sockets: StrPath | Sequence[StrPath], *,
                 control: StrPath | None = None, args: Sequence[str] = (),
                 global_args: Sequence[str] = (), client: bool = False,
                 log_path: StrPath | None = None, command: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None, cwd: StrPath | None = None,
                 cpus: Collection[int] | None = None, start_timeout: float = START_TIMEOUT,
                 stop_timeout: float = TERM_WAIT) -> None:
        self.device = device
        if isinstance(sockets, (str, os.PathLike)):
            sockets = [sockets]
        self.sockets = [Path(s) for s in sockets]
        self.control = Path(control) if control is not None else None
        self.client = client
        self.run_args = ["run", device]
        for sock in self.sockets:
            self.run_args += ["--socket", str(sock)]
        if client:
            self.run_args.append("--client")
        if self.control is not None:
            self.run_args += ["--control", str(self.control)]
        self.args = list(args)
        self.run_args += self.args
        self.argv = [*(command if command is not None else vuser_command()), *global_args,
                     *self.run_args]
        self._own_dir = log_path is None
        self._log_path = None if log_path is None else Path(log_path)
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._cpus = set(cpus) if cpus is not None else None
        self._start_timeout = start_timeout
        self._stop_steps = ((signal.SIGTERM, stop_timeout), (signal.SIGKILL, KILL_WAIT))
        self._proc: trio.Process | None = None
        self._stopped_by_caller = False

    # -- state and diagnostics

    @property
    def name(self) -> str:
        return f"`vuser run {self.device}`"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return int(self._proc.pid)

    @property
    def returncode(self) -> int | None:
        """The exit status once it exited (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def log_path(self) -> Path:
        """The log file (in a temporary folder made on first use, if none was given)."""
        if self._log_path is None:
            self._log_path = Path(tempfile.mkdtemp(prefix=f"vuser-run-{self.device}-")) / "vuser.log"
        return self._log_path

    @property
    def log_dir(self) -> Path:
        return self.log_path.parent

    def log_text(self) -> str:
        return read_text(self.log_path)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join("      | " + line for line in tail(self.log_text(), lines).splitlines())

    def log_problems(self) -> list[str]:
        """Log lines that show something went wrong (ERROR records, tracebacks)."""
        return [line for line in self.log_text().splitlines()
                if " ERROR " in line or "Traceback" in line]

    def _failure(self, message: str) -> VuserProcessError:
        return VuserProcessError(f"{self.name} {message}; log {self.log_path}:\n{self.log_tail()}")

    # -- control socket

    async def ctl(self, command: str, *args: str, timeout: float = 10.0) -> Any:
        """One control command (what ``vuser ctl CONTROL COMMAND ARGS`` does,
        in-process); its result.  Raises RuntimeError if vuser refused it."""
        if self.control is None:
            raise ValueError(f"{self.name} was started without a control socket")
        return await control_call(str(self.control), command, list(args), timeout=timeout)

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.ctl("status", timeout=5.0)
        return status

    # -- life cycle

    async def _ready(self) -> bool:
        if not self.client and not all(sock.exists() for sock in self.sockets):
            return False
        if self.control is None:
            return True
        if not self.control.exists():
            return False
        try:
            await self.ctl("status", timeout=2.0)
        except (OSError, RuntimeError, ValueError, trio.TooSlowError):
            return False   # listening but not answering yet
        return True

    async def start(self) -> None:
        """Start the child and wait until it is ready (see the class)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as logf:
            self._proc = await trio.lowlevel.open_process(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=self._env, cwd=self._cwd, start_new_session=True)
        proc = self._proc
        if self._cpus is not None:
            # Before it starts any thread: threads inherit the affinity.
            os.sched_setaffinity(proc.pid, self._cpus)
        waiting = [str(s) for s in self.sockets if not self.client]
        waiting += [f"{self.control} to answer status"] if self.control else []
        try:
            await until_exit(
                proc,
                lambda: wait_until(self._ready, self._start_timeout,
                                   " and ".join(waiting) or "nothing", READY_POLL),
                lambda: self._failure(f"exited with status {proc.returncode} before it was ready"))
        except PollTimeout as exc:
            raise self._failure(f"was not ready within {self._start_timeout:g}s "
                                f"(waited for {exc.what})") from None

    async def wait(self) -> int:
        """Wait until the child exits, for whatever reason; its exit status."""
        assert self._proc is not None, "not started"
        return int(await self._proc.wait())

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it has not exited in time; its exit status.
        The caller judges the status: leaving the context will not."""
        self._stopped_by_caller = True
        return await self._stop(self._stop_steps)

    async def kill(self) -> int:
        """SIGKILL at once (a crash, as far as the front-end can tell)."""
        self._stopped_by_caller = True
        return await self._stop(((signal.SIGKILL, KILL_WAIT),))

    async def _stop(self, steps: Sequence[tuple[signal.Signals, float]]) -> int:
        assert self._proc is not None, "not started"
        with trio.CancelScope(shield=True):
            rc = await stop_group(self._proc, steps)
        if rc is None:
            raise self._failure("survived SIGKILL")
        return rc

    async def __aenter__(self) -> VuserProcess:
        try:
            await self.start()
        except BaseException:
            if self._proc is not None:
                await self._stop(self._stop_steps)
            self._keep_log()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        problem = None
        if self._proc is not None:
            was_running = self._proc.poll() is None
            rc = await self._stop(self._stop_steps)
            if rc != 0 and not self._stopped_by_caller:
                problem = (f"exited with status {rc} when asked to stop" if was_running
                           else f"exited with status {rc} on its own")
        if exc is None and problem is None:
            if self._own_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            return
        self._keep_log()
        if exc is None:
            raise self._failure(problem or "")
        if isinstance(exc, Exception):   # not Cancelled / KeyboardInterrupt
            exc.add_note(f"{self.name}" + (f" {problem}" if problem else "")
                         + f"; log {self.log_path}:\n{self.log_tail()}")

    def _keep_log(self) -> None:
        # Cancellations (a test's fail_after) cannot carry a note: say it here.
        log.warning("%s: log kept in %s", self.name, self.log_dir)
