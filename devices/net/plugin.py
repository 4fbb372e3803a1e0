"""``vuser run net``: every ``--socket`` is a port of one switch, with taps,
pcap, reflect/sink and busy-poll; the QEMU side of a port; control commands
(``stats``, ``fdb``)."""

from __future__ import annotations

import argparse
import hashlib
import xml.etree.ElementTree as ET
from typing import Any, Sequence

from vuser.device import DeviceError
from vuser.plugin import (
    LIBVIRT_QEMU_NS,
    SHARED_MEMORY_NOTE,
    BackgroundTask,
    Command,
    CommandError,
    DevicePlugin,
    Param,
    xml_text,
)

from .device import DEFAULT_QUEUE_PAIRS, NetDevice
from .impair import ImpairError, parse_spec
from .switch import HOLD_DOWN_MS, LEARN_LIMIT, NetSwitch, SwitchPort


def port_mac(name: str) -> bytes:
    """The MAC of a port's guest: locally administered, derived from the
    socket path, so guests on one switch never share QEMU's default MAC."""
    return bytes.fromhex("525400") + hashlib.sha1(name.encode()).digest()[:3]


def _stats(devices: Sequence[NetDevice]) -> dict[str, Any]:
    return devices[0].switch.stats()


def _fdb(devices: Sequence[NetDevice]) -> list[dict[str, Any]]:
    return devices[0].switch.fdb()


def switch_port(switch: NetSwitch, which: str) -> SwitchPort:
    """A port by number (``--socket`` order, 0-based; taps after) or by
    its socket path (or tap name)."""
    if which.isdigit():
        if int(which) < len(switch.ports):
            return switch.ports[int(which)]
    else:
        for port in switch.ports:
            if port.name == which:
                return port
    raise ImpairError(f"no port {which!r} (ports: " +
                      ", ".join(f"{p.index} {p.name}" for p in switch.ports) + ")")


def _impair(devices: Sequence[NetDevice], which: str, tokens: list[str]) -> dict[str, Any]:
    switch = devices[0].switch
    try:
        port = switch_port(switch, which)
        spec = None if tokens == ["clear"] else parse_spec(tokens)
    except ImpairError as exc:
        raise CommandError(f"impair: {exc}") from None
    switch.impair(port, spec)
    return {"port": port.index, "name": port.name, "impair": None if spec is None else spec.describe()}


def impair_option(text: str) -> tuple[str, list[str]]:
    """``--impair PORT:SPEC``: the port, and the spec's tokens (spaces or
    further ``--impair`` for the same port separate them)."""
    which, sep, spec = text.partition(":")
    if not sep or not spec.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: PORT:SPEC, e.g. 1:loss=5% or '1:delay=100ms jitter=10ms'")
    return which, spec.split()


