"""Queue layout policies and config visibility (seeds 000, 001, 002)."""

from __future__ import annotations

import pytest

from vuser.device import Device, DeviceError
from vuser.devices.balloon import BalloonDevice


class BalloonLike(BalloonDevice):
    """The real balloon's declarations (virtio spec 5.5), the case the seeds
    argue about; the hint command id starts at 7 to see it in config bytes."""

    def __init__(self, **kw):
        super().__init__(target_pages=0x100, **kw)
        self.cmd_id = 7


def bits(dev: Device, *names: str) -> int:
    out = 0
    for n in names:
        out |= 1 << dev.feature(n).bit
    return out


def test_offered_policy_compact_over_offered() -> None:
    dev = BalloonLike()
    assert dict(dev.queue_layout().roles) == {
        0: "inflateq", 1: "deflateq", 2: "statsq", 3: "free_page_vq", 4: "reporting_vq"}
    # Offering all but FREE_PAGE_HINT puts reporting at 3 (design.md example).
    dev = BalloonLike(without=["FREE_PAGE_HINT"])
    assert dev.queue_layout().index_of("reporting_vq") == 3
    # Prefix and case do not matter for --without.
    dev = BalloonLike(without=["virtio_balloon_f_stats_vq"])
    assert dev.queue_layout().roles == {0: "inflateq", 1: "deflateq", 2: "free_page_vq", 3: "reporting_vq"}


def test_driver_declining_does_not_move_queues_under_offered_policy() -> None:
    # Seed 000: queue existence follows what the device offers.
    dev = BalloonLike()
    negotiated = bits(dev, "STATS_VQ", "REPORTING")  # driver declined FREE_PAGE_HINT
    assert dev.queue_layout(negotiated).index_of("reporting_vq") == 4
    assert dev.queue_layout(negotiated, "negotiated").index_of("reporting_vq") == 3
    assert dev.queue_layout(negotiated, "fixed").index_of("reporting_vq") == 4


def test_fixed_policy_keeps_spec_numbers() -> None:
    dev = BalloonLike(without=["STATS_VQ", "FREE_PAGE_HINT"], queue_policy="fixed")
    assert dev.queue_layout().roles == {0: "inflateq", 1: "deflateq", 4: "reporting_vq"}
    assert dev.max_queues == 5


def test_unknown_feature_and_policy_rejected() -> None:
    with pytest.raises(DeviceError, match="unknown feature"):
        BalloonLike(without=["NOPE"])
    with pytest.raises(DeviceError, match="queue policy"):
        BalloonLike(queue_policy="random")


def test_config_readable_before_features_and_follows_offered() -> None:
    dev = BalloonLike()
    raw = dev.read_config(0, 16)
    assert raw == (0x100).to_bytes(4, "little") + bytes(4) + (7).to_bytes(4, "little") + bytes(4)
    assert dev.config_size == 16
    # Field of an un-offered feature does not exist: reads as zero, and the
    # config space ends after the last existing field.
    dev = BalloonLike(without=["PAGE_POISON"])
    assert dev.config_size == 12
    dev = BalloonLike(without=["FREE_PAGE_HINT"])
    assert dev.read_config(8, 4) == bytes(4) and dev.config_size == 16


def test_config_write_only_changes_driver_writable_fields() -> None:
    # QEMU 11.1 writes the whole config from a stale copy (design.md).
    dev = BalloonLike()
    stale = (0).to_bytes(4, "little") + (0x40).to_bytes(4, "little") + (0).to_bytes(4, "little") \
        + (0xAA).to_bytes(4, "little")
    written = dev.write_config(0, stale)
    assert written == ["actual", "poison_val"]
    assert dev.num_pages == 0x100 and dev.cmd_id == 7
    assert dev.actual == 0x40 and dev.poison_val == 0xAA
    # A partial write of one byte of `actual`.
    dev.write_config(5, b"\x01")
    assert dev.actual == 0x140


def test_feature_names_decode() -> None:
    dev = BalloonLike()
    assert dev.feature_names(bits(dev, "STATS_VQ") | (1 << 32)) == ["VIRTIO_BALLOON_F_STATS_VQ", "VIRTIO_F_VERSION_1"]
