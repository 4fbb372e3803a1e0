"""virtio-balloon: the device (``device``), guest page numbers and the
pages the balloon holds (``pages``), and its plugin (``plugin``)."""

from .device import BalloonDevice, parse_size
from .pages import PAGE_SIZE
from .plugin import BalloonPlugin, plugin

__all__ = ["PAGE_SIZE", "BalloonDevice", "BalloonPlugin", "parse_size", "plugin"]
