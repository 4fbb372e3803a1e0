"""Queue layout policies and config visibility (seeds 000, 001, 002)."""

from __future__ import annotations

import pytest

from vuser.device import ConfigField, Device, DeviceError, Feature


class BalloonLike(Device):
    """The balloon's declarations (virtio spec 5.5): the case the seeds argue about."""

    name = "balloon-like"
    virtio_id = 5
    base_queues = ("inflateq", "deflateq")
    features = (
        Feature(0, "VIRTIO_BALLOON_F_MUST_TELL_HOST"),
        Feature(1, "VIRTIO_BALLOON_F_STATS_VQ", ("statsq",)),
        Feature(2, "VIRTIO_BALLOON_F_DEFLATE_ON_OOM"),
        Feature(3, "VIRTIO_BALLOON_F_FREE_PAGE_HINT", ("free_page_vq",)),
        Feature(4, "VIRTIO_BALLOON_F_PAGE_POISON"),
        Feature(5, "VIRTIO_BALLOON_F_REPORTING", ("reporting_vq",)),
    )
    config_fields = (
        ConfigField("num_pages", 0, 4),
        ConfigField("actual", 4, 4, writable=True),
        ConfigField("free_page_hint_cmd_id", 8, 4, feature="FREE_PAGE_HINT"),
        ConfigField("poison_val", 12, 4, feature="PAGE_POISON", writable=True),
    )

    def __init__(self, **kw):
        super().__init__(**kw)
        self.values = {"num_pages": 0x100, "actual": 0, "free_page_hint_cmd_id": 7, "poison_val": 0}

    def config_value(self, field):
        return self.values[field.name]

    def config_written(self, field, value):
        self.values[field.name] = value


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
    assert dev.values["num_pages"] == 0x100 and dev.values["free_page_hint_cmd_id"] == 7
    assert dev.values["actual"] == 0x40 and dev.values["poison_val"] == 0xAA
    # A partial write of one byte of `actual`.
    dev.write_config(5, b"\x01")
    assert dev.values["actual"] == 0x140


def test_feature_names_decode() -> None:
    dev = BalloonLike()
    assert dev.feature_names(bits(dev, "STATS_VQ") | (1 << 32)) == ["VIRTIO_BALLOON_F_STATS_VQ", "VIRTIO_F_VERSION_1"]
