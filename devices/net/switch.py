"""Python façade of the C virtio-net switch (``native/net.{h,c}``).

The switch is a learning L2 switch whose ports are vhost-user rings (one
port per front-end socket) and host fds (a tap).  C moves the frames: one
call per kick (``tx_burst``), per tap wake-up (``fd_rx``) or per poll
round (``poll``) moves every ready frame; Python only decides when to call
and keeps the C view of each port current.

Keeping the C view current: a vhost-user port's rings come and go with its
session (rings start and stop, are enabled and disabled, memory tables are
replaced, call fds change).  The net device serving that socket is told
of each change (the device's queue-lifecycle hooks) and writes it into
the port's struct at once (push); nothing is re-read per call.  After
every call each port's *binding* (``PortBinding``: that device) looks at
what C reported (ring errors).  The calls are synchronous in the trio
thread, so nothing changes during one.

Resource handling: the switch owns every C struct and scratch buffer (cffi
memory, freed with the switch), the pcap file and the tap fds it opened
(``close``).  Error handling: a tap that fails to open raises ``OSError``
at set-up; a read error on it is logged and that port stops being read.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from vuser.fds import open_private_output
from vuser.virtio import NetGso, NetHdrFlag

from .impair import Impairment, ImpairSpec

try:
    from vuser._native import ffi, lib
except ImportError:  # pragma: no cover - the extension is required for net
    ffi = lib = None

log = logging.getLogger(__name__)

if lib is not None:
    # The C header's copies of the spec's header fields (C cannot import virtio.py).
    assert (lib.VU_NET_HDR_F_NEEDS_CSUM, lib.VU_NET_HDR_F_DATA_VALID) == \
        (NetHdrFlag.NEEDS_CSUM, NetHdrFlag.DATA_VALID)
    assert (lib.VU_NET_HDR_GSO_NONE, lib.VU_NET_HDR_GSO_TCPV4, lib.VU_NET_HDR_GSO_TCPV6, lib.VU_NET_HDR_GSO_ECN) == \
        (NetGso.NONE, NetGso.TCPV4, NetGso.TCPV6, NetGso.ECN)

MODES = {"switch": 0, "reflect": 1, "sink": 2}
DROP_REASONS = ("bad_header", "runt", "too_big", "no_dest", "no_buffer", "rx_too_small",
                "bad_rx_buffer", "ring_error", "fd_error", "sink", "bad_gso", "fault", "spoofed")
RING_ERROR_DROP = DROP_REASONS.index("ring_error")

PORT_NONE, PORT_VHOST, PORT_FD = 0, 1, 2
# vu_net_port.tx_offloads / rx_offloads; the same bits as TUN_F_CSUM/TSO4/TSO6.
OFF_CSUM, OFF_TSO4, OFF_TSO6 = 1, 2, 4
OFF_ALL = OFF_CSUM | OFF_TSO4 | OFF_TSO6
MAX_PORTS = 32
MAX_QUEUE_PAIRS = 16
HDR_MAX = 12
FRAME_MAX = 65550

# pcap (https://wiki.wireshark.org/Development/LibpcapFileFormat): written in
# host byte order, as the C records are; the magic tells readers which.
PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
PCAP_BUFFER = 4 << 20
# Busy-poll mode: how long C keeps polling empty rings, and how many frames
# it moves, before trio gets the thread back.
POLL_SPIN_US = 200
POLL_BUDGET = 65536
# One tx kick's (or tap wake-up's) share of work before the queue task
# yields (issue 9), about a millisecond of it: units are frames taken (plus
# one per 16 descriptors of a chain) and eight per software segment made
# for one port (net.h); bytes are what the frames carry.  A 64 KiB TCP
# frame cut into 2048 segments for one port spends all the units.
BURST_UNITS = 16384
BURST_BYTES = 16 << 20
# The impairment timer wakes at most this often (seconds): held frames due
# within one tick leave together.
IMPAIR_TICK = 0.001
# Forwarding-table hygiene: a learned address stays on its port until it
# has been silent there this long; a port learns at most this many.
HOLD_DOWN_MS = 1000
LEARN_LIMIT = 256

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


class SwitchError(Exception):
    """A caller error (bad port index or kind)."""


class PortBinding(Protocol):
    """The owner of a vhost-user port's C struct (the net device)."""

    def after(self, cport: Any, result: int) -> None:
        """Look at what the last call did (ring errors)."""


