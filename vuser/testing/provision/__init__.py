"""Provisioning of the real-guest tests: QEMU 7.2 and sid's QEMU, guest
kernels, busybox initramfs images, and the cache manifest describing them.

``main`` is ``scripts/provision`` (and ``python3 -m vuser.testing.provision``);
the steps live in one module each: ``apt`` (host packages, the Debian mirror,
a private apt), ``qemu``, ``kernels``, ``initramfs``; ``common`` has what
they share.  The manifest itself is :mod:`vuser.testing.manifest`'s.

Standard library only, all of it: provisioning runs on a fresh machine
before vuser and its dependencies are installed.
"""

from vuser.testing.provision.cli import main

__all__ = ["main"]
