"""Debian packages for the test guest: an initramfs part holding the named
packages' files and the shared libraries they need, nothing else.

The guest has busybox and no libc, and it boots from RAM, so a package's
whole dependency closure (perl, dpkg, debconf ...) would be both useless and
costly.  What goes in instead:

* every file of each named package, except documentation (``usr/share/doc``,
  man pages, locales);
* for every ELF file in the image, its dynamic loader and each
  ``DT_NEEDED`` library, found where glibc's loader would look (the
  file's RUNPATH, then ``/lib/x86_64-linux-gnu``, ``/usr/lib/x86_64-linux-gnu``,
  ``/lib``, ``/usr/lib``) in the packages the named ones depend on, then in
  those the used libraries depend on, and so on.

A library loaded with dlopen() is not listed in the ELF, so it is not found:
name its package too.

Packages come from the host's release (the guest kernel does not matter to
userspace) through a private apt (:class:`PrivateApt`, its lists fetched
once, refreshed by ``vuser provision --refresh``).  Cache layout under
``<cache>/packages/``: ``debs/`` the downloads, ``roots/<deb>/`` each one
unpacked, ``images/<key>.cpio.gz`` one per set of names and package lists.
A warm call is one stat of the finished image.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from vuser.testing.provision.apt import PrivateApt, discover_mirror, first_depends, host_codename
from vuser.testing.provision.common import ProvisionError, log, run
from vuser.testing.provision.cpio import Cpio
from vuser.testing.provision.elf import is_elf, needs

__all__ = ["PackageImage", "package_image", "valid_package_name"]

# Where glibc's loader looks when a file's RUNPATH does not say (Debian's
# multiarch directories are its built-in system directories).
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")
SKIPPED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
           "usr/share/lintian", "usr/share/bug")
NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")   # Debian policy 5.6.1


def valid_package_name(name: str) -> bool:
    return bool(NAME.match(name))


@dataclass
class PackageImage:
    """An initramfs part (gzip'ed cpio) and what is in it."""

    path: Path
    packages: list[str] = field(default_factory=list)   # every package a file came from
    files: int = 0


def _starts_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return is_elf(f.read(4))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache (parallel test processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _lists_stamp(apt: PrivateApt) -> str:
    h = hashlib.sha256()
    for p in sorted((apt.root / "state/lists").glob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class _Pool:
    """Unpacked packages, downloaded on first mention, with the libraries
    each one ships indexed by file name."""

    def __init__(self, apt: PrivateApt, base: Path) -> None:
        self.apt = apt
        self.debs = base / "debs"
        self.roots = base / "roots"
        self.debs.mkdir(parents=True, exist_ok=True)
        self.roots.mkdir(parents=True, exist_ok=True)
        self.root: dict[str, Path] = {}        # package -> unpacked tree
        self.expanded: set[str] = set()        # packages whose dependencies are in

    def add(self, pkgs: Sequence[str]) -> None:
        """Download and unpack ``pkgs`` (real package names) not yet in."""
        new = sorted({p for p in pkgs if p not in self.root})
        if not new:
            return
        # --print-uris names the file apt-get download saves, per package.
        files: dict[str, str] = {}
        for line in self.apt.apt_get("download", "--print-uris", *new).stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].startswith("'"):
                files[parts[1].split("_", 1)[0]] = parts[1]
        missing = [p for p in new if p not in files]
        if missing:
            raise ProvisionError(f"no such package in {self.apt.suite}: {', '.join(missing)}")
        todo = [p for p in new if not (self.debs / files[p]).is_file()]
        if todo:
            log(f"    downloading {' '.join(todo)}")
            self.apt.apt_get("download", *todo, cwd=self.debs)
        for pkg in new:
            deb = self.debs / files[pkg]
            root = self.roots / deb.stem
            if not (root / ".complete").is_file():
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                run(["dpkg-deb", "-x", str(deb), str(root)])
                (root / ".complete").write_text("")
            self.root[pkg] = root

    def expand(self, pkgs: Sequence[str]) -> None:
        """Bring in what ``pkgs`` depend on (real packages; virtual ones,
        which apt prints in angle brackets, are someone else's)."""
        todo = [p for p in pkgs if p not in self.expanded]
        if not todo:
            return
        self.expanded.update(todo)
        deps = first_depends(self.apt, todo)
        self.add([d for p in todo for d in deps.get(p, []) if not d.startswith("<")])

    def find(self, rel: str) -> tuple[str, Path] | None:
        """The package and host path of guest path ``rel`` (no leading /)."""
        for pkg, root in self.root.items():
            path = root / rel
            if path.is_symlink() or path.exists():
                return pkg, path
        return None


class _Image:
    """The files chosen so far, by guest path."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.files: dict[str, Path] = {}
        self.sources: set[str] = set()
        self.pending: list[str] = []   # ELF files not yet looked into

    def add(self, rel: str, path: Path, pkg: str) -> None:
        if rel in self.files:
            return
        self.files[rel] = path
        self.sources.add(pkg)
        if path.is_symlink():
            target = os.readlink(path)
            parent = PurePosixPath(rel).parent
            resolved = os.path.normpath(target.lstrip("/") if target.startswith("/")
                                        else str(parent / target))
            self.require(resolved, f"the target of {rel}")
        elif path.is_file() and _starts_elf(path):
            self.pending.append(rel)

    def require(self, rel: str, why: str) -> None:
        """Guest path ``rel`` must be in the image: take it from the pool."""
        if rel in self.files:
            return
        found = self.pool.find(rel)
        if found is None:
            raise ProvisionError(f"{rel} ({why}) is in none of {', '.join(sorted(self.pool.root))}")
        pkg, path = found
        self.add(rel, path, pkg)
        self.pool.expand([pkg])

    def library(self, name: str, dirs: list[str], who: str) -> None:
        for d in dirs:
            rel = os.path.normpath(f"{d}/{name}").lstrip("/")
            if rel in self.files or self.pool.find(rel):
                self.require(rel, f"needed by {who}")
                return
        raise ProvisionError(f"{name}, needed by /{who}, is in none of "
                             f"{', '.join(sorted(self.pool.root))}")

    def close(self) -> None:
        """Follow every ELF file's loader and libraries, transitively."""
        while self.pending:
            rel = self.pending.pop()
            try:
                need = needs(self.files[rel].read_bytes())
            except ProvisionError:
                continue   # 32-bit or foreign ELF data files: nothing to follow
            origin = str(PurePosixPath("/" + rel).parent)
            dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                    for d in need.search_path] + ["/" + d for d in LIBRARY_DIRS]
            if need.interpreter:
                self.require(need.interpreter.lstrip("/"), f"the loader of /{rel}")
            for lib in need.libraries:
                self.library(lib, dirs, rel)


def _write(files: dict[str, Path], out: Path) -> None:
    cpio = Cpio()
    made: set[str] = set()
    for rel in sorted(files):
        path = files[rel]
        cpio.parents(rel, made)
        if path.is_symlink():
            cpio.symlink(rel, os.readlink(path))
        else:
            cpio.file(rel, path.read_bytes(), path.stat().st_mode & 0o7777)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    tmp.rename(out)


def package_image(cache: Path, names: Sequence[str], *, refresh: bool = False) -> PackageImage:
    """The initramfs part for packages ``names`` (built unless cached)."""
    names = sorted(set(names))
    bad = [n for n in names if not valid_package_name(n)]
    if bad:
        raise ProvisionError(f"not Debian package names: {', '.join(bad)}")
    base = cache / "packages"
    with _locked(base / ".lock"):
        suite = host_codename()
        uri, signed_by = discover_mirror()
        apt = PrivateApt(cache / "apt" / suite, uri, suite, signed_by)
        if refresh or not apt.has_lists():
            log(f"    apt-get update ({suite}, private lists)")
            apt.update()
        key = hashlib.sha256("\n".join([suite, _lists_stamp(apt), Path(__file__).read_text(),
                                        *names]).encode()).hexdigest()[:16]
        out = base / "images" / f"{key}.cpio.gz"
        listing = out.with_suffix(".txt")
        if out.is_file() and listing.is_file():
            packages = listing.read_text().split()
            return PackageImage(out, packages[1:], int(packages[0]))
        pool = _Pool(apt, base)
        pool.add(names)
        pool.expand(names)
        image = _Image(pool)
        for pkg in names:
            root = pool.root[pkg]
            for path in sorted(root.rglob("*")):
                rel = str(path.relative_to(root))
                if path.is_dir() and not path.is_symlink() or rel == ".complete":
                    continue
                if not any(rel == s or rel.startswith(s + "/") for s in SKIPPED):
                    image.add(rel, path, pkg)
        image.close()
        out.parent.mkdir(parents=True, exist_ok=True)
        _write(image.files, out)
        listing.write_text(" ".join([str(len(image.files)), *sorted(image.sources)]) + "\n")
        log(f"    {', '.join(names)}: {len(image.files)} files from {', '.join(sorted(image.sources))}, "
            f"{out.stat().st_size // 1024} KiB")
        return PackageImage(out, sorted(image.sources), len(image.files))
