"""The test guest's initramfs: the host's static busybox, the guest files
(``vuser/testing/guest_files``: /init, the command server, the list of
modules to load) and the kernel modules that list names, with their
dependencies, decompressed (busybox insmod cannot load .ko.xz).

The image is rebuilt only when one of its inputs changes: the guest files,
busybox, the kernel, or this module's own source (how it is built).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from vuser.testing.provision.common import ProvisionError, log, run
import vuser.testing.provision.cpio
import vuser.testing.provision.elf
from vuser.testing.provision.cpio import Cpio
from vuser.testing.provision.elf import modinfo
from vuser.testing.provision.kernels import find_modules_dir

__all__ = ["Cpio", "build_initramfs", "guest_files", "modinfo"]

HOST_BUSYBOX = "/bin/busybox"


def guest_files() -> Traversable:
    """The guest files, shipped as package data of vuser.testing."""
    return resources.files("vuser.testing") / "guest_files"


# --------------------------------------------------------------------------
# kernel modules

def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq"], input=data, stdout=subprocess.PIPE,
                              check=True).stdout
    return data


def norm(name: str) -> str:
    return name.replace("-", "_")


def strip_ko(name: str) -> str:
    return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", name)


def wanted_modules() -> list[str]:
    names = []
    for line in (guest_files() / "modules.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


@dataclass
class ModuleSet:
    """The modules to load, dependencies first: name -> (path under
    lib/modules/<kver>, decompressed ELF, dependency names)."""

    loaded: dict[str, tuple[str, bytes, list[str]]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    builtin: set[str] = field(default_factory=set)


def resolve_modules(kdir: Path, wanted: list[str]) -> ModuleSet:
    """``wanted`` and what they depend on (from each module's .modinfo),
    skipping modules built into the kernel; names it lacks are noted."""
    moddir = find_modules_dir(kdir / "root")
    files: dict[str, Path] = {}
    for path in moddir.rglob("*.ko*"):
        files[norm(strip_ko(path.name))] = path
    mods = ModuleSet()
    for bfile in (moddir / "modules.builtin", *kdir.glob("root/*/modules/*/modules.builtin"),
                  *kdir.glob("root/usr/lib/modules/*/modules.builtin")):
        if bfile.is_file():
            mods.builtin |= {norm(strip_ko(Path(line).name)) for line in bfile.read_text().split()}

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        name = norm(name)
        if name in mods.loaded or name in mods.builtin:
            return
        if name in chain:
            raise ProvisionError(f"module dependency loop: {' -> '.join(chain + (name,))}")
        path = files.get(name)
        if path is None:
            mods.missing.append(name)
            return
        elf = read_module(path)
        deps = [d for d in ",".join(modinfo(elf).get("depends", [""])).split(",") if d]
        for dep in deps:
            add(dep, chain + (name,))
        rel = strip_ko(str(path.relative_to(moddir))) + ".ko"
        mods.loaded[name] = (rel, elf, [norm(d) for d in deps])
        mods.order.append(name)

    for name in wanted:
        add(name)
    return mods


# --------------------------------------------------------------------------
# the image

def guest_inputs_hash(kdir: Path) -> str:
    h = hashlib.sha256()
    for item in sorted(guest_files().iterdir(), key=lambda t: t.name):
        if item.is_file():
            h.update(item.name.encode() + b"\0" + item.read_bytes())
    h.update(Path(HOST_BUSYBOX).read_bytes())
    h.update((kdir / ".complete").read_bytes())
    builders = (__file__, vuser.testing.provision.cpio.__file__, vuser.testing.provision.elf.__file__)
    for module in builders:   # how the image is built
        h.update(Path(module).read_bytes())
    return h.hexdigest()[:16]


def image(kver: str, mods: ModuleSet) -> bytes:
    """The uncompressed cpio archive."""
    cpio = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/vuser", "dev", "proc",
              "sys", "tmp", "run", "root", "mnt", "lib", "lib/modules", f"lib/modules/{kver}"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", Path(HOST_BUSYBOX).read_bytes(), 0o755)
    for applet in run([HOST_BUSYBOX, "--list-full"]).stdout.split():
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("init", (guest_files() / "init").read_bytes(), 0o755)
    cpio.file("etc/vuser/cmdserver", (guest_files() / "cmdserver").read_bytes(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    made_dirs: set[str] = set()
    depfile = []
    for name in mods.order:
        rel, elf, deps = mods.loaded[name]
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made_dirs:
                made_dirs.add(d)
                cpio.dir(f"lib/modules/{kver}/{d}")
        cpio.file(f"lib/modules/{kver}/{rel}", elf)
        depfile.append(f"{rel}: " + " ".join(mods.loaded[d][0] for d in deps if d in mods.loaded))
    cpio.file(f"lib/modules/{kver}/modules.dep", ("\n".join(depfile) + "\n").encode())
    cpio.file("etc/vuser/modules", ("\n".join(mods.loaded[n][0] for n in mods.order) + "\n").encode())
    return cpio.finish()


def build_initramfs(kernel: dict[str, Any]) -> dict[str, Any]:
    """``<kernel dir>/initramfs.cpio.gz``, built unless up to date; its
    description (also kept next to it as initramfs.json)."""
    kdir: Path = kernel["dir"]
    kver = str(kernel["version"])
    out = kdir / "initramfs.cpio.gz"
    digest = guest_inputs_hash(kdir)
    info_file = kdir / "initramfs.json"
    if out.exists() and info_file.exists():
        info: dict[str, Any] = json.loads(info_file.read_text())
        if info.get("hash") == digest:
            log(f"    initramfs for {kver} up to date")
            return info
    wanted = wanted_modules()
    mods = resolve_modules(kdir, wanted)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(image(kver, mods), compresslevel=6, mtime=0))
    tmp.rename(out)
    missing = sorted(set(mods.missing))
    info = {"hash": digest, "path": str(out), "modules": mods.order,
            "builtin": sorted(n for n in map(norm, wanted) if n in mods.builtin),
            "unavailable": missing, "size": out.stat().st_size}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    log(f"    initramfs {out.stat().st_size // 1024} KiB, {len(mods.order)} modules"
        + (f"; not in this kernel: {', '.join(missing)}" if missing else ""))
    return info
