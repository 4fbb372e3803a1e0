"""Debian packages: the host's own (installed if missing), the Debian mirror
the host already uses, and apt with a private state directory for fetching
from another suite (sid) without touching the host's package state.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vuser.testing.provision.common import ProvisionError, log, run

__all__ = ["Apt", "HOST_PACKAGES", "HostApt", "PrivateApt", "apt_get_update", "candidate",
           "discover_mirror", "first_depends", "host_codename", "install_host_packages",
           "upstream_version"]

# dpdk-dev carries dpdk-testpmd (the DPDK tests' vhost-user peer); iproute2
# is for the demo's and tests' host-side networking; qemu-system-common
# (a dependency of qemu-system-x86, named for what the probe's tests run
# from it) carries qemu-storage-daemon and virtiofsd; libvirt-daemon (with
# its QEMU driver) and libvirt-clients (virsh) are for the libvirt test,
# which starts its own session daemon.
HOST_PACKAGES = ["qemu-system-x86", "qemu-system-common", "busybox-static", "cpio", "xz-utils", "zstd",
                 "dpdk-dev", "iproute2", "libvirt-daemon", "libvirt-clients"]
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


# --------------------------------------------------------------------------
# host packages

def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


def missing_host_packages() -> list[str]:
    # One dpkg-query for all of them (it prints what it knows, complains
    # about the rest on stderr and exits 1: both are fine here).
    proc = run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *HOST_PACKAGES], check=False)
    installed = {line.split()[0].split(":")[0] for line in proc.stdout.splitlines()
                 if line.endswith("install ok installed")}
    return [pkg for pkg in HOST_PACKAGES if pkg not in installed]


def apt_get_update() -> None:
    """``apt-get update`` of the host's lists (root, or passwordless sudo)."""
    run(_sudo() + ["apt-get", "update"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def install_host_packages() -> None:
    missing = missing_host_packages()
    if not missing:
        log("    host packages present: " + " ".join(HOST_PACKAGES))
        return
    log("    installing: " + " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = _sudo() + ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    proc = run(cmd, check=False, env=env)
    if proc.returncode != 0:
        log("    apt-get install failed, running apt-get update first")
        apt_get_update()
        run(cmd, env=env)


# --------------------------------------------------------------------------
# Debian mirror discovery (from the host's apt sources)

@dataclass(frozen=True)
class SourceEntry:
    """One 'deb' line or deb822 stanza of the host's apt sources."""

    uris: list[str]
    suites: list[str]
    components: list[str]
    signed_by: str | None


def _one_line_entries(path: Path) -> list[SourceEntry]:
    entries = []
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        options: dict[str, str] = {}
        m = re.match(r"deb\s+\[([^\]]*)\]\s+(.*)", line)
        rest = line[4:].strip()
        if m:
            for opt in m.group(1).split():
                if "=" in opt:
                    k, v = opt.split("=", 1)
                    options[k.lower()] = v
            rest = m.group(2)
        parts = rest.split()
        if len(parts) >= 3:
            entries.append(SourceEntry([parts[0]], [parts[1]], parts[2:], options.get("signed-by")))
    return entries


def _deb822_entries(path: Path) -> list[SourceEntry]:
    entries = []
    for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += "\n" + raw.strip()
                continue
            if ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        signed = fields.get("signed-by")
        if signed and "\n" in signed:   # inline key block: not reusable
            signed = None
        entries.append(SourceEntry(fields.get("uris", "").split(), fields.get("suites", "").split(),
                                   fields.get("components", "").split(), signed))
    return entries


def _sources_entries() -> list[SourceEntry]:
    """Every 'deb' entry of the host's apt sources."""
    etc = Path("/etc/apt")
    entries: list[SourceEntry] = []
    for path in [etc / "sources.list", *sorted(etc.glob("sources.list.d/*.list"))]:
        if path.is_file():
            entries += _one_line_entries(path)
    for path in sorted(etc.glob("sources.list.d/*.sources")):
        entries += _deb822_entries(path)
    return entries


def host_codename() -> str:
    """The host's Debian release ("bookworm"), from /etc/os-release."""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"') or "bookworm"
    except OSError:
        pass
    return "bookworm"


def discover_mirror() -> tuple[str, str | None]:
    """URI (and signed-by keyring) that serves '<codename> main' of Debian."""
    codename = host_codename()
    for entry in _sources_entries():
        if codename in entry.suites and "main" in entry.components:
            for uri in entry.uris:
                if "security" not in uri:
                    return uri.rstrip("/"), entry.signed_by
    raise ProvisionError(
        f"could not find the Debian mirror: no apt source serves '{codename} main' "
        "in /etc/apt/sources.list or /etc/apt/sources.list.d")


# --------------------------------------------------------------------------
# apt front-ends

class Apt(Protocol):
    """What the QEMU and kernel steps need of an apt: queries and downloads."""

    def apt_get(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]: ...

    def apt_cache(self, *args: str) -> subprocess.CompletedProcess[str]: ...


class PrivateApt:
    """apt-get / apt-cache with their own sources, lists, status and archives,
    so nothing of the host's package state is read or changed."""

    def __init__(self, root: Path, uri: str, suite: str, signed_by: str | None) -> None:
        self.root = root
        self.suite = suite
        for d in ("state/lists/partial", "cache/archives/partial", "etc/sources.list.d",
                  "etc/preferences.d", "etc/trusted.gpg.d"):
            (root / d).mkdir(parents=True, exist_ok=True)
        status = root / "state/status"
        if not status.exists():
            status.write_text("")   # empty: resolve the whole closure
        sources = f"deb [signed-by={signed_by or DEBIAN_KEYRING}] {uri} {suite} main\n"
        src = root / "etc/sources.list"
        if not src.exists() or src.read_text() != sources:
            src.write_text(sources)
            shutil.rmtree(root / "state/lists", ignore_errors=True)
            (root / "state/lists/partial").mkdir(parents=True)
        try:
            user = os.environ.get("USER") or pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            user = "root"
        self.opts = [
            f"-oDir::State={root}/state",
            f"-oDir::State::status={status}",
            f"-oDir::Cache={root}/cache",
            f"-oDir::Etc::SourceList={src}",
            f"-oDir::Etc::SourceParts={root}/etc/sources.list.d",
            f"-oDir::Etc::Preferences={root}/etc/preferences",
            f"-oDir::Etc::PreferencesParts={root}/etc/preferences.d",
            "-oAcquire::Check-Valid-Until=false",
            "-oAcquire::Languages=none",
            "-oAPT::Install-Recommends=false",
            f"-oAPT::Sandbox::User={user}",
            "-oDebug::NoLocking=true",
        ]

    def has_lists(self) -> bool:
        return any(p.name.endswith(("Packages", "Packages.lz4", "Packages.gz", "Packages.xz"))
                   for p in (self.root / "state/lists").iterdir())

    def update(self) -> None:
        run(["apt-get", *self.opts, "update"])

    def apt_get(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run(["apt-get", *self.opts, *args], cwd=cwd)

    def apt_cache(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["apt-cache", *self.opts, *args])


class HostApt:
    """The host's own apt, used read-only (apt-get download into a folder)."""

    def apt_get(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run(["apt-get", *args], cwd=cwd)

    def apt_cache(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["apt-cache", *args])


def candidate(apt: Apt, pkg: str) -> str:
    """The version apt would install of ``pkg``."""
    out = apt.apt_cache("policy", pkg).stdout
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise ProvisionError(f"package {pkg} not found")
    return m.group(1)


def first_depends(apt: Apt, pkgs: list[str]) -> dict[str, list[str]]:
    """Each package's Depends and Pre-Depends (of its candidate version),
    the first alternative of each group only, as apt names them (a virtual
    package in angle brackets).  One apt-cache call for all of them."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_group = False
    text = apt.apt_cache("depends", "--no-recommends", "--no-suggests", "--no-conflicts",
                         "--no-breaks", "--no-replaces", "--no-enhances", *pkgs).stdout
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = out.setdefault(line.strip(), [])
            in_group = False
            continue
        m = re.match(r"\s*(\|?)(Pre)?Depends:\s*(\S+)", line)
        if not m or current is None:
            continue
        if not in_group:
            current.append(m.group(3))
        in_group = m.group(1) == "|"
    return out


def upstream_version(debver: str) -> str:
    """'1:11.1.3+ds-1' -> '11.1.3'."""
    v = debver.split(":", 1)[-1]
    return re.split(r"[+~-]", v, maxsplit=1)[0]
