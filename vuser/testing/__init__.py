"""Test machinery for vuser: real-guest test sessions (lab.py: guests with
devices, files, packages and switches, behind the ``vuser_guest`` pytest
fixture of pytest_plugin.py), real Linux guests under QEMU (guest.py),
``vuser run`` as a child process (process.py), one poller (poll.py), the
provisioning cache (manifest.py) and provisioning itself (provision/).

Importing this package needs neither QEMU nor a provisioned cache; booting a
guest does (run scripts/provision).  The names below are loaded on first
use: provisioning imports this package before vuser's dependencies (trio)
are installed, so importing it must not pull them in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vuser.testing.errors import DeviceExited
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
    from vuser.testing.lab import Lab, VuserGuest, open_lab
    from vuser.testing.poll import PollTimeout, wait_until
    from vuser.testing.process import VuserProcess, VuserProcessError
    from vuser.testing.served import DeviceSpec, ServedDevice
    from vuser.testing.switches import Switch

# name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("CommandResult", "Guest", "boot_guest"), "vuser.testing.guest"),
    **dict.fromkeys(("DeviceExited", "GuestCommandError", "GuestError", "GuestExited", "GuestTimeout",
                     "NotProvisionedError"), "vuser.testing.errors"),
    **dict.fromkeys(("Lab", "VuserGuest", "open_lab"), "vuser.testing.lab"),
    **dict.fromkeys(("DeviceSpec", "ServedDevice"), "vuser.testing.served"),
    "Switch": "vuser.testing.switches",
    **dict.fromkeys(("cache_dir", "kernel_info", "manifest", "manifest_path", "provisioned",
                     "qemu_info"), "vuser.testing.manifest"),
    **dict.fromkeys(("qemu_command", "qemu_rss"), "vuser.testing.qemu"),
    **dict.fromkeys(("PollTimeout", "wait_until"), "vuser.testing.poll"),
    **dict.fromkeys(("VuserProcess", "VuserProcessError"), "vuser.testing.process"),
}

__all__ = [
    "CommandResult",
    "DeviceExited",
    "DeviceSpec",
    "Guest",
    "GuestCommandError",
    "GuestError",
    "GuestExited",
    "GuestTimeout",
    "Lab",
    "NotProvisionedError",
    "PollTimeout",
    "ServedDevice",
    "Switch",
    "VuserGuest",
    "VuserProcess",
    "VuserProcessError",
    "boot_guest",
    "cache_dir",
    "kernel_info",
    "manifest",
    "manifest_path",
    "open_lab",
    "provisioned",
    "qemu_command",
    "qemu_info",
    "qemu_rss",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    # PEP 562: import the defining module on first access of one of its names.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
