"""A test's own files in the guest: host files and folders copied to guest
paths by an initramfs part that rides on the provisioned image.

::

    archive = files_archive({"/usr/local/bin/probe": "build/probe",
                             "/etc/probe": "tests/probe-config"})

A folder is copied whole (its files, folders and symbolic links); every
entry keeps its permission bits, so an executable stays executable.  The
guest sees them from its first instruction: they are unpacked with the
rest of the initramfs, before /init runs.

Error handling: a guest path that is relative or climbs out of / raises
ValueError, a host path that does not exist FileNotFoundError; both before
anything boots.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Mapping

from vuser.testing.provision.cpio import Cpio

__all__ = ["StrPath", "files_archive", "guest_path"]

StrPath = str | os.PathLike[str]


def guest_path(path: str) -> str:
    """``path`` as a cpio entry name (no leading /); ValueError unless it is
    absolute and stays inside the guest's root."""
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts or pure == PurePosixPath("/"):
        raise ValueError(f"files=: guest path {path!r} must be absolute, below / and without '..'")
    return str(pure.relative_to("/"))


def _add(cpio: Cpio, name: str, host: Path, made: set[str]) -> None:
    cpio.parents(name, made)
    mode = host.lstat().st_mode & 0o7777
    if host.is_symlink():
        cpio.symlink(name, os.readlink(host))
    elif host.is_dir():
        if name not in made:
            made.add(name)
            cpio.dir(name, mode)
        for child in sorted(host.iterdir()):
            _add(cpio, f"{name}/{child.name}", child, made)
    else:
        cpio.file(name, host.read_bytes(), mode)


def files_archive(files: Mapping[str, StrPath]) -> bytes:
    """An uncompressed cpio archive of ``files`` (guest path -> host path)."""
    cpio = Cpio()
    made: set[str] = set()
    for gpath, hpath in sorted(files.items()):
        name = guest_path(gpath)
        host = Path(hpath)
        if not host.exists() and not host.is_symlink():
            raise FileNotFoundError(f"files=: host path {str(host)!r} (for {gpath}) does not exist")
        _add(cpio, name, host, made)
    return cpio.finish()
