"""virtio-net: the device (``device``), its C switch (``switch``) and its
plugin (``plugin``: CLI, QEMU arguments, control commands)."""

from .device import NetDevice
from .plugin import NetPlugin, plugin
from .switch import NetSwitch

__all__ = ["NetDevice", "NetPlugin", "NetSwitch", "plugin"]
