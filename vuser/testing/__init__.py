"""Test machinery for vuser: real Linux guests under QEMU (see guest.py).

Importing this package needs neither QEMU nor a provisioned cache; booting a
guest does (run scripts/provision).
"""

from vuser.testing.guest import (
    CommandResult,
    Guest,
    GuestCommandError,
    GuestError,
    GuestExited,
    GuestTimeout,
    NotProvisionedError,
    boot_guest,
    cache_dir,
    kernel_info,
    manifest,
    manifest_path,
    provisioned,
    qemu_command,
    qemu_info,
    qemu_rss,
)

__all__ = [
    "CommandResult",
    "Guest",
    "GuestCommandError",
    "GuestError",
    "GuestExited",
    "GuestTimeout",
    "NotProvisionedError",
    "boot_guest",
    "cache_dir",
    "kernel_info",
    "manifest",
    "manifest_path",
    "provisioned",
    "qemu_command",
    "qemu_info",
    "qemu_rss",
]