class NetPlugin(DevicePlugin[NetDevice]):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--queue-pairs", type=int, default=DEFAULT_QUEUE_PAIRS, metavar="N",
                            help=f"queue pairs per socket (default {DEFAULT_QUEUE_PAIRS}; "
                                 "QEMU's queues=N must not exceed it)")
        parser.add_argument("--mtu", type=int, default=1500, help="config mtu (VIRTIO_NET_F_MTU)")
        parser.add_argument("--tap", action="append", default=[], metavar="NAME",
                            help="add host tap interface NAME as a switch port (repeatable; "
                                 "created if needed, brought up, 12-byte vnet header, "
                                 "TUNSETOFFLOAD follows what the guests negotiated)")
        parser.add_argument("--pcap", metavar="FILE", help="write every switched frame to FILE (pcap)")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--reflect", action="store_true",
                          help="send every frame back to its sender, MAC addresses swapped")
        mode.add_argument("--sink", action="store_true", help="drop every frame (and count it)")
        parser.add_argument("--busy-poll", action="store_true",
                            help="also poll every ring from C, spinning while frames come "
                                 "(burns a CPU; for benchmarks)")
        parser.add_argument("--lock-mac", action="store_true",
                            help="each port only forwards frames from the MAC 'vuser qemu-args' gives its "
                                 "guest (drops the rest: a guest cannot take another's traffic)")
        parser.add_argument("--learn-limit", type=int, default=LEARN_LIMIT, metavar="N",
                            help=f"addresses a port may have in the forwarding table (default {LEARN_LIMIT})")
        parser.add_argument("--impair", type=impair_option, action="append", default=[], metavar="PORT:SPEC",
                            help="impair the frames delivered to PORT (0-based in --socket order, or its "
                                 "socket path), e.g. 1:loss=30%% or '1:delay=100ms jitter=10ms'; "
                                 "repeatable (see vuser ctl ... impair)")
        parser.add_argument("--hold-down", type=int, default=HOLD_DOWN_MS, metavar="MS",
                            help="a learned address moves to another port only after this long silent "
                                 f"on its own (default {HOLD_DOWN_MS})")

    def create(self, args: argparse.Namespace, sockets: Sequence[str]) -> list[NetDevice]:
        """One port per socket, all on one switch (with the taps)."""
        mode = "reflect" if args.reflect else "sink" if args.sink else "switch"
        if args.learn_limit < 0 or args.hold_down < 0:
            raise DeviceError("net: --learn-limit and --hold-down take values >= 0")
        switch = NetSwitch(mode=mode, pcap=args.pcap, busy_poll=args.busy_poll, hold_down_ms=args.hold_down,
                           learn_limit=args.learn_limit)
        try:
            devices = [
                NetDevice(switch=switch, queue_pairs=args.queue_pairs, mtu=args.mtu, port_name=str(path),
                          without=args.without, queue_policy=args.queue_policy)
                for path in sockets]
            for dev in devices:
                if args.lock_mac:
                    switch.lock_mac(dev.port, port_mac(dev.port.name))
                dev.port  # noqa: B018 - ports numbered in socket order
            for tap in args.tap:
                switch.add_tap(tap)
            specs: dict[int, list[str]] = {}
            for which, tokens in args.impair:
                specs.setdefault(switch_port(switch, which).index, []).extend(tokens)
            for index, tokens in specs.items():
                switch.impair(switch.ports[index], parse_spec(tokens))
        except ImpairError as exc:
            switch.close()
            raise DeviceError(f"net: --impair: {exc}") from None
        except BaseException:
            switch.close()
            raise
        return devices

    def close(self, devices: Sequence[NetDevice]) -> None:
        if devices:
            devices[0].switch.close()

    def background(self, devices: Sequence[NetDevice]) -> list[BackgroundTask]:
        return [devices[0].switch.run] if devices else []

    def sample(self, devices: Sequence[NetDevice], since: int | None) -> dict[str, Any]:
        """Per-port counters (every counter a port reports, so new ones are
        recorded as they appear) and the switch's own."""
        stats = devices[0].switch.stats()
        return {"ports": stats["ports"], "flooded": stats["flooded"], "segmented": stats["segmented"]}

    def qemu_args(self, device: NetDevice, chardev: str, qemu_version: str) -> list[str]:
        mq = f",queues={device.queue_pairs}" if device.queue_pairs > 1 else ""
        mac = port_mac(device.port.name).hex(":")
        args = f"virtio-net-pci,netdev={chardev}-net,mac={mac}"
        if device.mtu != 1500:
            # QEMU owns the config space: the guest sees an MTU only through
            # host_mtu, which QEMU then sends to us with NET_SET_MTU.
            args += f",host_mtu={device.mtu}"
        if device.queue_pairs > 1:
            args += ",mq=on"
        if _no_msix(qemu_version):
            args += ",vectors=0"
        return ["-netdev", f"vhost-user,id={chardev}-net,chardev={chardev}{mq}", "-device", args]

    def libvirt_xml(self, device: NetDevice, socket_path: str, *, qemu_version: str = "11", chardev: str = "vu0",
                    reconnect: int | None = None, qemu_server: bool = False) -> str:
        """``<interface type='vhostuser'>`` (libvirt's mode is QEMU's side:
        'client' connects to ``vuser run net --socket``, 'server' listens for
        ``vuser run net --client``), with the MAC, queues and MTU
        ``qemu_args`` gives; for QEMU 7.2 also the ``<qemu:override>``
        setting vectors=0 on it."""
        iface = ET.Element("interface", type="vhostuser")
        ET.SubElement(iface, "mac", address=port_mac(device.port.name).hex(":"))
        source = ET.SubElement(iface, "source", type="unix", path=socket_path,
                               mode="server" if qemu_server else "client")
        if reconnect is not None and not qemu_server:
            ET.SubElement(source, "reconnect", enabled="yes", timeout=str(reconnect))
        ET.SubElement(iface, "model", type="virtio")
        if device.queue_pairs > 1:
            ET.SubElement(iface, "driver", queues=str(device.queue_pairs))
        if device.mtu != 1500:
            ET.SubElement(iface, "mtu", size=str(device.mtu))
        alias = f"ua-{chardev}"   # user aliases start with "ua-"
        ET.SubElement(iface, "alias", name=alias)
        if not _no_msix(qemu_version):
            return xml_text(iface, notes=(SHARED_MEMORY_NOTE,))
        q = f"{{{LIBVIRT_QEMU_NS}}}"
        override = ET.Element(q + "override")
        frontend = ET.SubElement(ET.SubElement(override, q + "device", alias=alias), q + "frontend")
        ET.SubElement(frontend, q + "property", name="vectors", type="unsigned", value="0")
        return xml_text(iface, override, notes=(
            SHARED_MEMORY_NOTE, "<!-- QEMU 7.2 under TCG: the <qemu:override> goes in <domain>, the "
                                "<interface> in <devices> -->"))


def _no_msix(qemu_version: str) -> bool:
    """QEMU 7.2's virtio-net-pci on a vhost-user netdev under TCG segfaults
    at DRIVER_OK unless it has no MSI-X vectors (design.md)."""
    return qemu_version.startswith("7")


plugin = NetPlugin(NetDevice, commands=(
    Command("stats", "the switch: per-port counters, drops by reason", _stats),
    Command("fdb", "the MAC addresses the switch learned, by port", _fdb),
    Command("impair", "impair the frames delivered to PORT (netem's loss=, delay=, jitter=, distribution=, "
                      "duplicate=, corrupt=, reorder=, gap=, rate=, limit=, seed=), or 'clear'", _impair,
            (Param("port", help="0-based in --socket order (taps after), or a socket path"),
             Param("spec", help="KEY=VALUE tokens, or clear", variadic=True))),
))
