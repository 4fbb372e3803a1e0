"""What the probe knows of each device type it can check: its feature list,
config fields, the queues its driver sets up, the features the probe's
driver leaves alone, and the requests that make a back-end work.

rng, balloon and net are vuser's own device declarations (one home for
their features, queues and config); blk and fs, which vuser does not serve,
are declared here from the virtio spec (5.2, 5.11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vuser.device import ConfigField, Device, Feature
from vuser.devices.balloon import BalloonDevice
from vuser.devices.net import NetDevice
from vuser.devices.rng import RngDevice
from vuser.frontend import Driver
from vuser.frontend.netdriver import NET_PROTOCOL_FEATURES, NetGuest
from vuser.probe.work import PAGE_SIZE, BalloonWork, BlkWork, FsWork, NetTxWork, RngWork, Work
from vuser.virtio import BalloonFeature
from vuser.virtio import BlkFeature as BF
from vuser.virtio import DeviceId, FsFeature
from vuser.virtio import NetFeature as NF


@dataclass(frozen=True)
class Profile:
    """One device type as the probe drives it."""

    name: str
    virtio_id: int
    features: tuple[Feature, ...]
    config_fields: tuple[ConfigField, ...]
    work: Callable[[Driver], Work]
    # The driver's feature table (device feature bits it knows; the ring
    # and transport features come from the harness driver, as in Linux).
    driver_features: tuple[int, ...] = ()
    # Queues the driver sets up (None: every queue of the front-end).
    queues: tuple[int, ...] | None = None
    # The front-end's queue count (None: GET_QUEUE_NUM's answer, else 1).
    num_queues: int | None = None
    # Feature bits the probe's driver never accepts.
    decline: tuple[int, ...] = ()
    # Protocol features the front-end accepts (None: the personality's).
    protocol_features: int | None = None
    # Devices whose queues depend on offered features (seeds 000, 001):
    # the declaration whose layout rules the probe compares the back-end with.
    layout: type[Device] | None = None

    @property
    def config_size(self) -> int:
        return max((f.end for f in self.config_fields), default=0)


def _balloon_work(drv: Driver) -> Work:
    page = drv.fe.memory.alloc(PAGE_SIZE, PAGE_SIZE)
    return BalloonWork(1, page // PAGE_SIZE)


BLK_FEATURES = tuple(Feature(f) for f in BF)
BLK_CONFIG = (
    ConfigField("capacity", 0, 8),
    ConfigField("size_max", 8, 4, "SIZE_MAX"),
    ConfigField("seg_max", 12, 4, "SEG_MAX"),
    ConfigField("geometry", 16, 4, "GEOMETRY"),
    ConfigField("blk_size", 20, 4, "BLK_SIZE"),
    ConfigField("topology", 24, 8, "TOPOLOGY"),
    ConfigField("writeback", 32, 1, "CONFIG_WCE", writable=True),
    ConfigField("num_queues", 34, 2, "MQ"),
    ConfigField("discard", 36, 12, "DISCARD"),
    ConfigField("write_zeroes", 48, 9, "WRITE_ZEROES"),
)
FS_FEATURES = tuple(Feature(f) for f in FsFeature)
FS_CONFIG = (
    ConfigField("tag", 0, 36),
    ConfigField("num_request_queues", 36, 4),
    ConfigField("notify_buf_size", 40, 4, "NOTIFICATION"),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("rng", DeviceId.RNG, RngDevice.features, RngDevice.config_fields, lambda drv: RngWork(0),
            num_queues=1),
    Profile("balloon", DeviceId.BALLOON, BalloonDevice.features, BalloonDevice.config_fields, _balloon_work,
            driver_features=tuple(BalloonFeature),
            # PAGE_POISON with a non-zero poison_val keeps reported pages
            # (5.5.6.2): declined so reported pages can be seen released.
            decline=(BalloonFeature.PAGE_POISON,), layout=BalloonDevice),
    Profile("net", DeviceId.NET, NetDevice.features, NetDevice.config_fields,
            lambda drv: NetTxWork(1, NetGuest(drv).hdr_len), driver_features=tuple(NF), queues=(0, 1), num_queues=2,
            # One queue pair, no control queue (and what needs one: 5.1.3.1).
            decline=(NF.MQ, NF.CTRL_VQ, NF.CTRL_RX, NF.CTRL_VLAN, NF.GUEST_ANNOUNCE, NF.CTRL_MAC_ADDR,
                     NF.CTRL_GUEST_OFFLOADS),
            protocol_features=NET_PROTOCOL_FEATURES),
    Profile("blk", DeviceId.BLOCK, BLK_FEATURES, BLK_CONFIG, lambda drv: BlkWork(0), driver_features=tuple(BF),
            queues=(0,)),
    Profile("fs", DeviceId.FS, FS_FEATURES, FS_CONFIG, lambda drv: FsWork(1), driver_features=tuple(FsFeature),
            queues=(0, 1)),
)}


__all__ = ["PROFILES", "Profile"]