@dataclass
class SwitchPort:
    index: int
    name: str
    kind: int
    c: Any
    binding: PortBinding | None = None
    fd: int = -1
    ring_errors_seen: int = 0
    impairment: Impairment | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, Any]:
        s = self.c.stats
        drops = {name: int(s.drops[i]) for i, name in enumerate(DROP_REASONS) if s.drops[i]}
        return {
            "port": self.index, "name": self.name,
            "kind": {PORT_VHOST: "vhost-user", PORT_FD: "tap"}.get(self.kind, "none"),
            "connected": int(self.c.kind) != PORT_NONE,
            "tx_packets": int(s.tx_packets), "tx_bytes": int(s.tx_bytes),
            "rx_packets": int(s.rx_packets), "rx_bytes": int(s.rx_bytes),
            "rx_buffers": int(s.rx_buffers), "notifies": int(s.notifies),
            "tx_gso": int(s.tx_gso), "rx_segments": int(s.rx_segments), "rx_csum": int(s.rx_csum),
            "learned": int(self.c.learned), "learn_refused": int(s.learn_refused),
            "moves_held": int(s.moves_held),
            "mac_locked": bytes(self.c.mac).hex(":") if self.c.mac_locked else None,
            "drops": drops, "dropped": sum(drops.values()),
            **({"impair": self.impairment.status()} if self.impairment is not None else {}),
            **self.extra,
        }


