"""virtio-net (virtio spec 5.1): the rx/tx data path of a vhost-user netdev.

QEMU keeps the virtio-net device model and its control queue; the back-end
owns the data queues: receiveq 2k and transmitq 2k+1 for each queue pair k
(``-netdev vhost-user,chardev=…,queues=N`` with ``-device
virtio-net-pci,netdev=…,mq=on``).  Every socket served is one port of a
learning L2 switch in C (``vuser.netswitch``, ``native/net.c``): two guests
on two sockets talk to each other, a tap adds the host, ``--reflect`` and
``--sink`` serve benchmarks, ``--pcap`` records every frame.

No per-packet Python: a kick on a transmit queue is one call into C that
moves every frame it finds there to the destination ports' receive rings
(or tap), publishes used rings once and signals the guests that asked.

Header size (seed 003, design.md semantics 5): 12 bytes with VERSION_1 or
MRG_RXBUF, 10 for a legacy driver without MRG_RXBUF.  The back-end learns
which only from SET_FEATURES, so the size follows the session's features
at every call.

Offloads: partial checksums (CSUM / GUEST_CSUM) and TCP segmentation over
IPv4 and IPv6 (HOST_TSO4/6 / GUEST_TSO4/6).  A frame goes to each port as
is when that port negotiated the matching GUEST_* feature (a tap always
takes them), else C completes the checksum or cuts the GSO frame into
segments in software.  UDP fragmentation/segmentation and ECN are not
offered.  A header asking for an offload its port did not negotiate is
dropped and counted.  The features QEMU handles itself (CTRL_VQ and its
companions, MAC) are never seen here; STATUS is offered so the config's
link status exists.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from typing import Any, Iterable

from vuser.connection import DeviceContext, QueueHandle
from vuser.device import (
    TRANSPORT_FEATURES,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_IN_ORDER,
    ConfigField,
    Device,
    DeviceError,
    Feature,
)
from vuser.netswitch import (
    FRAME_MAX,
    MAX_QUEUE_PAIRS,
    OFF_CSUM,
    OFF_TSO4,
    OFF_TSO6,
    PORT_NONE,
    PORT_VHOST,
    RING_ERROR_DROP,
    NetSwitch,
    SwitchPort,
    rarp_frame,
)
from vuser.protocol import Refusal
from vuser.virtqueue import RingError
from vuser.wire import ProtocolFeature as PF

try:
    from vuser._native import ffi
except ImportError:  # pragma: no cover
    ffi = None

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
DEFAULT_QUEUE_PAIRS = 4
MIN_MTU, MAX_MTU = 68, 65535
ETH_OVERHEAD = 18  # Ethernet header + one VLAN tag
# Frames moved per kick before the connection re-checks the ring (and lets
# other tasks run): bounds the latency one busy queue adds to the others.
TX_BUDGET = 4096

VIRTIO_NET_S_LINK_UP = 1
F_CSUM, F_GUEST_CSUM, F_MTU = 0, 1, 3
F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6 = 7, 8, 11, 12
F_MRG_RXBUF = 15
F_VERSION_1 = 32


def _offloads(features: int, csum: int, tso4: int, tso6: int) -> int:
    """vu_net_port offload bits from one direction's feature bits (TSO
    needs the checksum feature, virtio spec 5.1.3.1)."""
    if not features & (1 << csum):
        return 0
    out = OFF_CSUM
    if features & (1 << tso4):
        out |= OFF_TSO4
    if features & (1 << tso6):
        out |= OFF_TSO6
    return out


def _mq_queues(pairs: int) -> tuple[str, ...]:
    return tuple(q for k in range(1, pairs) for q in (f"rx{k}", f"tx{k}"))


def _features(pairs: int) -> tuple[Feature, ...]:
    # Order is the order queues are numbered in (design.md semantics 2):
    # only MQ brings queues, rx1/tx1... after rx0/tx0; the control queue is
    # QEMU's and is never declared.  Append new features at the end.
    return (
        Feature(0, "VIRTIO_NET_F_CSUM", doc="the driver may send partial checksums"),
        Feature(1, "VIRTIO_NET_F_GUEST_CSUM", doc="the driver takes partial checksums"),
        Feature(3, "VIRTIO_NET_F_MTU", doc="config mtu; NET_SET_MTU"),
        Feature(7, "VIRTIO_NET_F_GUEST_TSO4", doc="the driver takes TCP/IPv4 GSO frames"),
        Feature(8, "VIRTIO_NET_F_GUEST_TSO6", doc="the driver takes TCP/IPv6 GSO frames"),
        Feature(11, "VIRTIO_NET_F_HOST_TSO4", doc="the driver may send TCP/IPv4 GSO frames"),
        Feature(12, "VIRTIO_NET_F_HOST_TSO6", doc="the driver may send TCP/IPv6 GSO frames"),
        Feature(15, "VIRTIO_NET_F_MRG_RXBUF", doc="frames over several receive buffers"),
        Feature(16, "VIRTIO_NET_F_STATUS", doc="config status (link up)"),
        Feature(21, "VIRTIO_NET_F_GUEST_ANNOUNCE", doc="the guest announces itself after migration"),
        Feature(22, "VIRTIO_NET_F_MQ", queues=_mq_queues(pairs), doc="more than one queue pair"),
    )


class NetDevice(Device):
    """One switch port per instance (one per socket); see the module doc."""

    name = "net"
    virtio_id = VIRTIO_ID_NET
    description = "virtio-net data path: ports of a learning L2 switch (tap, pcap, reflect, sink)"
    base_queues = ("rx0", "tx0")
    features = _features(DEFAULT_QUEUE_PAIRS)
    # IN_ORDER (virtio spec 2.7.9): every ring here is used in the order it
    # was made available -- tx chains are completed in pop order, rx chains
    # published in pop order, and only unpublished tail chains are ever
    # rewound -- so the driver may take its in-order fast paths.
    transport_features = (*TRANSPORT_FEATURES, VIRTIO_F_ANY_LAYOUT, VIRTIO_F_IN_ORDER)
    config_fields = (
        ConfigField("status", 6, 2, "STATUS"),
        ConfigField("max_virtqueue_pairs", 8, 2, "MQ"),
        ConfigField("mtu", 10, 2, "MTU"),
    )
    # SEND_RARP and NET_SET_MTU come to request(); MQ is always offered.
    protocol_features = (1 << PF.RARP) | (1 << PF.MTU)
    # QEMU drives a multiqueue vhost-user netdev as one vhost_dev per queue
    # pair over the one socket, each keeping its own shadow memory table:
    # with CONFIGURE_MEM_SLOTS the second pair ADD_MEM_REGs the regions the
    # first one added (measured, QEMU 7.2, queues=2).  With whole
    # SET_MEM_TABLEs each start just replaces the table.  DPDK's vhost
    # library does not offer it either.
    # CONFIG: QEMU's virtio-net owns the config space (mac, status, mtu come
    # from its own properties) and warns when a vhost-user net back-end
    # offers CONFIG; the fields above stay for front-ends that read them
    # anyway (GET_CONFIG is answered regardless).
    excluded_protocol_features = (1 << PF.CONFIGURE_MEM_SLOTS) | (1 << PF.CONFIG)

    def __init__(self, *, switch: NetSwitch | None = None, queue_pairs: int = DEFAULT_QUEUE_PAIRS,
                 mtu: int = 1500, port_name: str | None = None, **kw: Any) -> None:
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise DeviceError(f"net: queue pairs must be 1..{MAX_QUEUE_PAIRS}, not {queue_pairs}")
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DeviceError(f"net: mtu must be {MIN_MTU}..{MAX_MTU}, not {mtu}")
        # The number of queue pairs is an option, so MQ's queues are per
        # instance; Device reads self.features, which this shadows.
        self.features = _features(queue_pairs)  # type: ignore[misc]
        super().__init__(**kw)
        self.queue_pairs = queue_pairs if self.is_offered("MQ") else 1
        # GET_QUEUE_NUM: QEMU's vhost-user netdev compares it with queues=N,
        # a number of queue pairs (net/vhost-user.c, vhost_user_start).
        self.vhost_queue_num = self.queue_pairs
        self.mtu = mtu
        self._switch = switch
        self._port_name = port_name
        self._port: SwitchPort | None = None
        self._conn: DeviceContext | None = None  # the connection of this port

    # ----------------------------------------------------------- the port

    @property
    def switch(self) -> NetSwitch:
        if self._switch is None:
            self._switch = NetSwitch()
        return self._switch

    @property
    def port(self) -> SwitchPort:
        if self._port is None:
            name = self._port_name or f"vhost{len(self.switch.ports)}"
            self._port = self.switch.add_vhost_port(name, self)
        return self._port

    def refresh(self, cport: Any) -> None:
        """PortBinding: write this port's current rings into C (see
        vuser.netswitch).  Runs before every call into the switch."""
        conn = self._conn
        if conn is None:
            cport.kind = PORT_NONE
            cport.nqp = 0
            return
        features = conn.effective_features
        cport.kind = PORT_VHOST
        cport.hdr_len = 12 if features & ((1 << F_VERSION_1) | (1 << F_MRG_RXBUF)) else 10
        cport.mrg_rxbuf = 1 if features & (1 << F_MRG_RXBUF) else 0
        # A driver that accepted MTU keeps to the config's mtu; without it
        # Linux allows any MTU up to 64 KiB.
        cport.max_frame = self.mtu + ETH_OVERHEAD if features & (1 << F_MTU) else FRAME_MAX
        cport.tx_offloads = _offloads(features, F_CSUM, F_HOST_TSO4, F_HOST_TSO6)
        cport.rx_offloads = _offloads(features, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6)
        cport.mem = conn.memory.native
        usable = conn.device_broken is None
        slots = conn.slots
        null = ffi.NULL
        for qp in range(self.queue_pairs):
            rx, tx = slots[2 * qp], slots[2 * qp + 1]
            cport.rx[qp] = rx.vq.ring if usable and rx.vq is not None and rx.enabled else null
            cport.tx[qp] = tx.vq.ring if usable and tx.vq is not None and tx.enabled else null
            cport.rx_call[qp] = -1 if rx.call.fd is None else rx.call.fd
            cport.tx_call[qp] = -1 if tx.call.fd is None else tx.call.fd
        cport.nqp = self.queue_pairs

    def after(self, cport: Any, result: int) -> None:
        """PortBinding: report rings the guest broke (seen by C)."""
        conn = self._conn
        if conn is None:
            return
        port = self.port
        seen = int(cport.stats.drops[RING_ERROR_DROP])
        if seen == port.ring_errors_seen and result >= 0:
            return
        port.ring_errors_seen = seen
        for slot in conn.slots:
            vq = slot.vq
            if vq is None or vq.error is not None:
                continue
            ring = vq.ring
            if ring.num and ring.broken:
                vq.error = RingError(int(ring.error))
                conn.ring_fault(slot, vq.error)

    # ----------------------------------------------------------- device hooks

    def attach(self, context: DeviceContext) -> None:
        super().attach(context)
        # The binding reads the connection's queue slots (rings, enable
        # state, call fds) directly: it needs all of them by index at every
        # call, which the per-role QueueHandle view does not give.
        self._conn = context
        self.port  # register with the switch on first connect

    def detach(self) -> None:
        self._conn = None
        if self._port is not None:
            self._port.c.kind = PORT_NONE
            self.switch.forget(self._port)
        super().detach()

    def reset(self) -> None:
        if self._port is not None:
            self.switch.forget(self._port)

    def on_kick(self, queue: QueueHandle) -> None:
        if queue.index % 2 == 0:
            return  # receive buffers added: used when frames arrive
        n = self.switch.tx_burst(self.port, queue.index // 2, budget=TX_BUDGET)
        assert self._conn is not None  # kicks only come while attached
        slot = self._conn.slots[queue.index]
        if n >= 0:
            slot.buffers += n
        elif slot.vq is not None and slot.vq.error is None:
            slot.vq.error = RingError(n)
            self._conn.ring_fault(slot, slot.vq.error)

    def request(self, name: str, payload: Any) -> Any:
        if name == "NET_SET_MTU":
            mtu = int(payload)
            if not MIN_MTU <= mtu <= MAX_MTU:
                log.warning("%s: refusing NET_SET_MTU %d", self.port.name, mtu)
                return Refusal(f"mtu {mtu} outside {MIN_MTU}..{MAX_MTU}")
            log.info("%s: mtu %d", self.port.name, mtu)
            self.mtu = mtu
            return None
        if name == "SEND_RARP":
            mac = bytes(payload)
            log.info("%s: announcing %s (SEND_RARP)", self.port.name, mac.hex(":"))
            self.switch.inject(self.port, rarp_frame(mac))
            return None
        raise NotImplementedError(name)

    # ----------------------------------------------------------- config

    def config_value(self, field: ConfigField) -> int | bytes:
        if field.name == "status":
            return VIRTIO_NET_S_LINK_UP
        if field.name == "max_virtqueue_pairs":
            return self.queue_pairs
        if field.name == "mtu":
            return self.mtu
        return 0

    # ----------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"port": self.port.index, "queue_pairs": self.queue_pairs, "mtu": self.mtu,
                               # virtio-net header length on this port's rings: 12 with
                               # VERSION_1 or MRG_RXBUF, 10 for a legacy driver (seed 003)
                               "header_len": int(self.port.c.hdr_len)}
        out.update(self.switch.stats())
        return out

    def control(self, command: str, args: list[str]) -> Any:
        if command == "stats":
            return self.switch.stats()
        if command == "fdb":
            return self.switch.fdb()
        return super().control(command, args)

    def background_tasks(self) -> list[Any]:
        """Work shared by every port, run once per process (cli / RunnerGroup)."""
        return [self.switch.run]

    # ----------------------------------------------------------- CLI

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Device:
        return cls.from_args_sockets(args, [getattr(args, "socket", None) or "net"])[0]

    @classmethod
    def from_args_sockets(cls, args: argparse.Namespace, sockets: Iterable[str]) -> list[Device]:
        """One port per socket, all on one switch (with the taps)."""
        mode = "reflect" if args.reflect else "sink" if args.sink else "switch"
        switch = NetSwitch(mode=mode, pcap=args.pcap, busy_poll=args.busy_poll)
        try:
            devices = [
                cls(switch=switch, queue_pairs=args.queue_pairs, mtu=args.mtu, port_name=str(path),
                    without=args.without, queue_policy=args.queue_policy)
                for path in sockets]
            for dev in devices:
                dev.port  # noqa: B018 - ports numbered in socket order
            for tap in args.tap:
                switch.add_tap(tap)
        except BaseException:
            switch.close()
            raise
        return list(devices)

    def qemu_extra_args(self, chardev: str, qemu_version: str) -> list[str]:
        mq = f",queues={self.queue_pairs}" if self.queue_pairs > 1 else ""
        return ["-netdev", f"vhost-user,id={chardev}-net,chardev={chardev}{mq}"]

    def qemu_device_args(self, chardev: str, qemu_version: str) -> str:
        # A MAC per socket (locally administered, derived from the socket
        # path): guests on one switch must not share QEMU's default MAC.
        digest = hashlib.sha1(str(self._port_name or chardev).encode()).digest()
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
        args = f"virtio-net-pci,netdev={chardev}-net,mac={mac}"
        if self.mtu != 1500:
            # QEMU owns the config space: the guest sees an MTU only through
            # host_mtu, which QEMU then sends to us with NET_SET_MTU.
            args += f",host_mtu={self.mtu}"
        if self.queue_pairs > 1:
            args += ",mq=on"
        if qemu_version.startswith("7"):
            # QEMU 7.2 under TCG segfaults at DRIVER_OK without it (design.md).
            args += ",vectors=0"
        return args
