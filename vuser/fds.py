"""File descriptors a front-end sends: checked for kind on receipt, and
eventfd signalling that cannot block the process.

A front-end may attach any fd to any request (an O_PATH fd, a memfd as an
eventfd, a pipe as a socket...).  Each kind of fd is checked before it is
used, so a wrong one is a protocol fault of that connection with a named
reason instead of a system call failing somewhere later (issue 9):

* kick / call / err: an eventfd (``/proc/self/fd`` names it);
* the back-end channel: a unix stream socket;
* guest memory: a regular file (memfd, tmpfs, hugetlbfs, a plain file)
  opened read-write, not O_PATH, long enough for the region.

Files a local user names for vuser to write (a pcap capture, a recorded
time series) are opened by ``open_private_output``: never through a symlink,
never a FIFO or device (which could block or swallow the writes), never
another user's file, and never readable by others.

Eventfds are shared with the front-end, which may clear O_NONBLOCK on the
shared file description or fill the counter.  So vuser never relies on
O_NONBLOCK alone: before writing it polls for POLLOUT (a full counter means
"already signalled": the write is skipped) and before reading for POLLIN.
Residual race: between that poll and the system call the front-end can
fill (or drain) the counter *and* have cleared O_NONBLOCK; the write (or
read) then blocks.  It takes a front-end racing its own eventfd within
microseconds, on purpose; no eventfd API closes it (the description is
shared and eventfds cannot be reopened).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import select
import socket
import stat

_ONE = (1).to_bytes(8, "little")


class FdKindError(Exception):
    """An fd of the wrong kind for what it was sent as."""


def fd_kind(fd: int) -> str:
    """What ``fd`` is, for messages: 'an eventfd', 'a socket', 'a pipe',
    'an O_PATH fd', 'a memfd', 'the file /x' (best effort, never raises)."""
    try:
        if _getfl(fd) & os.O_PATH:
            return "an O_PATH fd"
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"an unusable fd ({exc.strerror})"
    if link.startswith("anon_inode:"):
        name = link.split(":", 1)[1].strip("[]")
        return f"an {name}" if name[:1] in "aeiou" else f"a {name}"
    for prefix, kind in (("pipe:", "a pipe"), ("socket:", "a socket"), ("/memfd:", "a memfd")):
        if link.startswith(prefix):
            return kind
    return f"the file {link}"


def _getfl(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def require_eventfd(fd: int, what: str) -> None:
    """``fd`` must be an eventfd (kick, call, err)."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise FdKindError(f"{what} fd is not usable: {exc.strerror}") from None
    if link != "anon_inode:[eventfd]":
        raise FdKindError(f"{what} fd is {fd_kind(fd)}, not an eventfd")
    # Our side of the shared description: non-blocking, as far as it goes.
    os.set_blocking(fd, False)


def require_unix_stream(fd: int, what: str) -> None:
    """``fd`` must be a connected unix stream socket (the back-end channel)."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise FdKindError(f"{what} fd is not usable: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise FdKindError(f"{what} fd is {fd_kind(fd)}, not a socket")
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            family, kind = s.family, s.type
    except OSError as exc:
        raise FdKindError(f"{what} fd is not a usable socket: {exc.strerror}") from None
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM:
        raise FdKindError(f"{what} fd is a {family.name}/{kind.name} socket, not a unix stream socket")


def require_memory_file(fd: int, size: int, offset: int) -> os.stat_result:
    """``fd`` must be a regular file (memfd, tmpfs, hugetlbfs...) opened
    read-write that holds ``[offset, offset + size)``: anything past its end
    would fault (SIGBUS) at the first access.  Returns its stat."""
    try:
        st = os.fstat(fd)
        flags = _getfl(fd)
    except OSError as exc:
        raise FdKindError(f"memory fd is not usable: {exc.strerror}") from None
    if flags & os.O_PATH:
        raise FdKindError("memory fd is an O_PATH fd")
    if not stat.S_ISREG(st.st_mode):
        raise FdKindError(f"memory fd is {fd_kind(fd)}, not a file")
    if flags & os.O_ACCMODE != os.O_RDWR:
        raise FdKindError("memory fd is not open read-write")
    if st.st_size < offset + size:
        raise FdKindError(f"memory region ends at {offset + size:#x}, beyond the end of its file "
                          f"({st.st_size:#x} bytes)")
    return st


TMPFS_MAGIC = 0x01021994      # linux/magic.h: tmpfs, shmem, memfd
HUGETLBFS_MAGIC = 0x958458F6
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def fs_type(fd: int) -> int:
    """The filesystem magic of the file behind ``fd`` (fstatfs f_type), or 0."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def _ready(fd: int, event: int) -> bool:
    p = select.poll()
    p.register(fd, event)
    return bool(p.poll(0))


def signal_eventfd(fd: int) -> bool:
    """Add 1 to an eventfd without blocking: False when the counter is
    full (the other side is being signalled anyway) or the write fails."""
    try:
        if not _ready(fd, select.POLLOUT):
            return False
        os.write(fd, _ONE)
    except (BlockingIOError, OSError):
        return False
    return True


def drain_eventfd(fd: int) -> int:
    """Read (and so reset) an eventfd's counter without blocking; 0 when
    there was nothing."""
    try:
        if not _ready(fd, select.POLLIN):
            return 0
        return int.from_bytes(os.read(fd, 8), "little")
    except (BlockingIOError, OSError):
        return 0


def open_private_output(path: str) -> int:
    """Create or truncate ``path`` for writing (see the module docstring);
    OSError names what is wrong.  O_NONBLOCK: opening a FIFO must not wait
    for a reader (it then fails the regular-file check instead)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise OSError(errno.EPERM, f"{path}: not a regular file of ours")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
