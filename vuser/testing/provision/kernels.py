"""Guest kernels: Debian's linux-image-cloud-amd64 of a suite (bookworm
through the host's apt, sid through a private one), downloaded with its
versioned image/modules packages and unpacked into the cache as
``kernels/<suite>-<kver>/`` (``root/`` the packages, ``vmlinuz``).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from vuser.testing.provision.apt import Apt, candidate, first_depends
from vuser.testing.provision.common import ProvisionError, log, run

__all__ = ["find_modules_dir", "provision_kernel"]

KERNEL_META = "linux-image-cloud-amd64"


def kernel_packages(apt: Apt, meta: str) -> list[str]:
    """The versioned linux-* packages the meta package pulls in (image,
    binary, modules, base), following first alternatives only."""
    want = re.compile(r"^linux-(image|binary|modules|base)-\d")
    seen: set[str] = set()
    todo = [meta]
    result: list[str] = []
    while todo:
        pkg = todo.pop()
        if pkg in seen:
            continue
        seen.add(pkg)
        if pkg != meta:
            result.append(pkg)
        todo += [name for name in first_depends(apt, [pkg]).get(pkg, []) if want.match(name)]
    if not result:
        raise ProvisionError(f"{meta} pulls in no versioned linux-* package")
    return sorted(result)


def find_modules_dir(root: Path) -> Path:
    for base in ("lib/modules", "usr/lib/modules"):
        dirs = [d for d in (root / base).glob("*") if (d / "kernel").is_dir()]
        if dirs:
            return dirs[0]
    raise ProvisionError(f"no modules tree under {root}")


def find_vmlinuz(root: Path, kver: str) -> Path:
    for cand in (root / f"boot/vmlinuz-{kver}", root / f"usr/lib/modules/{kver}/vmlinuz",
                 root / f"lib/modules/{kver}/vmlinuz"):
        if cand.is_file():
            return cand
    raise ProvisionError(f"no vmlinuz for {kver} under {root}")


def _unpack_kernel(cache: Path, suite: str, apt: Apt, kernels: Path) -> Path:
    """Download and unpack the suite's kernel; its new folder."""
    pkgs = kernel_packages(apt, KERNEL_META)
    log(f"    downloading {' '.join(pkgs)}")
    dl = cache / "apt" / suite / "kernel-debs"
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir(parents=True)
    apt.apt_get("download", *pkgs, cwd=dl)
    tmp = kernels / f".{suite}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "root").mkdir(parents=True)
    for deb in sorted(dl.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(tmp / "root")])
    kver = find_modules_dir(tmp / "root").name
    vmlinuz = find_vmlinuz(tmp / "root", kver)
    shutil.copyfile(vmlinuz, tmp / "vmlinuz")
    (tmp / "kernel-version").write_text(kver + "\n")
    shutil.rmtree(dl)
    kdir = kernels / f"{suite}-{kver}"
    shutil.rmtree(kdir, ignore_errors=True)
    tmp.rename(kdir)
    for old in kernels.glob(f"{suite}-*"):
        if old != kdir:
            shutil.rmtree(old, ignore_errors=True)
    return kdir


def provision_kernel(cache: Path, suite: str, apt: Apt) -> dict[str, Any]:
    debver = candidate(apt, KERNEL_META)
    kernels = cache / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    existing = [d for d in kernels.glob(f"{suite}-*")
                if (d / ".complete").is_file() and (d / ".complete").read_text().strip() == debver]
    if existing:
        kdir = existing[0]
        log(f"    {suite} kernel {debver} already unpacked")
    else:
        kdir = _unpack_kernel(cache, suite, apt, kernels)
        (kdir / ".complete").write_text(debver + "\n")
    kver = (kdir / "kernel-version").read_text().strip()
    return {"suite": suite, "dir": kdir, "version": kver, "package_version": debver,
            "vmlinuz": str(kdir / "vmlinuz")}
