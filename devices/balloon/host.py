"""The host's memory figures a balloon policy weighs: how much memory the
host (or the cgroup the guests are held to) has, and how much of it is
still available.

Sources:

* a meminfo-format file (default ``/proc/meminfo``): ``MemTotal`` and
  ``MemAvailable`` (``MemFree`` on kernels older than 3.14);
* a cgroup directory: ``memory.max`` and ``memory.current`` (cgroup v2;
  ``memory.limit_in_bytes`` / ``memory.usage_in_bytes`` in a v1 hierarchy);
  available is the limit minus the usage.  A cgroup without a limit falls
  back to the meminfo file.

Tests and experiments point either at a file or directory they write, so
host pressure can be simulated without pressing on the machine.

The paths come from a policy spec, which a local user can set through the
control socket: a file is opened non-blocking and must be a regular file
(``/proc`` and cgroup files are), so a FIFO or a device cannot block or
flood vuser; at most ``MAX_READ`` bytes are read.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

PROC_MEMINFO = "/proc/meminfo"
MAX_READ = 64 * 1024
# cgroup file names: (limit, usage), v2 first.
CGROUP_FILES = (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes"))
# A v1 cgroup without a limit reports a huge page-rounded number.
UNLIMITED = 1 << 62


class HostMemoryError(OSError):
    """A host memory source cannot be read or makes no sense."""


@dataclass(frozen=True)
class HostMemory:
    """Bytes of memory the host has (``total``) and has still available."""

    total: int
    available: int
    source: str

    @property
    def available_fraction(self) -> float:
        return self.available / self.total if self.total > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {"total": self.total, "available": self.available, "source": self.source}


def read_small(path: str | Path) -> str:
    """The text of a small regular file, without blocking on what is not
    one (see the module docstring)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HostMemoryError(errno.EINVAL, "not a regular file", str(path))
        return os.read(fd, MAX_READ).decode("ascii", "replace")
    finally:
        os.close(fd)


def read_meminfo(path: str | Path = PROC_MEMINFO) -> HostMemory:
    values: dict[str, int] = {}
    for line in read_small(path).splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    available = values.get("MemAvailable", values.get("MemFree"))
    if "MemTotal" not in values or available is None:
        raise HostMemoryError(errno.EINVAL, "no MemTotal and MemAvailable (or MemFree) lines", str(path))
    return HostMemory(values["MemTotal"], min(available, values["MemTotal"]), f"meminfo {path}")


def _number(path: Path) -> int | None:
    """A cgroup number file: an integer, or None for "max" (no limit)."""
    text = read_small(path).strip()
    if text == "max":
        return None
    if not text.isdigit():
        raise HostMemoryError(errno.EINVAL, f"not a number: {text[:40]!r}", str(path))
    return int(text)


def read_cgroup(directory: str | Path, meminfo: str | Path = PROC_MEMINFO) -> HostMemory:
    base = Path(directory)
    for limit_name, usage_name in CGROUP_FILES:
        if (base / usage_name).exists():
            break
    else:
        raise HostMemoryError(errno.ENOENT, "no memory.current (or memory.usage_in_bytes)", str(base))
    usage = _number(base / usage_name)
    limit = _number(base / limit_name)
    if usage is None:
        raise HostMemoryError(errno.EINVAL, f"{usage_name} says max", str(base))
    if limit is None or limit >= UNLIMITED:
        host = read_meminfo(meminfo)
        return HostMemory(host.total, host.available, f"{host.source} (cgroup {base} has no limit)")
    return HostMemory(limit, max(0, limit - usage), f"cgroup {base}")


@dataclass(frozen=True)
class HostSource:
    """Where a policy reads host memory: a cgroup directory if given, else
    a meminfo file."""

    meminfo: str = PROC_MEMINFO
    cgroup: str | None = None

    def read(self) -> HostMemory:
        if self.cgroup is not None:
            return read_cgroup(self.cgroup, self.meminfo)
        return read_meminfo(self.meminfo)

    def describe(self) -> str:
        return f"cgroup {self.cgroup}" if self.cgroup is not None else f"meminfo {self.meminfo}"
