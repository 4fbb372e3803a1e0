"""The two QEMUs of the tests: the host's (Debian bookworm, 7.2) as it is,
and sid's (11.x, which has vhost-user-test-device-pci) unpacked into the
cache with its whole library closure and run through that closure's own
dynamic loader.

Each returns its manifest entry (plus "key", the manifest key: major.minor
for the host's, the major for sid's).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from vuser.testing.provision.apt import PrivateApt, candidate, upstream_version
from vuser.testing.provision.common import ProvisionError, log, run

__all__ = ["provision_host_qemu", "provision_sid_qemu"]

HOST_QEMU = "/usr/bin/qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
REQUIRED_DEVICE = "vhost-user-test-device-pci"
LD_SO = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"


def wrapper_text() -> str:
    return f"""#!/bin/sh
# QEMU from Debian sid, unpacked by vuser's scripts/provision; runs through the
# tree's own dynamic loader so the host's libraries are never mixed in.  The
# qemu-bundle link next to ld.so makes QEMU find its modules and firmware in
# the tree (QEMU relocates its paths against the loader's directory).
here=$(cd "$(dirname "$0")/.." && pwd)
root="$here/root"
lib="$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
exec "$root/{LD_SO}" --library-path "$lib" "$root/usr/bin/qemu-system-x86_64" \\
    -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
"""


def qemu_version_string(binary: str) -> str:
    out = run([binary, "--version"]).stdout
    return out.splitlines()[0].strip()


def verify_qemu(binary: str, need_device: str | None) -> str:
    """The binary's version line, after checking it runs (and has ``need_device``)."""
    version = qemu_version_string(binary)
    if need_device:
        proc = run([binary, "-device", "help"], check=False)
        if proc.returncode != 0 or f'"{need_device}"' not in proc.stdout:
            raise ProvisionError(f"{binary} -device help does not list {need_device} "
                                 f"(rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return version


def _unpack_closure(cache: Path, apt: PrivateApt, debver: str, upver: str, qdir: Path) -> None:
    """Download the qemu-system-x86 closure and unpack it as ``qdir``
    (through a temporary folder, so a half-done tree is never used)."""
    log(f"    downloading the {QEMU_PACKAGE} {debver} closure from {apt.suite}")
    archives = apt.root / "cache/archives"
    for old in archives.glob("*.deb"):
        old.unlink()
    apt.apt_get("-y", "-oAPT::Get::Download-Only=true", "install", QEMU_PACKAGE)
    debs = sorted(archives.glob("*.deb"))
    if not debs:
        raise ProvisionError("apt downloaded no packages for qemu-system-x86")
    tmp = cache / f".qemu-{upver}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "root").mkdir(parents=True)
    log(f"    extracting {len(debs)} packages")
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(tmp / "root")])
    ld = tmp / "root" / LD_SO
    if not ld.exists():
        raise ProvisionError(f"no dynamic loader in the closure ({LD_SO})")
    (ld.parent / "qemu-bundle").symlink_to("../../..")
    (tmp / "bin").mkdir()
    w = tmp / "bin/qemu-system-x86_64"
    w.write_text(wrapper_text())
    w.chmod(0o755)
    (tmp / "packages.txt").write_text("\n".join(d.name for d in debs) + "\n")
    for old in archives.glob("*.deb"):
        old.unlink()
    shutil.rmtree(qdir, ignore_errors=True)
    tmp.rename(qdir)


def provision_sid_qemu(cache: Path, apt: PrivateApt) -> dict[str, Any]:
    debver = candidate(apt, QEMU_PACKAGE)
    upver = upstream_version(debver)
    qdir = cache / f"qemu-{upver}"
    wrapper = qdir / "bin/qemu-system-x86_64"
    stamp = qdir / ".complete"
    if stamp.exists() and stamp.read_text().strip() == debver:
        log(f"    qemu {debver} already unpacked")
    else:
        _unpack_closure(cache, apt, debver, upver, qdir)
        stamp.write_text(debver + "\n")
        for old in cache.glob("qemu-*.*"):   # trees of earlier sid versions
            if old != qdir and old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
    major = upver.split(".")[0]
    link = cache / f"qemu-{major}"
    if not (link.is_symlink() and os.readlink(link) == qdir.name):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(qdir.name)
    version = verify_qemu(str(wrapper), REQUIRED_DEVICE)
    return {"key": major, "binary": str(wrapper), "version_string": version,
            "version": upver, "package_version": debver}


def provision_host_qemu() -> dict[str, Any]:
    version = verify_qemu(HOST_QEMU, None)
    m = re.search(r"version (\d+\.\d+)", version)
    upver = re.search(r"version (\S+)", version)
    key = m.group(1) if m else "host"
    pkg = run(["dpkg-query", "-W", "-f=${Version}", QEMU_PACKAGE], check=False).stdout.strip()
    return {"key": key, "binary": HOST_QEMU, "version_string": version,
            "version": upver.group(1) if upver else "", "package_version": pkg}
