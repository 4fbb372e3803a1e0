"""Memory pressure for balloon experiments, without pressing on the machine.

* Host side: a balloon policy reads host memory from a meminfo file or a
  cgroup directory (``vuser.devices.balloon.host``).  ``write_meminfo`` and
  ``write_cgroup`` make such sources in a folder of the test's, replaced
  atomically so a policy never reads half a file; ``follow_rss`` keeps a
  cgroup's ``memory.current`` equal to a QEMU's resident guest memory, so
  what the balloon gives back shows as host memory available again (a
  closed loop, as under a real limit).
* Guest side: ``hog_command`` is a busybox shell loop that fills a tmpfs in
  chunks, with pauses: a memory-hungry program whose pace is known (tmpfs
  pages without swap cannot be reclaimed, like anonymous memory).
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from vuser.testing.qemu import qemu_rss

__all__ = ["HOG_DIR", "follow_rss", "hog_command", "write_cgroup", "write_meminfo"]

HOG_DIR = "/mnt/hog"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_meminfo(path: str | os.PathLike[str], total: int, available: int) -> Path:
    """A meminfo-format file saying the host has ``total`` bytes, ``available`` free."""
    out = Path(path)
    _replace(out, f"MemTotal:       {total // 1024} kB\nMemFree:        {available // 1024} kB\n"
                  f"MemAvailable:   {available // 1024} kB\n")
    return out


def write_cgroup(folder: str | os.PathLike[str], limit: int | None, current: int) -> Path:
    """A cgroup-v2-shaped folder: ``memory.max`` (``max`` for None) and ``memory.current``."""
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    _replace(base / "memory.max", "max\n" if limit is None else f"{limit}\n")
    _replace(base / "memory.current", f"{current}\n")
    return base


async def follow_rss(pid: int, folder: str | os.PathLike[str], limit: int, *, base: int = 0,
                     interval: float = 0.25) -> None:
    """Until cancelled (or the process is gone): ``memory.current`` = the
    process's RssShmem (a guest's RAM in a shared memfd) + ``base``."""
    while True:
        try:
            rss = qemu_rss(pid)["RssShmem"]
        except (OSError, KeyError):
            return
        write_cgroup(folder, limit, rss + base)
        await trio.sleep(interval)


def hog_command(total_mib: int, *, chunk_mib: int = 4, pause: float = 0.25, tmpfs_mib: int = 1024) -> str:
    """Shell for the guest: mount a tmpfs at HOG_DIR (its size a limit, not
    a reservation), then write ``total_mib`` into it, ``chunk_mib`` at a time
    with ``pause`` seconds between; prints ``hog: N MiB`` at the end, exits
    non-zero if a write failed.  Remove with ``rm -f HOG_DIR/*``."""
    chunks = max(1, total_mib // chunk_mib)
    return (f"mkdir -p {HOG_DIR} && (grep -q ' {HOG_DIR} ' /proc/mounts || mount -t tmpfs -o size={tmpfs_mib}m tmpfs "
            f"{HOG_DIR}) && i=0 && while [ $i -lt {chunks} ]; do "
            f"dd if=/dev/zero of={HOG_DIR}/$i bs=1M count={chunk_mib} 2>/dev/null || exit 1; "
            f"i=$((i+1)); usleep {int(pause * 1e6)}; done && echo hog: $((i*{chunk_mib})) MiB")
