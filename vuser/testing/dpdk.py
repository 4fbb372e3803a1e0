"""Run DPDK's testpmd as a vhost-user peer, from trio.

::

    async with testpmd("net_vhost0,iface=SOCK,queues=1", fwd="rxonly",
                       lcores="0@1,1@0", name="backend") as back:
        async with testpmd("net_virtio_user0,path=SOCK,queues=1", fwd="txonly",
                           txpkts=64, lcores="0@0,1@1", name="frontend") as front:
            await back.start()
            await front.start()
            await trio.sleep(2)
            tx = (await front.stats())[0].tx_packets
            await front.stop()
            await back.stop()
            rx = (await back.stats())[0].rx_packets

Debian's ``dpdk-dev`` package carries ``dpdk-testpmd``.  Its
``net_virtio_user`` driver is a userspace vhost-user *front-end* for
virtio-net (``server=1`` makes it listen; then its start-up blocks until a
back-end connects, so enter such a context with ``wait_ready=False`` and call
:meth:`Testpmd.wait_ready` once the back-end runs); ``net_vhost`` is DPDK's
vhost-user *back-end* (``client=1`` makes it connect).

How it runs.  testpmd runs interactively (``-i``) with commands written to
its stdin; its stdout goes through ``stdbuf -oL`` because testpmd prints
command output with stdio, which a pipe would otherwise hold back until exit.
A command is answered when the next ``testpmd> `` prompt arrives; the text in
between is parsed.  Memory: ``--no-huge -m 256`` by default (the front-end
shares it with the back-end through a memfd, one region), or hugepages with
``hugepages=True`` (``--in-memory --single-file-segments``: memfd hugetlb,
nothing to mount; 2 MiB pages must be reserved, see :func:`reserve_hugepages`).
With ``hugepages=True, memory_mb=None`` memory grows on demand and a
virtio_user front-end replaces its memory table while running (SET_VRING_ENABLE
0, SET_MEM_TABLE with a larger region, SET_VRING_ENABLE 1, three times during
start-up), which is worth testing a back-end against.
Every instance gets its own ``--file-prefix`` and ``--no-shconf``, so several
can run at once.  testpmd needs two lcores (main + one forwarding core):
``lcores="0@0,1@0"`` pins both to CPU 0; two instances on two CPUs do best
with their forwarding lcores on different CPUs (``"0@1,1@0"`` and
``"0@0,1@1"``).

Resource handling: testpmd runs in its own session (process group) with
SIGPIPE ignored (a peer that quits first must not kill it mid-shutdown).
Leaving the context sends ``stop`` and ``quit`` and waits a bounded time
when the body ended normally; in every case the process group is then
killed if still there, and DPDK's empty runtime directory is removed.
Everything testpmd prints goes to a log file (``log_path``, or a temporary
file kept only when something failed).

Error handling: every wait is bounded (``startup_timeout``,
``command_timeout``); :class:`TestpmdError` (with the log tail in its
message) when testpmd exits early, a command times out or output cannot be
parsed; :class:`TestpmdNotInstalled` when ``dpdk-testpmd`` is missing.
Exceptions leaving the context carry a note naming the log and its tail.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import trio

__all__ = [
    "ForwardStats",
    "PortStats",
    "Testpmd",
    "TestpmdError",
    "TestpmdNotInstalled",
    "available",
    "hugepages_free",
    "reserve_hugepages",
    "testpmd",
    "testpmd_command",
    "testpmd_path",
]

TESTPMD = "dpdk-testpmd"
PROMPT = "testpmd> "
# DPDK's runtime directory for root (eal_create_runtime_dir); non-root
# processes use $XDG_RUNTIME_DIR/dpdk or the temp dir instead.
_ROOT_RUNTIME_DIR = Path("/var/run") / "dpdk"
_HUGEPAGES_2M = Path("/proc/sys/vm/nr_hugepages")
_counter = itertools.count()


class TestpmdError(Exception):
    """testpmd failed to start, died, timed out or printed something unexpected."""

    __test__ = False  # not a pytest test class


class TestpmdNotInstalled(TestpmdError):
    """dpdk-testpmd is not on PATH."""


# ---------------------------------------------------------------- discovery


def testpmd_path() -> str | None:
    """The testpmd binary: ``$VUSER_TESTPMD`` or ``dpdk-testpmd`` on PATH."""
    env = os.environ.get("VUSER_TESTPMD")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which(TESTPMD)


def available() -> bool:
    """True if testpmd (and ``stdbuf``, which running it needs) can be run."""
    return testpmd_path() is not None and shutil.which("stdbuf") is not None


def hugepages_free() -> int:
    """Free 2 MiB hugepages (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reserve_hugepages(count: int) -> bool:
    """Make sure at least ``count`` 2 MiB hugepages exist (needs root).

    Returns whether that many are free afterwards.  Never lowers the
    reservation.
    """
    missing = count - hugepages_free()
    if missing > 0:
        try:
            total = int(_HUGEPAGES_2M.read_text())
            _HUGEPAGES_2M.write_text(f"{total + missing}\n")
        except (OSError, ValueError):
            return False
    return hugepages_free() >= count


# ---------------------------------------------------------------- stats


@dataclass(frozen=True)
class PortStats:
    """One port's counters from ``show port stats``, cumulative since start-up.

    ``time`` is ``time.monotonic()`` when testpmd answered.
    """

    port: int
    rx_packets: int
    rx_bytes: int
    rx_missed: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_bytes: int
    tx_errors: int
    time: float


@dataclass(frozen=True)
class ForwardStats:
    """One port's forwarding counters printed by ``stop`` (since ``start``).

    ``tx_dropped`` counts packets the forwarding core made but the port
    refused (ring full): for a front-end, what the back-end did not keep up
    with.
    """

    port: int
    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


_NUM = r"\s*(\d+)"
_PORT_HEADER = re.compile(r"NIC statistics for port (\d+)")
_FWD_HEADER = re.compile(r"Forward statistics for port (\d+)")
_RX_LINE = re.compile(r"RX-packets:" + _NUM + r"\s+RX-missed:" + _NUM + r"\s+RX-bytes:" + _NUM)
_RX_ERRORS = re.compile(r"RX-errors:" + _NUM)
_RX_NOMBUF = re.compile(r"RX-nombuf:" + _NUM)
_TX_LINE = re.compile(r"TX-packets:" + _NUM + r"\s+TX-errors:" + _NUM + r"\s+TX-bytes:" + _NUM)
_FWD_RX = re.compile(r"RX-packets:" + _NUM + r"\s+RX-dropped:" + _NUM)
_FWD_TX = re.compile(r"TX-packets:" + _NUM + r"\s+TX-dropped:" + _NUM)


def _sections(text: str, header: re.Pattern[str]) -> list[tuple[int, str]]:
    marks = list(header.finditer(text))
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append((int(m.group(1)), text[m.end():end]))
    return out


def parse_port_stats(text: str, at: float = 0.0) -> dict[int, PortStats]:
    """Parse the output of ``show port stats all`` (or ``show port stats N``)."""
    result = {}
    for port, body in _sections(text, _PORT_HEADER):
        rx, rxe, rxn, tx = (_RX_LINE.search(body), _RX_ERRORS.search(body),
                            _RX_NOMBUF.search(body), _TX_LINE.search(body))
        if not (rx and rxe and rxn and tx):
            raise TestpmdError(f"cannot parse port {port} statistics:\n{body}")
        result[port] = PortStats(
            port=port, rx_packets=int(rx.group(1)), rx_missed=int(rx.group(2)),
            rx_bytes=int(rx.group(3)), rx_errors=int(rxe.group(1)),
            rx_nombuf=int(rxn.group(1)), tx_packets=int(tx.group(1)),
            tx_errors=int(tx.group(2)), tx_bytes=int(tx.group(3)), time=at)
    return result


def parse_forward_stats(text: str) -> dict[int, ForwardStats]:
    """Parse the per-port ``Forward statistics`` blocks that ``stop`` prints."""
    result = {}
    for port, body in _sections(text, _FWD_HEADER):
        rx, tx = _FWD_RX.search(body), _FWD_TX.search(body)
        if not (rx and tx):
            raise TestpmdError(f"cannot parse port {port} forward statistics:\n{body}")
        result[port] = ForwardStats(port=port, rx_packets=int(rx.group(1)),
                                    rx_dropped=int(rx.group(2)),
                                    tx_packets=int(tx.group(1)),
                                    tx_dropped=int(tx.group(2)))
    return result


# ---------------------------------------------------------------- command line


def testpmd_command(vdev: str | Sequence[str], *, fwd: str = "io",
                    txpkts: int | Sequence[int] | None = None,
                    lcores: str = "0@0,1@0", nb_cores: int = 1,
                    memory_mb: int | None = 256, mbufs: int = 16384,
                    hugepages: bool = False, file_prefix: str = "vuser",
                    vhost_debug: bool = False, eal_args: Sequence[str] = (),
                    args: Sequence[str] = (), binary: str = TESTPMD) -> list[str]:
    """testpmd's argument vector (without the ``stdbuf`` wrapper).

    ``mbufs`` keeps the mbuf pool small: testpmd's default (about 155 000
    mbufs, 340 MB) does not fit in ``-m 256``.
    """
    vdevs = [vdev] if isinstance(vdev, str) else list(vdev)
    eal = [binary, "--no-pci", "--no-shconf", f"--file-prefix={file_prefix}",
           f"--lcores={lcores}"]
    if memory_mb is not None:
        eal += ["-m", str(memory_mb)]
    if hugepages:
        # memfd hugetlb, one fd per memseg list: no hugetlbfs mount needed,
        # and few enough regions for vhost-user's limit of 8.
        eal += ["--in-memory", "--single-file-segments"]
    else:
        eal += ["--no-huge"]
    for v in vdevs:
        eal.append(f"--vdev={v}")
    if vhost_debug:
        eal.append("--log-level=lib.vhost.*:debug")
    app = ["-i", f"--nb-cores={nb_cores}", f"--total-num-mbufs={mbufs}",
           f"--forward-mode={fwd}"]
    if txpkts is not None:
        sizes = [txpkts] if isinstance(txpkts, int) else list(txpkts)
        app.append("--txpkts=" + ",".join(str(s) for s in sizes))
    return [*eal, *eal_args, "--", *app, *args]


# ---------------------------------------------------------------- the process


class Testpmd:
    """A running interactive testpmd; made by :func:`testpmd`.

    testpmd writes straight into the log file; a command notes the log's
    length, writes its line to stdin and polls the log until the next prompt.
    Nothing reads a pipe in the background, so testpmd can never block on a
    full one, and the log is complete whatever happens to this process.
    """

    __test__ = False  # not a pytest test class
    POLL = 0.01  # seconds between looks at the log while waiting for a prompt

    def __init__(self, process: trio.Process, log_path: Path, name: str,
                 command_timeout: float) -> None:
        self.process = process
        self.log_path = log_path
        self.name = name
        self.command_timeout = command_timeout
        self._offset = 0          # log bytes up to the last prompt consumed
        self._ready = False
        self._lock = trio.Lock()

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def _read_from(self, offset: int) -> bytes:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read()

    async def _until_prompt(self, what: str, timeout: float) -> str:
        """Log text from the last prompt up to the next one (consumed), or raise."""
        prompt = PROMPT.encode()
        with trio.move_on_after(timeout):
            while True:
                data = self._read_from(self._offset)
                at = data.find(prompt)
                if at >= 0:
                    self._offset += at + len(prompt)
                    return data[:at].decode("utf-8", "replace")
                if self.process.poll() is not None:
                    raise TestpmdError(
                        f"{self.name}: testpmd exited (status {self.process.returncode}) "
                        f"during {what}\n{self.log_tail()}")
                await trio.sleep(self.POLL)
        raise TestpmdError(f"{self.name}: no answer to {what} within {timeout} s\n"
                           f"{self.log_tail()}")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the first prompt (devices probed, ports configured).

        A ``net_virtio_user`` with ``server=1`` only gets there once a
        back-end has connected.
        """
        async with self._lock:
            if not self._ready:
                text = await self._until_prompt("start-up", timeout)
                self._ready = True
                if "No probed ethernet devices" in text:
                    # testpmd carries on with no port; nothing would work.
                    raise TestpmdError(f"{self.name}: no port came up (vdev probe failed)\n"
                                       f"{self.log_tail()}")

    # -- commands

    async def command(self, line: str, timeout: float | None = None) -> str:
        """Run one testpmd command; return what it printed (its echo included,
        and any log lines that other threads printed meanwhile)."""
        if "\n" in line:
            raise ValueError("one command at a time")
        timeout = timeout or self.command_timeout
        await self.wait_ready(timeout)
        async with self._lock:
            await self._send(line)
            return await self._until_prompt(repr(line), timeout)

    async def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            await self.process.stdin.send_all(line.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TestpmdError(f"{self.name}: testpmd is gone, cannot send {line!r}\n"
                               f"{self.log_tail()}") from exc

    async def start(self) -> None:
        """Start forwarding (``start``)."""
        await self.command("start")

    async def stop(self) -> dict[int, ForwardStats]:
        """Stop forwarding; the per-port forwarding counters since ``start``
        (empty if forwarding was not running)."""
        return parse_forward_stats(await self.command("stop"))

    async def stats(self) -> dict[int, PortStats]:
        """Per-port counters (``show port stats all``), cumulative."""
        text = await self.command("show port stats all")
        stats = parse_port_stats(text, time.monotonic())
        if not stats:
            raise TestpmdError(f"{self.name}: no port statistics in:\n{text}")
        return stats

    async def received_more(self, count: int, port: int = 0) -> bool:
        """Whether ``port`` has received more than ``count`` frames in all (a
        predicate for :func:`vuser.testing.poll.wait_until`)."""
        return (await self.stats())[port].rx_packets > count

    async def quit(self, timeout: float = 10.0) -> int:
        """``quit`` and wait for exit; returns the exit status.

        Quit the front-end before its back-end: a virtio_user whose back-end
        went away first logs failed GET_VRING_BASE replies on the way out.
        """
        if self.process.poll() is None:
            async with self._lock:
                try:
                    await self._send("quit")
                except TestpmdError:
                    pass
        with trio.move_on_after(timeout):
            return int(await self.process.wait())
        raise TestpmdError(f"{self.name}: testpmd still running {timeout} s after quit\n"
                           f"{self.log_tail()}")

    # -- diagnostics

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- {self.name}: testpmd log {self.log_path} (tail)\n" + "\n".join(tail)


def _kill_group(process: trio.Process) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_runtime_dir(prefix: str) -> None:
    """DPDK leaves ``<runtime>/dpdk/<prefix>/`` behind (empty with --no-shconf)."""
    if os.geteuid() == 0:
        base = _ROOT_RUNTIME_DIR
    else:
        base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / "dpdk"
    directory = base / prefix
    try:
        for leftover in directory.iterdir():
            leftover.unlink()
        directory.rmdir()
    except OSError:
        pass


@asynccontextmanager
async def testpmd(vdev: str | Sequence[str], *, fwd: str = "io",
                  txpkts: int | Sequence[int] | None = None,
                  lcores: str = "0@0,1@0", nb_cores: int = 1,
                  memory_mb: int | None = 256, mbufs: int = 16384,
                  hugepages: bool = False, vhost_debug: bool = False,
                  eal_args: Sequence[str] = (), args: Sequence[str] = (),
                  name: str = "testpmd", log_path: str | os.PathLike[str] | None = None,
                  wait_ready: bool = True, startup_timeout: float = 30.0,
                  command_timeout: float = 10.0,
                  exit_timeout: float = 10.0) -> AsyncIterator[Testpmd]:
    """Run testpmd with ``vdev`` (one or several ``--vdev`` strings).

    ``fwd`` is the forward mode (``io``, ``rxonly``, ``txonly``, ``macswap``,
    ...), ``txpkts`` the txonly frame size(s) in bytes.  The context is
    entered once the first prompt arrived (unless ``wait_ready=False``);
    forwarding is not started: call :meth:`Testpmd.start`.  ``log_path``
    keeps the log there; by default it goes to a temporary file that is
    deleted unless something failed.
    """
    binary = testpmd_path()
    if binary is None:
        raise TestpmdNotInstalled(
            f"{TESTPMD} not found: install Debian's dpdk-dev package "
            "(scripts/provision does), or set VUSER_TESTPMD")
    stdbuf = shutil.which("stdbuf")
    if stdbuf is None:
        raise TestpmdNotInstalled("stdbuf (coreutils) not found; running testpmd needs it")
    prefix = f"vuser-{name}-{os.getpid()}-{next(_counter)}"
    argv = testpmd_command(vdev, fwd=fwd, txpkts=txpkts, lcores=lcores,
                           nb_cores=nb_cores, memory_mb=memory_mb, mbufs=mbufs,
                           hugepages=hugepages, file_prefix=prefix,
                           vhost_debug=vhost_debug, eal_args=eal_args, args=args,
                           binary=binary)
    keep_log = log_path is not None
    if log_path is None:
        fd, tmp = tempfile.mkstemp(prefix=f"{prefix}-", suffix=".log")
        os.close(fd)
        path = Path(tmp)
    else:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
    failed = True
    path.write_bytes(("$ " + " ".join(argv) + "\n").encode())
    # O_APPEND: testpmd's threads write stdout and stderr through this one
    # description; appends never overwrite each other.
    with path.open("ab") as log:
        process = await trio.lowlevel.open_process(
            [stdbuf, "-oL", "-eL", *argv], stdin=subprocess.PIPE, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            # Keep Python's SIG_IGN for SIGPIPE in the child: testpmd writing
            # to a peer that already quit gets EPIPE instead of dying.
            restore_signals=False)
    tp = Testpmd(process, path, name, command_timeout)
    try:
        if wait_ready:
            await tp.wait_ready(startup_timeout)
        yield tp
        if process.poll() is None:
            with trio.move_on_after(exit_timeout):
                if tp._ready:
                    await tp.command("stop")
                try:
                    await tp.quit(exit_timeout)
                except TestpmdError:
                    pass  # killed below
        failed = False
    except Exception as exc:
        if str(path) not in str(exc):  # our own errors carry the tail already
            exc.add_note(tp.log_tail())
        raise
    finally:
        _kill_group(process)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                await process.wait()
        if process.stdin is not None:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()
        _remove_runtime_dir(prefix)
        if not failed and not keep_log:
            path.unlink(missing_ok=True)


testpmd.__test__ = False  # type: ignore[attr-defined]  # pytest: not a test, even when imported
