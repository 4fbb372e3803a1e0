"""Net switches shared by test guests: the guests that name one switch get
ports of one ``vuser run net`` (one socket each), addresses in one /24, and
optionally a host tap port.

Addresses: switch ``k`` of a test owns ``10.<200+k>.<pid % 250>.0/24``
(the pid keeps parallel test processes' taps apart on the host); the host's
tap is ``.1``, the guest on port ``p`` is ``.<p + 2>``.  The guest's
interface is the one whose MAC is its port's (``vuser qemu-args`` gives each
port's guest a MAC derived from the socket path).

Resource handling: the switch starts when the first guest that names it
boots, and stops with the test (:meth:`Switch.stop`); a port is a guest's
from its boot to its end.  Error handling: a full switch, or a guest asking
for other switch options than the switch was started with, raises
ValueError before anything boots.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import trio

from vuser.devices.net.plugin import port_mac
from vuser.testing.options import DEFAULT_SERVE
from vuser.testing.served import ServedDevice, served_device

__all__ = ["DEFAULT_PORTS", "MAX_SWITCHES", "Switch"]

DEFAULT_PORTS = 4
MAX_SWITCHES = 50   # second octets 200..249


def tap_name(index: int) -> str:
    """A host interface name (at most 15 characters) unique per test
    process and switch."""
    return f"vut{os.getpid() % 100000}s{index}"[:15]


class Switch:
    """One ``vuser run net`` whose ports guests take (``spec``: its
    ``vuser run`` arguments, ``"net"`` plus options)."""

    def __init__(self, name: str, index: int, workdir: Path, *, ports: int = DEFAULT_PORTS,
                 tap: bool = False, spec: str = "net", serve: str = DEFAULT_SERVE) -> None:
        if not 0 <= index < MAX_SWITCHES:
            raise ValueError(f"at most {MAX_SWITCHES} switches per test")
        if ports < 1:
            raise ValueError(f"switch {name}: ports={ports}, needs at least 1")
        self.name = name
        self.index = index
        self.argv = shlex.split(spec)
        if not self.argv or self.argv[0] != "net":
            raise ValueError(f"switch {name}: spec {spec!r} must start with 'net'")
        self.serve = serve
        self.dir = workdir / f"switch-{name}"
        self.sockets = [self.dir / f"port{p}.sock" for p in range(ports)]
        self.subnet = f"10.{200 + index}.{os.getpid() % 250}"
        self.tap = tap_name(index) if tap else None
        self.owners: list[str | None] = [None] * ports
        self.device: ServedDevice | None = None
        self._lock = trio.Lock()

    @property
    def spec(self) -> str:
        return shlex.join(self.argv)

    @property
    def host_address(self) -> str | None:
        """The host's address on the tap port (None without one)."""
        return f"{self.subnet}.1" if self.tap else None

    def address(self, port: int) -> str:
        return f"{self.subnet}.{port + 2}"

    def mac(self, port: int) -> str:
        mac: bytes = port_mac(str(self.sockets[port]))
        return mac.hex(":")

    def agrees(self, argv: list[str]) -> None:
        """A guest's net device may be plain ``net`` or exactly the switch's."""
        if argv != ["net"] and argv != self.argv:
            raise ValueError(f"switch {self.name} runs {self.spec!r}; a guest asked for "
                             f"{shlex.join(argv)!r} (say 'net', or declare the switch's options once)")

    def take(self, guest: str) -> int:
        for port, owner in enumerate(self.owners):
            if owner is None:
                self.owners[port] = guest
                return port
        raise ValueError(f"switch {self.name} has no free port ({len(self.owners)} ports, all taken "
                         f"by {', '.join(o or '' for o in self.owners)}): declare it with more ports")

    def release(self, guest: str) -> None:
        self.owners = [None if o == guest else o for o in self.owners]

    async def start(self, nursery: trio.Nursery, in_process_log: Path) -> ServedDevice:
        """Start the switch unless it runs; its device."""
        async with self._lock:
            if self.device is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                argv = [*self.argv, *(["--tap", self.tap] if self.tap else [])]
                log = in_process_log if self.serve == "in-process" else self.dir / "vuser.log"
                device = served_device(self.serve, f"switch {self.name}", argv, self.sockets,
                                       self.dir / "ctl", log)
                await device.start(nursery)
                self.device = device
                await self.address_host()
            return self.device

    async def address_host(self) -> None:
        """Give the host's side of the tap its address, and bring it up
        (again after a restarted ``vuser run net`` made a new tap)."""
        if self.tap:
            await _host_address(self.tap, f"{self.host_address}/24")

    async def stop(self) -> None:
        if self.device is not None:
            device, self.device = self.device, None
            await device.stop()


async def _host_address(tap: str, address: str) -> None:
    """The host's side of the tap vuser made: an address, and up."""
    for args in (["addr", "add", address, "dev", tap], ["link", "set", tap, "up"]):
        proc = await trio.run_process(["ip", *args], capture_stdout=True, capture_stderr=True,
                                      check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ip {shlex.join(args)} failed: {proc.stderr.decode().strip()}")
