"""The provisioning cache and its ``manifest.json``: the one owner of both.

Provisioning (:mod:`vuser.testing.provision`) fills a cache directory with
QEMU builds, guest kernels and initramfs images and describes them in
``manifest.json``; the guest tooling (:mod:`vuser.testing.guest`) finds
them through it.  Both sides go through this module, so the location, the
format number and the top-level layout are written down once::

    {"format": 1, "cache": "<dir>",
     "qemu": {"7.2": {"binary", "version", "version_string", "package_version"}, "11": {...}},
     "qemu_aliases": {"bookworm": "7.2", "sid": "11"},
     "kernels": {"bookworm": {"version", "vmlinuz", "initramfs", ...}, "sid": {...}}}

The cache is ``$VUSER_CACHE`` or ``~/.cache/vuser``.  Standard library only:
provisioning runs before vuser's dependencies are installed.

Error handling: a missing or stale cache raises :class:`NotProvisionedError`
saying how to fill it; nothing here skips a test or downloads anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from vuser.testing.errors import NotProvisionedError

__all__ = [
    "MANIFEST_FORMAT",
    "NotProvisionedError",
    "cache_dir",
    "kernel_info",
    "manifest",
    "manifest_path",
    "provisioned",
    "qemu_info",
    "write_manifest",
]

# Bump when a reader could misread what an older provisioning wrote.
MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
HOW_TO_PROVISION = "run `vuser provision` (scripts/provision in a source checkout)"


def cache_dir() -> Path:
    """Where provisioning keeps QEMU, kernels and the manifest."""
    env = os.environ.get("VUSER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vuser"


def manifest_path(cache: Path | None = None) -> Path:
    return (cache_dir() if cache is None else cache) / MANIFEST_NAME


def manifest() -> dict[str, Any]:
    """The provision manifest; raises :class:`NotProvisionedError` if absent."""
    path = manifest_path()
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotProvisionedError(
            f"no provision manifest at {path}: {HOW_TO_PROVISION} "
            "(it installs QEMU 7.2 and sid's QEMU, the guest kernels and initramfs)") from None
    except (OSError, ValueError) as exc:
        raise NotProvisionedError(f"unreadable manifest {path} ({exc}): {HOW_TO_PROVISION}") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise NotProvisionedError(f"manifest {path} has format {data.get('format')!r}, "
                                  f"expected {MANIFEST_FORMAT}: {HOW_TO_PROVISION}")
    return data


def write_manifest(cache: Path, *, qemu: Mapping[str, Mapping[str, Any]],
                   qemu_aliases: Mapping[str, str],
                   kernels: Mapping[str, Mapping[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Write ``<cache>/manifest.json`` (atomically: a reader sees the old or
    the new one, never half); returns its path and contents."""
    data: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "cache": str(cache),
        "qemu": {key: dict(entry) for key, entry in qemu.items()},
        "qemu_aliases": dict(qemu_aliases),
        "kernels": {key: dict(entry) for key, entry in kernels.items()},
    }
    path = manifest_path(cache)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(path)
    return path, data


def qemu_info(key: str) -> dict[str, Any]:
    """Manifest entry of a QEMU ("7.2", "11", or the alias "bookworm" / "sid")."""
    data = manifest()
    key = data.get("qemu_aliases", {}).get(key, key)
    try:
        info = dict(data["qemu"][key])
    except KeyError:
        raise NotProvisionedError(f"no QEMU {key!r} in {manifest_path()} (have "
                                  f"{sorted(data['qemu'])}): {HOW_TO_PROVISION}") from None
    if not os.access(info["binary"], os.X_OK):
        raise NotProvisionedError(f"QEMU {key} binary {info['binary']} is missing: "
                                  f"{HOW_TO_PROVISION}")
    info["key"] = key
    return info


def kernel_info(key: str) -> dict[str, Any]:
    """Manifest entry of a guest kernel ("bookworm" or "sid")."""
    data = manifest()
    try:
        info = dict(data["kernels"][key])
    except KeyError:
        raise NotProvisionedError(f"no kernel {key!r} in {manifest_path()} (have "
                                  f"{sorted(data['kernels'])}): {HOW_TO_PROVISION}") from None
    for field in ("vmlinuz", "initramfs"):
        if not Path(info[field]).is_file():
            raise NotProvisionedError(f"kernel {key} {field} {info[field]} is missing: "
                                      f"{HOW_TO_PROVISION}")
    info["key"] = key
    return info


def provisioned() -> bool:
    """True if the manifest exists and every binary and image it names is there."""
    try:
        data = manifest()
        for key in data["qemu"]:
            qemu_info(key)
        for key in data["kernels"]:
            kernel_info(key)
    except (NotProvisionedError, KeyError):
        return False
    return True
