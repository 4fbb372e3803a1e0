"""virtio-balloon: the device (``device``), guest page numbers and the
pages the balloon holds (``pages``), the policies that set its target
(``policy``, the built-in ``auto`` in ``auto``, host memory figures in
``host``), and its plugin (``plugin``)."""

from .device import BalloonDevice
from .pages import PAGE_SIZE, parse_size
from .plugin import BalloonPlugin, plugin

__all__ = ["PAGE_SIZE", "BalloonDevice", "BalloonPlugin", "parse_size", "plugin"]
