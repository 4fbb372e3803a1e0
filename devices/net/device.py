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
The port's C struct is kept current by the queue-lifecycle hooks (push):
a ring starting, stopping, being enabled, a new call fd, new features.

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

import logging
from typing import Any

from vuser.device import TRANSPORT_FEATURES, ConfigField, Device, DeviceContext, DeviceError, Feature
from vuser.events import Refusal
from vuser.handles import QueueHandle, RawQueue
from vuser.memory import GuestMemory
from vuser.virtio import DeviceId, NetStatus, Transport, has, mask
from vuser.virtio import NetFeature as NF
from vuser.virtqueue import RingError
from vuser.wire import ProtocolFeature as PF

from .switch import (
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

try:
    from vuser._native import ffi
except ImportError:  # pragma: no cover
    ffi = None

log = logging.getLogger(__name__)

DEFAULT_QUEUE_PAIRS = 4
MIN_MTU, MAX_MTU = 68, 65535
ETH_OVERHEAD = 18  # Ethernet header + one VLAN tag


def _offloads(features: int, csum: NF, tso4: NF, tso6: NF) -> int:
    """vu_net_port offload bits from one direction's feature bits (TSO
    needs the checksum feature, virtio spec 5.1.3.1)."""
    if not has(features, csum):
        return 0
    out = OFF_CSUM
    if has(features, tso4):
        out |= OFF_TSO4
    if has(features, tso6):
        out |= OFF_TSO6
    return out


def _mq_queues(pairs: int) -> tuple[str, ...]:
    return tuple(q for k in range(1, pairs) for q in (f"rx{k}", f"tx{k}"))


def _features(pairs: int) -> tuple[Feature, ...]:
    # Order is the order queues are numbered in (design.md semantics 2):
    # only MQ brings queues, rx1/tx1... after rx0/tx0; the control queue is
    # QEMU's and is never declared.  Append new features at the end.
    return (
        Feature(NF.CSUM, doc="the driver may send partial checksums"),
        Feature(NF.GUEST_CSUM, doc="the driver takes partial checksums"),
        Feature(NF.MTU, doc="config mtu; NET_SET_MTU"),
        Feature(NF.GUEST_TSO4, doc="the driver takes TCP/IPv4 GSO frames"),
        Feature(NF.GUEST_TSO6, doc="the driver takes TCP/IPv6 GSO frames"),
        Feature(NF.HOST_TSO4, doc="the driver may send TCP/IPv4 GSO frames"),
        Feature(NF.HOST_TSO6, doc="the driver may send TCP/IPv6 GSO frames"),
        Feature(NF.MRG_RXBUF, doc="frames over several receive buffers"),
        Feature(NF.STATUS, doc="config status (link up)"),
        Feature(NF.GUEST_ANNOUNCE, doc="the guest announces itself after migration"),
        Feature(NF.MQ, queues=_mq_queues(pairs), doc="more than one queue pair"),
    )


class NetDevice(Device):
    """One switch port per instance (one per socket); see the module doc."""

    name = "net"
    virtio_id = DeviceId.NET
    description = "virtio-net data path: ports of a learning L2 switch (tap, pcap, reflect, sink)"
    base_queues = ("rx0", "tx0")
    features = _features(DEFAULT_QUEUE_PAIRS)
    # IN_ORDER (virtio spec 2.7.9): every ring here is used in the order it
    # was made available -- tx chains are completed in pop order, rx chains
    # published in pop order, and only unpublished tail chains are ever
    # rewound -- so the driver may take its in-order fast paths.
    transport_features = (*TRANSPORT_FEATURES, Feature(Transport.ANY_LAYOUT), Feature(Transport.IN_ORDER))
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
        # instance.
        self.features = _features(queue_pairs)
        super().__init__(**kw)
        self.queue_pairs = queue_pairs if self.is_offered("MQ") else 1
        self.mtu = mtu
        self._switch = switch
        self._port_name = port_name
        self._port: SwitchPort | None = None
        self._queues: dict[int, RawQueue] = {}  # started queues of the connection, by index

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

    def vhost_queue_num(self) -> int:
        # GET_QUEUE_NUM: QEMU's vhost-user netdev compares it with queues=N,
        # a number of queue pairs (net/vhost-user.c, vhost_user_start).
        return self.queue_pairs

    def _sync_features(self) -> None:
        """Header size, frame size and offloads from the features in effect
        (seed 003: 12-byte header with VERSION_1 or MRG_RXBUF)."""
        c = self.port.c
        features = self.context.effective_features if self.context is not None else 0
        c.hdr_len = 12 if features & mask(Transport.VERSION_1, NF.MRG_RXBUF) else 10
        c.mrg_rxbuf = 1 if has(features, NF.MRG_RXBUF) else 0
        # A driver that accepted MTU keeps to the config's mtu; without it
        # Linux allows any MTU up to 64 KiB.
        c.max_frame = self.mtu + ETH_OVERHEAD if has(features, NF.MTU) else FRAME_MAX
        c.tx_offloads = _offloads(features, NF.CSUM, NF.HOST_TSO4, NF.HOST_TSO6)
        c.rx_offloads = _offloads(features, NF.GUEST_CSUM, NF.GUEST_TSO4, NF.GUEST_TSO6)
        self.switch.port_changed()

    def _sync_queue(self, index: int) -> None:
        """Write queue ``index``'s ring and call fd into the port."""
        c = self.port.c
        qp, tx = divmod(index, 2)
        if qp >= self.queue_pairs:
            return
        q = self._queues.get(index)
        ring = q.ring if q is not None else None
        call = q.call_fd if q is not None else -1
        if tx:
            c.tx[qp] = ffi.NULL if ring is None else ring
            c.tx_call[qp] = call
        else:
            c.rx[qp] = ffi.NULL if ring is None else ring
            c.rx_call[qp] = call

    def _sync_all(self) -> None:
        for index in range(2 * self.queue_pairs):
            self._sync_queue(index)

    def after(self, cport: Any, result: int) -> None:
        """PortBinding: report rings the guest broke (seen by C)."""
        port = self.port
        seen = int(cport.stats.drops[RING_ERROR_DROP])
        if seen == port.ring_errors_seen and result >= 0:
            return
        port.ring_errors_seen = seen
        for q in list(self._queues.values()):
            code = q.ring_broken
            if code:
                q.report_ring_error(code)

    # ----------------------------------------------------------- device hooks

    def attach(self, context: DeviceContext) -> None:
        super().attach(context)
        c = self.port.c  # registers with the switch on first connect
        c.mem = context.memory.native
        c.guard_owner = context.memory.owner
        c.faulted = 0
        c.nqp = self.queue_pairs
        c.kind = PORT_VHOST
        self._sync_features()
        self._sync_all()

    def detach(self) -> None:
        self._queues.clear()
        if self._port is not None:
            self._sync_all()
            self._port.c.kind = PORT_NONE
            self._port.c.nqp = 0
            self._port.c.guard_owner = 0
            self.switch.forget(self._port)
            self.switch.port_changed()
        super().detach()

    def reset(self) -> None:
        if self._port is not None:
            self.switch.forget(self._port)
            self._sync_features()

    def features_accepted(self, features: int) -> None:
        self._sync_features()

    def features_negotiated(self, features: int) -> None:
        self._sync_features()

    def queue_started(self, queue: RawQueue) -> None:
        self._queues[queue.index] = queue
        self._sync_features()
        self._sync_queue(queue.index)

    def queue_stopped(self, queue: RawQueue) -> None:
        self._queues.pop(queue.index, None)
        self._sync_queue(queue.index)

    def queue_enabled(self, queue: RawQueue, enabled: bool) -> None:
        self._sync_queue(queue.index)

    def call_changed(self, queue: RawQueue) -> None:
        self._sync_queue(queue.index)

    def memory_changed(self, memory: GuestMemory) -> None:
        self.port.c.mem = memory.native
        self._sync_all()

    def queues_broken(self, error: RingError) -> None:
        self._sync_all()

    def on_kick(self, queue: QueueHandle) -> None:
        if queue.index % 2 == 0:
            return  # receive buffers added: used when frames arrive
        raw = self._queues.get(queue.index)
        n = self.switch.tx_burst(self.port, queue.index // 2)
        if raw is None:
            return
        if n >= 0:
            raw.consumed(n)
        else:
            raw.report_ring_error(n)

    def request(self, name: str, payload: Any) -> Any:
        if name == "NET_SET_MTU":
            mtu = int(payload)
            if not MIN_MTU <= mtu <= MAX_MTU:
                log.warning("%s: refusing NET_SET_MTU %d", self.port.name, mtu)
                return Refusal(f"mtu {mtu} outside {MIN_MTU}..{MAX_MTU}")
            log.info("%s: mtu %d", self.port.name, mtu)
            self.mtu = mtu
            self._sync_features()
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
            return int(NetStatus.LINK_UP)
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
