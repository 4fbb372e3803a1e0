"""Device discovery through the ``vuser.devices`` entry-point group, so a
third-party package adds devices exactly the way vuser's own do."""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from .device import Device

log = logging.getLogger(__name__)

GROUP = "vuser.devices"
# Used only when vuser runs from a tree that was never installed (no
# entry-point metadata); an installed vuser registers these in pyproject.toml.
_BUILTIN = {
    "rng": "vuser.devices.rng:RngDevice",
    "balloon": "vuser.devices.balloon:BalloonDevice",
    "net": "vuser.devices.net:NetDevice",
}


def _load(target: str) -> type[Device]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise TypeError(f"{target} is not a vuser Device class")
    return cls


def available() -> dict[str, str]:
    """Device name -> "module:Class"."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def load(name: str) -> type[Device]:
    targets = available()
    if name not in targets:
        raise KeyError(f"unknown device {name!r}; available: {', '.join(sorted(targets))}")
    return _load(targets[name])


def load_all() -> dict[str, type[Device]]:
    out = {}
    for name, target in sorted(available().items()):
        try:
            out[name] = _load(target)
        except Exception as exc:  # a broken third-party plugin must not hide the others
            log.warning("cannot load device %s (%s): %s", name, target, exc)
    return out
