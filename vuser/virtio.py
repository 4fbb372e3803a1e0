"""The one home of virtio constants (virtio 1.x, OASIS spec; vhost-user.rst).

Feature bits are ``IntEnum`` members whose value is the bit *number* (what
device declarations and the spec's tables use); ``mask(...)`` turns bit
numbers into a bit set.  Status bits and ring flags are ``IntFlag``.
Nothing else in ``vuser/`` or ``devices/`` writes a virtio bit number.

Names follow the spec without their prefix (``Transport.EVENT_IDX`` is
``VIRTIO_RING_F_EVENT_IDX``); ``spec_name`` gives the full spec name back,
which is what logs, ``vuser devices`` and the status JSON show.
"""

from __future__ import annotations

import enum
from typing import Iterable


class DeviceId(enum.IntEnum):
    """Virtio device ids (spec 5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    RNG = 4
    BALLOON = 5
    SCSI = 8
    GPU = 16
    INPUT = 18
    VSOCK = 19
    FS = 26


class Status(enum.IntFlag):
    """Device status field (spec 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class Transport(enum.IntEnum):
    """Transport and ring feature bits (spec 6) and the two vhost bits that
    live in the same feature space."""

    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26                 # VHOST_F_LOG_ALL: dirty logging for migration
    ANY_LAYOUT = 27
    INDIRECT_DESC = 28           # VIRTIO_RING_F_INDIRECT_DESC
    EVENT_IDX = 29               # VIRTIO_RING_F_EVENT_IDX
    PROTOCOL_FEATURES = 30       # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


class NetFeature(enum.IntEnum):
    """virtio-net feature bits (spec 5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23


class BalloonFeature(enum.IntEnum):
    """virtio-balloon feature bits (spec 5.5.3)."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    REPORTING = 5


class BlkFeature(enum.IntEnum):
    """virtio-blk feature bits (spec 5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


class BlkRequest(enum.IntEnum):
    """virtio_blk_req.type (spec 5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8


# virtio_blk_req.status (spec 5.2.6).
BLK_S_OK = 0
BLK_SECTOR_SIZE = 512


class FsFeature(enum.IntEnum):
    """virtio-fs feature bits (spec 5.11.3)."""

    NOTIFICATION = 0


class BalloonStat(enum.IntEnum):
    """virtio_balloon_stat tags (spec 5.5.6.3); names as QEMU's QMP shows them."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJOR_FAULTS = 2
    MINOR_FAULTS = 3
    FREE_MEMORY = 4
    TOTAL_MEMORY = 5
    AVAILABLE_MEMORY = 6
    DISK_CACHES = 7
    HUGETLB_ALLOCATIONS = 8
    HUGETLB_FAILURES = 9
    OOM_KILLS = 10
    ALLOC_STALLS = 11
    ASYNC_SCANS = 12
    DIRECT_SCANS = 13
    ASYNC_RECLAIMS = 14
    DIRECT_RECLAIMS = 15

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


# The largest queue size (virtio 2.6: Queue Size is 16 bits, at most 2^15).
MAX_QUEUE_SIZE = 32768


class DescFlag(enum.IntFlag):
    """Descriptor flags (split: spec 2.7.5; packed adds AVAIL/USED, 2.8.1)."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4
    AVAIL = 1 << 7
    USED = 1 << 15


class AvailFlag(enum.IntFlag):
    """vring_avail.flags (spec 2.7.7)."""

    NO_INTERRUPT = 1


class UsedFlag(enum.IntFlag):
    """vring_used.flags (spec 2.7.8)."""

    NO_NOTIFY = 1


class EventFlags(enum.IntEnum):
    """Packed ring event suppression flags (RING_EVENT_FLAGS_*, spec 2.8.10)."""

    ENABLE = 0
    DISABLE = 1
    DESC = 2


class NetHdrFlag(enum.IntFlag):
    """virtio_net_hdr.flags (spec 5.1.6)."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class NetGso(enum.IntEnum):
    """virtio_net_hdr.gso_type (spec 5.1.6)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80


class NetStatus(enum.IntFlag):
    """virtio_net_config.status (spec 5.1.4)."""

    LINK_UP = 1
    ANNOUNCE = 2


# The prefix each enum's members carry in the spec.
_TRANSPORT_PREFIX = {
    Transport.LOG_ALL: "VHOST_F_",
    Transport.INDIRECT_DESC: "VIRTIO_RING_F_",
    Transport.EVENT_IDX: "VIRTIO_RING_F_",
    Transport.PROTOCOL_FEATURES: "VHOST_USER_F_",
}
_PREFIX: dict[type[enum.IntEnum], str] = {
    NetFeature: "VIRTIO_NET_F_",
    BalloonFeature: "VIRTIO_BALLOON_F_",
    BlkFeature: "VIRTIO_BLK_F_",
    FsFeature: "VIRTIO_FS_F_",
}


def spec_name(bit: enum.IntEnum) -> str:
    """The full spec name of a feature bit (``VIRTIO_RING_F_EVENT_IDX``)."""
    if isinstance(bit, Transport):
        return _TRANSPORT_PREFIX.get(bit, "VIRTIO_F_") + bit.name
    prefix = _PREFIX.get(type(bit))
    return prefix + bit.name if prefix else bit.name


def mask(*bits: int | Iterable[int]) -> int:
    """The bit set of feature bit numbers: ``mask(Transport.VERSION_1, 3)``."""
    out = 0
    for b in bits:
        if isinstance(b, int):
            out |= 1 << int(b)
        else:
            for x in b:
                out |= 1 << int(x)
    return out


def has(features: int, bit: int) -> bool:
    """Is feature bit number ``bit`` set in ``features``?"""
    return bool(features >> int(bit) & 1)
