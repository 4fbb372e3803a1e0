"""Provision what vuser's real-guest tests need, idempotently.

    vuser provision [--cache DIR] [--refresh] [--quiet] [--packages PKG ...]
    scripts/provision ...                  (a source checkout, before pip install)
    python3 -m vuser.testing.provision ...

Installs (only if missing) the host packages, fetches QEMU and guest kernels
from Debian sid / bookworm into a cache outside the work tree, builds one
busybox initramfs per kernel and writes ``<cache>/manifest.json``, which
``vuser.testing.guest`` reads.  The cache is ``$VUSER_CACHE`` or
``$HOME/.cache/vuser``.  A warm run does no network access; ``--refresh``
re-reads sid's package lists and picks up newer QEMU / kernel versions.
``--packages`` also builds the guest image of those Debian packages (what
the ``packages=`` of the ``vuser_guest`` fixture boots with), so a test run
finds it ready.

The Debian mirror is the one the host's apt already uses for debian main
(found in its sources at run time); sid is fetched from the same URI with a
private apt state, so the host's packages are never touched.

Layout of the cache:
    apt/<suite>/            private apt state, lists and downloaded .debs
    qemu-<version>/root/    the qemu-system-x86 closure, dpkg-deb -x'ed
    qemu-<version>/bin/qemu-system-x86_64   wrapper (runs root's ld.so)
    kernels/<suite>-<kver>/root/             extracted kernel packages
    kernels/<suite>-<kver>/vmlinuz, initramfs.cpio.gz
    packages/               Debian packages for guests (see packages.py)
    manifest.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from vuser.testing.manifest import cache_dir, write_manifest
from vuser.testing.provision.apt import (Apt, HostApt, PrivateApt, apt_get_update,
                                         discover_mirror, install_host_packages)
from vuser.testing.provision.common import ProvisionError, Timer, log, set_quiet
from vuser.testing.provision.initramfs import build_initramfs
from vuser.testing.provision.kernels import provision_kernel
from vuser.testing.provision.packages import package_image
from vuser.testing.provision.qemu import provision_host_qemu, provision_sid_qemu

__all__ = ["DESCRIPTION", "add_arguments", "main", "run"]

DESCRIPTION = (__doc__ or "").split("\n\n")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vuser provision`` (and of this module's ``main``)."""
    parser.add_argument("--cache", type=Path, default=cache_dir(),
                        help="cache directory (default: $VUSER_CACHE or ~/.cache/vuser)")
    parser.add_argument("--refresh", action="store_true",
                        help="re-read the package lists (newer QEMU, kernels, packages)")
    parser.add_argument("--quiet", action="store_true", help="only the summary")
    parser.add_argument("--packages", nargs="+", action="extend", default=[], metavar="PKG",
                        help="also build the guest image of these Debian packages (packages= of "
                             "the vuser_guest fixture)")


def provision_kernels(cache: Path, sid: PrivateApt, timer: Timer) -> dict[str, dict[str, Any]]:
    kernels = {}
    suites: list[tuple[str, Apt]] = [("bookworm", HostApt()), ("sid", sid)]
    for suite, apt in suites:
        with timer.step(f"kernel ({suite})"):
            try:
                kernels[suite] = provision_kernel(cache, suite, apt)
            except ProvisionError:
                if suite != "bookworm":
                    raise
                log("    not found with the host's lists, running apt-get update")
                apt_get_update()
                kernels[suite] = provision_kernel(cache, suite, apt)
            log(f"    {kernels[suite]['version']}")
    return kernels


def provision(cache: Path, refresh: bool, timer: Timer) -> tuple[Path, dict[str, Any]]:
    """Every step, then the manifest; its path and contents."""
    with timer.step("host packages"):
        install_host_packages()
    with timer.step("Debian mirror"):
        uri, signed_by = discover_mirror()
        log(f"    {uri}")
    sid = PrivateApt(cache / "apt/sid", uri, "sid", signed_by)
    with timer.step("sid package lists"):
        if refresh or not sid.has_lists():
            sid.update()
        else:
            log("    cached (use --refresh to update)")
    with timer.step("QEMU (host, bookworm)"):
        host_qemu = provision_host_qemu()
        log(f"    {host_qemu['version_string']}")
    with timer.step("QEMU (sid)"):
        sid_qemu = provision_sid_qemu(cache, sid)
        log(f"    {sid_qemu['version_string']}")
    kernels = provision_kernels(cache, sid, timer)
    initramfs = {}
    for suite, kernel in kernels.items():
        with timer.step(f"initramfs ({suite})"):
            initramfs[suite] = build_initramfs(kernel)
    return write_manifest(
        cache,
        qemu={q["key"]: {k: v for k, v in q.items() if k != "key"} for q in (host_qemu, sid_qemu)},
        qemu_aliases={"bookworm": host_qemu["key"], "sid": sid_qemu["key"]},
        kernels={suite: {"version": k["version"], "package_version": k["package_version"],
                         "vmlinuz": k["vmlinuz"], "initramfs": initramfs[suite]["path"],
                         "initramfs_hash": initramfs[suite]["hash"],
                         "modules": initramfs[suite]["modules"],
                         "builtin": initramfs[suite]["builtin"],
                         "unavailable": initramfs[suite]["unavailable"]}
                 for suite, k in kernels.items()})


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """``scripts/provision`` / ``python3 -m vuser.testing.provision``."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Provision as ``args`` say: 0 when everything is in place, 1 (with a
    message on stderr) when a step failed."""
    set_quiet(args.quiet)
    cache: Path = args.cache.expanduser().absolute()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    timer = Timer()
    try:
        path, manifest = provision(cache, args.refresh, timer)
        if args.packages:
            with timer.step("guest packages"):
                image = package_image(cache, args.packages, refresh=args.refresh)
    except ProvisionError as exc:
        print(f"provision: error: {exc}", file=sys.stderr)
        return 1
    total = time.monotonic() - t0
    print(f"provisioned in {total:.1f}s ({', '.join(f'{n} {t:.1f}s' for n, t in timer.steps)})")
    for key, q in manifest["qemu"].items():
        print(f"  qemu {key:<4} {q['version_string']}  [{q['binary']}]")
    for suite, k in manifest["kernels"].items():
        print(f"  kernel {suite:<8} {k['version']}  [{k['vmlinuz']}]")
    if args.packages:
        print(f"  packages {' '.join(args.packages)}: {image.files} files from "
              f"{len(image.packages)} packages  [{image.path}]")
    print(f"  manifest {path}")
    return 0
