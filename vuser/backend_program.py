"""vuser as a vhost-user back-end program (vhost-user.rst, "Backend program
conventions"): the ``--print-capabilities`` JSON, and the JSON descriptors
(vhost-user.json, ``VhostUserBackend``) through which QEMU and libvirt
discover back-end programs.

Each device type is a program of its own, ``vuser-DEVICE`` (a console
script: ``vuser run DEVICE`` taking ``--socket-path``, ``--fd`` and
``--print-capabilities``), since a descriptor names one binary that is run
with those options alone.  The descriptor's ``binary`` is an absolute path,
known only where the package is installed, so the package carries a
template (``vuser/share/vhost-user/50-vuser-DEVICE.json.in``, package data,
as QEMU carries ``50-qemu-gpu.json.in``) and ``vuser descriptors --install
DIR`` writes ``50-vuser-DEVICE.json`` for every device type whose program is
installed, naming it.  DIR is one of the directories vhost-user.json lists:
``/usr/share/qemu/vhost-user`` (distribution packages),
``/etc/qemu/vhost-user`` (the administrator's), or
``$XDG_CONFIG_HOME/qemu/vhost-user`` (a user's).
"""

from __future__ import annotations

import json
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Any

from vuser import registry
from vuser.plugin import DevicePlugin

PROGRAM_PREFIX = "vuser-"
TEMPLATE = "50-vuser-DEVICE.json.in"


def capabilities(plugin: DevicePlugin[Any]) -> dict[str, Any]:
    """``--print-capabilities``: ``VHostUserBackendCapabilities`` (the type;
    the schema defines no other members for vuser's types)."""
    return {"type": plugin.backend_type}


def program(device: str) -> str:
    return PROGRAM_PREFIX + device


def device_of(program_name: str) -> str | None:
    """The device a ``vuser-DEVICE`` program serves (None: not one)."""
    name = Path(program_name).name
    return name[len(PROGRAM_PREFIX):] if name.startswith(PROGRAM_PREFIX) else None


def scripts_dir() -> Path:
    """Where this installation's console scripts are (a venv's bin/)."""
    return Path(sysconfig.get_path("scripts"))


def descriptor(plugin: DevicePlugin[Any], bindir: Path) -> dict[str, Any]:
    text = resources.files("vuser").joinpath("share", "vhost-user", TEMPLATE).read_text()
    values = {"@DESCRIPTION@": f"vuser {plugin.name}: {plugin.description}", "@TYPE@": plugin.backend_type,
              "@BINARY@": str(bindir.resolve() / program(plugin.name)), "@DEVICE@": plugin.name}
    for key, value in values.items():
        text = text.replace(key, json.dumps(value)[1:-1])
    out: dict[str, Any] = json.loads(text)
    return out


def descriptors(bindir: Path | None = None) -> dict[str, dict[str, Any]]:
    """File name -> descriptor, for every device type whose program is in
    ``bindir`` (default: this installation's scripts)."""
    bindir = scripts_dir() if bindir is None else bindir
    return {f"50-vuser-{name}.json": descriptor(plugin, bindir)
            for name, plugin in registry.load_all().items() if (bindir / program(name)).is_file()}


def install(dest: Path, bindir: Path | None = None) -> list[Path]:
    """Write the descriptors into ``dest`` (created if needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in descriptors(bindir).items():
        path = dest / name
        path.write_text(json.dumps(content, indent=2) + "\n")
        written.append(path)
    return written


__all__ = ["capabilities", "descriptor", "descriptors", "device_of", "install", "program", "scripts_dir"]
