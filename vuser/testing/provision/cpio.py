"""A writer of the 'newc' cpio format the kernel unpacks as an initramfs.

Several archives concatenated make one initramfs: the kernel unpacks them in
order, later entries replacing earlier ones, so a test's files and packages
ride on the provisioned image (:func:`concatenate`).  Standard library only.
"""

from __future__ import annotations

import io
import stat
from pathlib import Path, PurePosixPath
from typing import Sequence

__all__ = ["Cpio", "concatenate"]


class Cpio:
    """Minimal writer of the 'newc' cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        bname = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(bname), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + bname)
        self.buf.write(b"\0" * (-(110 + len(bname)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def parents(self, name: str, made: set[str]) -> None:
        """Directory entries for every parent of ``name`` not in ``made``
        (the kernel creates no missing parents; an entry for a directory
        the image already has is harmless)."""
        for parent in reversed(PurePosixPath(name).parents[:-1]):   # [-1] is "."
            if str(parent) not in made:
                made.add(str(parent))
                self.dir(str(parent))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def concatenate(parts: Sequence[Path], out: Path) -> None:
    """Write the archives ``parts`` (gzip'ed or not) one after another as
    ``out``.  Each starts on a 4-byte boundary: the kernel looks for an
    uncompressed archive's magic only there, and skips the zeros between."""
    with open(out, "wb") as f:
        for part in parts:
            f.write(b"\0" * (-f.tell() % 4))
            f.write(part.read_bytes())
