"""Device discovery through the ``vuser.devices`` entry-point group, so a
third-party package adds devices exactly the way vuser's own do.  An entry
point names a ``vuser.plugin.DevicePlugin`` (or, for a device with nothing
special, its ``Device`` class, which gets a plain plugin).  ``discover``
and ``load_object`` serve the other entry-point groups too
(``vuser.balloon_policies``)."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any, Mapping

from .device import Device
from .plugin import DevicePlugin

log = logging.getLogger(__name__)

GROUP = "vuser.devices"
# Used only when vuser runs from a tree that was never installed (no
# entry-point metadata); an installed vuser registers these in pyproject.toml.
_BUILTIN = {
    "rng": "vuser.devices.rng:plugin",
    "balloon": "vuser.devices.balloon:plugin",
    "net": "vuser.devices.net:plugin",
}


class UnknownDevice(LookupError):
    """No device of that name is registered."""


def discover(group: str, builtin: Mapping[str, str]) -> dict[str, str]:
    """Name -> "module:object" for an entry-point group: ``builtin`` (what
    vuser itself registers, for a tree that was never installed), then every
    installed entry point of ``group`` (which wins on a name clash)."""
    found = dict(builtin)
    for ep in entry_points(group=group):
        found[ep.name] = ep.value
    return found


def load_object(target: str) -> Any:
    """The object an entry-point value names: "module:attr" or
    "module:attr.attr" (raises ImportError or AttributeError)."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module.strip())
    for part in filter(None, attr.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def _load(target: str) -> DevicePlugin[Any]:
    obj = load_object(target)
    if isinstance(obj, DevicePlugin):
        return obj
    if isinstance(obj, type) and issubclass(obj, Device):
        return DevicePlugin(obj)
    raise TypeError(f"{target} is neither a vuser DevicePlugin nor a Device class")


def available() -> dict[str, str]:
    """Device name -> "module:object"."""
    return discover(GROUP, _BUILTIN)


def load(name: str) -> DevicePlugin[Any]:
    targets = available()
    if name not in targets:
        raise UnknownDevice(f"unknown device {name!r} (available: {', '.join(sorted(targets))})")
    return _load(targets[name])


def load_all() -> dict[str, DevicePlugin[Any]]:
    out = {}
    for name, target in sorted(available().items()):
        try:
            out[name] = _load(target)
        except Exception as exc:  # a broken third-party plugin must not hide the others
            log.warning("cannot load device %s (%s): %s", name, target, exc)
    return out


def plugin_for(device: Device) -> DevicePlugin[Any]:
    """The registered plugin of ``device``'s type (a plain one if its type
    is not registered, e.g. a test's subclass)."""
    try:
        plugin = load(device.name)
    except (UnknownDevice, ImportError, TypeError):
        return DevicePlugin(type(device))
    if isinstance(device, plugin.device):
        return plugin
    return DevicePlugin(type(device))