class NetSwitch:
    """One learning switch; see the module docstring.

    ``mode``: ``switch`` (default), ``reflect`` (each frame back to its
    sender, MAC addresses swapped) or ``sink`` (drop and count).
    ``pcap``: write every frame entering the switch to this file.
    ``busy_poll``: ``run`` polls every ring instead of waiting for kicks.
    ``hold_down_ms``, ``learn_limit``: forwarding-table hygiene (net.h).
    """

    def __init__(self, *, mode: str = "switch", pcap: str | None = None, snaplen: int = 65535,
                 busy_poll: bool = False, hold_down_ms: int = HOLD_DOWN_MS,
                 learn_limit: int = LEARN_LIMIT) -> None:
        if lib is None:
            raise RuntimeError("vuser._native is not built (pip install . or python native/build_vring.py)")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.busy_poll = busy_poll
        self.ports: list[SwitchPort] = []
        sw = self._sw = ffi.new("struct vu_net_switch *")
        sw.mode = MODES[mode]
        # The forwarding table's hash key: guests cannot aim at a set.
        sw.fdb_key[0], sw.fdb_key[1] = struct.unpack("=QQ", os.urandom(16))
        sw.hold_down_ms = hold_down_ms
        self.learn_limit = learn_limit
        self._keep = [
            ffi.new("uint8_t[]", lib.VU_NET_SCRATCH_SIZE),
            ffi.new("uint8_t[]", lib.VU_NET_SCRATCH_SIZE),
            ffi.new("struct vu_chain[]", lib.VU_NET_BATCH),
            ffi.new("struct vu_seg[]", lib.VU_NET_SEGS),
            ffi.new("struct vu_chain[]", lib.VU_NET_BATCH),
            ffi.new("struct vu_seg[]", lib.VU_NET_SEGS),
            ffi.new("struct vu_used_elem[]", lib.VU_NET_BATCH),
            ffi.new("uint8_t[]", lib.VU_NET_SCRATCH_SIZE),
        ]
        (sw.scratch, sw.seg_scratch, sw.chains, sw.segs, sw.rx_chains, sw.rx_segs,
         sw.tx_used, sw.impair_scratch) = self._keep
        self._impair_wake = trio.Event()
        self._impair_target = 0
        self._tap_offload = -1
        self.pcap_path = pcap
        self._pcap_fd = -1
        if pcap is not None:
            self._open_pcap(pcap, snaplen)
        self.calls = 0

    # ------------------------------------------------------------ ports

    def _new_port(self, name: str, kind: int) -> SwitchPort:
        if len(self.ports) >= MAX_PORTS:
            raise SwitchError(f"a switch has at most {MAX_PORTS} ports")
        c = ffi.new("struct vu_net_port *")
        c.kind = PORT_NONE
        c.hdr_len = HDR_MAX
        c.max_frame = FRAME_MAX
        c.fd = -1
        c.learn_limit = self.learn_limit
        for q in range(MAX_QUEUE_PAIRS):
            c.rx_call[q] = c.tx_call[q] = -1
        port = SwitchPort(len(self.ports), name, kind, c)
        self.ports.append(port)
        self._sw.ports[port.index] = c
        self._sw.nports = len(self.ports)
        return port

    def add_vhost_port(self, name: str, binding: PortBinding) -> SwitchPort:
        """A port for one vhost-user socket; ``binding`` keeps it current.
        It stays disconnected (frames to it are dropped) until the binding
        sets its kind to PORT_VHOST (a front-end connected)."""
        port = self._new_port(name, PORT_VHOST)
        port.binding = binding
        return port

    def add_fd_port(self, name: str, fd: int) -> SwitchPort:
        """A port on a non-blocking fd that reads and writes one frame with a
        12-byte virtio-net header per call (a tap with IFF_VNET_HDR).  The
        switch owns ``fd`` from now on."""
        port = self._new_port(name, PORT_FD)
        port.fd = fd
        port.c.kind = PORT_FD
        port.c.fd = fd
        port.c.hdr_len = HDR_MAX
        # The kernel takes partial checksums and TCP GSO frames from us, and
        # whatever TUNSETOFFLOAD allowed it to send is resolved in C.
        port.c.rx_offloads = OFF_ALL
        port.c.tx_offloads = OFF_ALL
        self.port_changed()
        return port

    def add_tap(self, name: str, *, up: bool = True) -> SwitchPort:
        """Create (or attach to) tap interface ``name`` with a 12-byte
        virtio-net header and no offloads (the net device offers none), and
        add it as a port."""
        fd = open_tap(name, up=up)
        port = self.add_fd_port(name, fd)
        port.extra["interface"] = name
        return port

    def forget(self, port: SwitchPort) -> None:
        """The port went away: drop what the switch learned about it."""
        lib.vu_net_fdb_flush_port(self._sw, port.index)

    def lookup(self, mac: bytes) -> int | None:
        """The port ``mac`` was learned on, or None."""
        r = lib.vu_net_fdb_lookup(self._sw, bytes(mac[:6]).ljust(6, b"\0"))
        return None if r < 0 else int(r)

    def fdb(self) -> list[dict[str, Any]]:
        """The learned addresses: [{"mac": "aa:bb:…", "port": N}]."""
        out = []
        for e in self._sw.fdb:
            if e.port:
                out.append({"mac": bytes(e.mac).hex(":"), "port": int(e.port) - 1})
        return sorted(out, key=lambda d: (d["port"], d["mac"]))

    # ------------------------------------------------------------ calls into C

    def port_changed(self) -> None:
        """A port connected, went away or changed what it takes: the taps'
        offloads follow (every connected guest must take them whole)."""
        offload = OFF_ALL
        guests = taps = 0
        for port in self.ports:
            if port.binding is not None:
                if port.c.kind == PORT_VHOST:
                    offload &= port.c.rx_offloads
                    guests += 1
            elif port.kind == PORT_FD:
                taps += 1
        if taps:
            self._set_tap_offload(offload if guests else 0)

    def _set_tap_offload(self, offload: int) -> None:
        """TUNSETOFFLOAD as negotiated: the kernel may hand the taps what
        every connected guest takes whole (less software work here)."""
        if offload == self._tap_offload:
            return
        self._tap_offload = offload
        for port in self.ports:
            if port.kind == PORT_FD and port.fd >= 0:
                try:
                    fcntl.ioctl(port.fd, TUNSETOFFLOAD, offload)
                except OSError as exc:  # not a tap (tests use other fds)
                    log.debug("%s: TUNSETOFFLOAD %#x: %s", port.name, offload, exc)
                port.extra["offload"] = offload

    def impair(self, port: SwitchPort, spec: ImpairSpec | None) -> None:
        """Impair the frames delivered to ``port`` (devices/net/impair.py),
        or stop (None: frames it held are dropped with the old state)."""
        if spec is None:
            port.c.impair = ffi.NULL
            port.impairment = None
        else:
            impairment = Impairment(spec)
            port.c.impair = impairment.c
            port.impairment = impairment
        self._impair_wake.set()

    def lock_mac(self, port: SwitchPort, mac: bytes | None) -> None:
        """Drop frames from ``port`` whose source is not ``mac`` (None:
        any source)."""
        if mac is None:
            port.c.mac_locked = 0
            return
        if len(mac) != 6 or mac[0] & 1:
            raise SwitchError(f"{bytes(mac).hex(':')} is not a unicast MAC address")
        port.c.mac = bytes(mac)
        port.c.mac_locked = 1

    def _after(self, result: int) -> None:
        for port in self.ports:
            if port.binding is not None:
                port.binding.after(port.c, result)
        if self._sw.pcap_len:
            self._flush_pcap()
        if self._sw.impair_next_us and self._sw.impair_next_us != self._impair_target:
            self._impair_wake.set()  # frames held: the timer goes to the earliest

    def tx_burst(self, port: SwitchPort, qp: int, units: int = BURST_UNITS, nbytes: int = BURST_BYTES) -> int:
        """Move the frames waiting on tx queue pair ``qp`` of ``port``
        within the budget (0: none).  Returns chains consumed, or a
        negative VU_ERR_* of that ring (after moving the good chains
        before the fault)."""
        rc = int(lib.vu_net_tx_burst(self._sw, port.index, qp, units, nbytes))
        self.calls += 1
        self._after(rc)
        if rc == lib.VU_NET_ERR_PORT:
            raise SwitchError(f"port {port.index} has no tx queue pair {qp}")
        return rc

    def fd_rx(self, port: SwitchPort, units: int = BURST_UNITS, nbytes: int = BURST_BYTES) -> int:
        """Read and switch the frames the fd port has ready, within the budget."""
        rc = int(lib.vu_net_fd_rx(self._sw, port.index, units, nbytes))
        self.calls += 1
        self._after(rc)
        if rc == lib.VU_NET_ERR_PORT:
            raise SwitchError(f"port {port.index} is not an fd port")
        if rc == lib.VU_NET_ERR_IO:
            err = int(port.c.fd_errno)
            raise OSError(err, f"{port.name}: read: {os.strerror(err)}")
        return rc

    def poll(self, budget: int = 256, spin_us: int = 0) -> int:
        """Busy-poll every ring and fd port: one round, or rounds until
        ``spin_us`` µs pass without a frame (or ``budget`` frames moved)."""
        rc = int(lib.vu_net_poll(self._sw, budget, spin_us))
        self.calls += 1
        self._after(rc)
        return rc

    def inject(self, port: SwitchPort, frame: bytes) -> None:
        """Switch ``frame`` as if ``port`` had sent it (SEND_RARP)."""
        rc = int(lib.vu_net_inject(self._sw, port.index, frame, len(frame)))
        self._after(rc)
        if rc:
            raise SwitchError(f"cannot inject a {len(frame)}-byte frame on port {port.index}")

    # ------------------------------------------------------------ background

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The switch's own tasks for the life of the process: one reader
        per fd port and, in busy-poll mode, the poller."""
        async with trio.open_nursery() as nursery:
            for port in self.ports:
                if port.kind == PORT_FD:
                    nursery.start_soon(self._serve_fd, port)
            if self.busy_poll:
                nursery.start_soon(self._busy_poll)
            nursery.start_soon(self._impair_timer)
            task_status.started()

    async def _impair_timer(self) -> None:
        """Deliver held frames when due if no other call does it first: one
        C call per tick (at most one a millisecond), whatever the number of
        frames it releases.  Sleeps without a deadline when nothing is held."""
        while True:
            due = int(self._sw.impair_next_us)
            self._impair_target = due
            if due:
                wait = max(due / 1e6 - time.monotonic(), IMPAIR_TICK)
                with trio.move_on_after(wait):
                    await self._impair_wake.wait()
            else:
                await self._impair_wake.wait()
            self._impair_wake = trio.Event()
            if self._sw.impair_next_us and self._sw.impair_next_us <= time.monotonic() * 1e6:
                lib.vu_net_impair_tick(self._sw, BURST_UNITS)
                self.calls += 1
                self._after(0)

    async def _serve_fd(self, port: SwitchPort) -> None:
        """Wait for the fd to be readable, then one call into C reads and
        switches everything it has."""
        while port.fd >= 0:
            await trio.lowlevel.wait_readable(port.fd)
            try:
                self.fd_rx(port)
            except OSError as exc:
                log.error("%s: %s; no longer reading it", port.name, exc)
                return

    async def _busy_poll(self) -> None:
        """Poll in C until the rings stay empty for POLL_SPIN_US (or
        POLL_BUDGET frames moved), then let the other tasks run (control
        messages, kicks, taps) and go again."""
        log.info("net switch: busy-polling every ring")
        while True:
            self.poll(POLL_BUDGET, POLL_SPIN_US)
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ pcap

    def _open_pcap(self, path: str, snaplen: int) -> None:
        # A capture holds every guest's traffic: private, never through a symlink.
        self._pcap_fd = open_private_output(path)
        os.write(self._pcap_fd, struct.pack("=IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        buf = ffi.new("uint8_t[]", PCAP_BUFFER)
        self._keep.append(buf)
        sw = self._sw
        sw.pcap, sw.pcap_cap, sw.pcap_len, sw.pcap_snaplen = buf, PCAP_BUFFER, 0, snaplen

    def _flush_pcap(self) -> None:
        sw = self._sw
        data = ffi.buffer(sw.pcap, sw.pcap_len)
        sw.pcap_len = 0
        try:
            # A local file: a short blocking write between two bursts.
            os.write(self._pcap_fd, data)
        except OSError as exc:
            log.error("pcap %s: %s; capture stopped", self.pcap_path, exc)
            sw.pcap = ffi.NULL

    # ------------------------------------------------------------ status

    def stats(self) -> dict[str, Any]:
        sw = self._sw
        out: dict[str, Any] = {
            "mode": self.mode,
            "busy_poll": self.busy_poll,
            "flooded": int(sw.flooded),
            "segmented": int(sw.segmented),
            "learned": int(sw.learned),
            "calls": self.calls,
            "ports": [p.stats() for p in self.ports],
        }
        if self.pcap_path is not None:
            out["pcap"] = {"file": self.pcap_path, "records": int(sw.pcap_records),
                           "dropped": int(sw.pcap_dropped)}
        return out

    def close(self) -> None:
        for port in self.ports:
            if port.fd >= 0:
                fd, port.fd = port.fd, -1
                port.c.kind = PORT_NONE
                port.c.fd = -1
                os.close(fd)
        if self._pcap_fd >= 0:
            if self._sw.pcap_len:
                self._flush_pcap()
            fd, self._pcap_fd = self._pcap_fd, -1
            self._sw.pcap = ffi.NULL
            os.close(fd)


def open_tap(name: str, *, up: bool = True, offload: int = 0) -> int:
    """Open tap ``name`` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, 12-byte
    header, TUNSETOFFLOAD ``offload``), non-blocking; bring it up."""
    if len(name.encode()) >= 16:
        raise OSError(errno.EINVAL, f"interface name {name!r} is longer than 15 bytes")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_MAX))
        fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
        if up:
            set_link_up(name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_link_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))


def rarp_frame(mac: bytes) -> bytes:
    """The announcement a vhost-user back-end sends for SEND_RARP (what
    QEMU's qemu_announce_self sends): a broadcast RARP "reverse request"
    from ``mac`` about itself, padded to 60 bytes."""
    mac = bytes(mac[:6])
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (b"\xff" * 6 + mac + struct.pack("!H", 0x8035) + body).ljust(60, b"\0")


__all__ = ["DROP_REASONS", "MODES", "NetSwitch", "PortBinding", "SwitchError", "SwitchPort",
           "open_tap", "rarp_frame"]

if sys.byteorder != "little":  # pragma: no cover - headers are written little-endian in C
    log.warning("net switch: virtio-net headers assume a little-endian host")
