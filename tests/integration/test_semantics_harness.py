"""The semantics the seeds settle (design.md), shown end to end through the
front-end harness against vuser's balloon (queue layout, config) and rng.

* config is readable at any time, also before any SET_FEATURES (seed 002);
* SET_FEATURES may come many times before FEATURES_OK, also with 0; only
  the last set becomes negotiated, and only at FEATURES_OK (seeds 002, 004);
* a driver's validate() may read config, clear a bit and rewrite (seed 004);
* queue indexes follow *offered* features by default, *negotiated* ones
  under ``queue_policy="negotiated"``, and vuser warns when the driver's use
  disagrees with the active policy (seeds 000, 001);
* config writes only change driver-writable fields (QEMU 11.1's stale
  whole-config write);
* a device may refuse a feature set at FEATURES_OK (seed 003);
* config changes are announced on the back-end channel;
* legacy drivers (no VERSION_1) are served (seed 003).
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import (
    F_EVENT_IDX,
    F_VERSION_1,
    BalloonDevice,
    RngDevice,
    check_rng_data,
    served,
    submit_mixed,
    sync,
)
from vuser.frontend import FEATURES_OK, PROTOCOL_FEATURES_BIT, Driver, FeaturesRefused, Frontend
from vuser.wire import Request as R

F_STATS_VQ, F_FREE_PAGE_HINT, F_PAGE_POISON, F_REPORTING = 1, 3, 4, 5
BALLOON_CONFIG_SIZE = 16
KiB = 1 << 10


def balloon(**kw: Any) -> BalloonDevice:
    kw.setdefault("stats_interval", 0)  # no stats timer: nothing runs behind the test's back
    return BalloonDevice(**kw)


def set_features_values(fe: Frontend) -> list[int]:
    return [e.fields.u64 for e in fe.trace if e.request == "SET_FEATURES"]


def roles(status: dict[str, Any]) -> dict[int, str | None]:
    return {q["index"]: q["role"] for q in status["queues"]}


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("vuser.handler")]


# ------------------------------------------------------------------ config before features


@pytest.mark.parametrize("personality", ["qemu-11.1", "qemu-7.2"])
async def test_config_readable_before_any_set_features(tmp_path: Path, personality: str) -> None:
    dev = balloon(target_pages=1234)
    dev.poison_val = 0xAA55AA55
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), personality=personality,
                                        config_size=BALLOON_CONFIG_SIZE) as fe:
                assert "SET_FEATURES" not in fe.sent()
                # Fields of features not accepted by anyone yet (PAGE_POISON,
                # FREE_PAGE_HINT) exist at their fixed offsets: they are offered.
                cfg = await fe.get_config(0, BALLOON_CONFIG_SIZE)
                assert struct.unpack("<IIII", cfg) == (1234, 0, 0, 0xAA55AA55)
                assert await fe.get_config(12, 4) == struct.pack("<I", 0xAA55AA55)
                assert await fe.get_config(0, 4) == struct.pack("<I", 1234)
                st = runner.status()
                assert st["accepted_features"] is None and st["negotiated_features"] is None
                # Reading config did not start anything: the device then
                # probes normally.
                drv = Driver(fe, queues=[0, 1])
                await drv.probe()
                assert "VIRTIO_BALLOON_F_PAGE_POISON" in runner.status()["negotiated_features"]


async def test_config_of_unoffered_feature_is_absent(tmp_path: Path) -> None:
    """A field exists when its feature is offered: without PAGE_POISON and
    FREE_PAGE_HINT the config is 8 bytes and the bytes beyond read as 0."""
    dev = balloon(target_pages=77, without=["PAGE_POISON", "FREE_PAGE_HINT"])
    dev.poison_val = 0x1234
    assert dev.config_size == 8
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock"):
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=8) as fe:
                assert await fe.get_config(0, 8) == struct.pack("<II", 77, 0)
                assert await fe.get_config(0, 16) == struct.pack("<IIII", 77, 0, 0, 0)


# ------------------------------------------------------------------ feature writes


async def test_feature_rewrites_including_zero_before_features_ok(tmp_path: Path) -> None:
    """Several SET_FEATURES before FEATURES_OK, the first ones 0 and a
    subset: nothing is negotiated until FEATURES_OK, then the last set."""
    observed: list[Any] = []
    runner_box: list[Any] = []

    async def validate(drv: Driver) -> None:
        await sync(drv.fe)
        conn = runner_box[0].connection
        observed.append((conn.session.accepted_features, conn.session.negotiated_features))

    with trio.fail_after(30):
        async with served(RngDevice(), tmp_path / "rng.sock") as runner:
            runner_box.append(runner)
            async with Frontend.connect(str(tmp_path / "rng.sock")) as fe:
                # A raw 0, without even the protocol-features bit.
                await fe.set_features(0, add_protocol_bit=False)
                await sync(fe)
                assert runner.connection.session.accepted_features == 0
                assert runner.status()["negotiated_features"] is None
                drv = Driver(fe, feature_writes="each",
                             pre_feature_writes=[0, 1 << F_VERSION_1], validate=validate)
                await drv.probe()
                final = drv.features | PROTOCOL_FEATURES_BIT
                values = set_features_values(fe)
                assert values == [0, PROTOCOL_FEATURES_BIT, PROTOCOL_FEATURES_BIT | 1 << F_VERSION_1, final]
                # In validate (after the last write, before FEATURES_OK):
                # accepted, not negotiated.
                assert observed == [(final, None)]
                session = runner.connection.session
                assert session.negotiated_features == final
                names = runner.status()["negotiated_features"]
                assert "VIRTIO_RING_F_EVENT_IDX" in names and "VIRTIO_F_VERSION_1" in names
                # The rings follow the last set (EVENT_IDX on), not an earlier one.
                q = drv.queue(0)
                assert q.event_idx
                for _ in range(2):
                    added = submit_mixed(q)
                    q.kick()
                    check_rng_data(added, await q.wait_used(len(added), timeout=10))


async def test_reset_forgets_features_and_renegotiates(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with served(RngDevice(), tmp_path / "rng.sock") as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock")) as fe:
                drv = Driver(fe, feature_writes="each")
                await drv.probe()
                assert "VIRTIO_RING_F_EVENT_IDX" in runner.status()["negotiated_features"]
                q = drv.queue(0)
                added = submit_mixed(q)
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                await fe.stop()  # GET_VRING_BASE, then SET_STATUS 0
                await sync(fe)  # SET_STATUS has no reply
                st = runner.status()
                assert st["negotiated_features"] is None and st["accepted_features"] is None
                # After the reset the driver may pick a different set.
                fe.vring_bases.clear()
                drv = Driver(fe, feature_writes="each", decline=[F_EVENT_IDX])
                await drv.probe()
                assert "VIRTIO_RING_F_EVENT_IDX" not in runner.status()["negotiated_features"]
                q = drv.queue(0)
                assert not q.event_idx
                for _ in range(2):
                    added = submit_mixed(q)
                    q.kick()
                    check_rng_data(added, await q.wait_used(len(added), timeout=10))


async def test_validate_clears_page_poison_and_rewrites(tmp_path: Path) -> None:
    """Linux's virtballoon_validate clears PAGE_POISON when the guest does
    not poison pages: it reads config, clears the bit, writes the features
    again; the last set is what gets negotiated."""
    dev = balloon()
    config_seen: list[bytes] = []

    async def validate(drv: Driver) -> None:
        config_seen.append(await drv.read_config(12, 4))  # poison_val, before FEATURES_OK
        drv.clear_feature(F_PAGE_POISON)

    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, feature_writes="each", validate=validate, queues=[0, 1, 2, 3, 4])
                await drv.probe()
                assert config_seen == [bytes(4)]
                values = set_features_values(fe)
                assert len(values) == 2
                assert values[0] & (1 << F_PAGE_POISON) and not values[1] & (1 << F_PAGE_POISON)
                assert values[0] & ~(1 << F_PAGE_POISON) == values[1]
                st = runner.status()
                assert "VIRTIO_BALLOON_F_PAGE_POISON" not in st["negotiated_features"]
                assert "VIRTIO_BALLOON_F_REPORTING" in st["negotiated_features"]
                assert not dev.has("PAGE_POISON", dev.negotiated)
                assert dev.has("REPORTING", dev.negotiated)
                # Clearing a feature without a queue moves no queue.
                assert roles(st)[4] == "reporting_vq"


# ------------------------------------------------------------------ queue layout


async def report_one(drv: Driver, index: int, dev: BalloonDevice, size: int = 64 * KiB) -> None:
    before = dev.bytes_reported
    q = drv.queue(index)
    q.add_inbuf(size)
    q.kick()
    (elem,) = await q.wait_used(1, timeout=10)
    assert elem.length == 0
    assert dev.bytes_reported == before + size, "the buffer was not processed as a page report"


@pytest.mark.parametrize("feature_writes", ["qemu", "each"])
async def test_declined_free_page_hint_keeps_reporting_at_4(tmp_path: Path, feature_writes: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Default policy (offered): FREE_PAGE_HINT is offered, so the
    free_page_vq exists at 3 and reporting_vq is 4 even though the driver
    declines FREE_PAGE_HINT (what QEMU and Linux do)."""
    caplog.set_level(logging.INFO, logger="vuser")
    dev = balloon()
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                assert fe.num_queues == 5
                drv = Driver(fe, decline=[F_FREE_PAGE_HINT], queues=[0, 1, 2, 4],
                             feature_writes=feature_writes)  # type: ignore[arg-type]
                await drv.probe()
                st = runner.status()
                assert "VIRTIO_BALLOON_F_FREE_PAGE_HINT" not in st["negotiated_features"]
                assert st["queue_policy"] == "offered"
                assert roles(st) == {0: "inflateq", 1: "deflateq", 2: "statsq", 3: "free_page_vq",
                                     4: "reporting_vq"}
                running = {q["index"] for q in st["queues"] if q["running"]}
                assert running == {0, 1, 2, 4}
                await report_one(drv, 4, dev)
                assert runner.status()["queues"][4]["buffers"] == 1
                assert warnings_of(caplog) == []


async def test_negotiated_policy_moves_reporting_to_3(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vuser")
    dev = balloon(queue_policy="negotiated")
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, decline=[F_FREE_PAGE_HINT], queues=[0, 1, 2, 3])
                await drv.probe()
                st = runner.status()
                assert st["queue_policy"] == "negotiated"
                assert roles(st) == {0: "inflateq", 1: "deflateq", 2: "statsq", 3: "reporting_vq",
                                     4: None}
                await report_one(drv, 3, dev)
                assert warnings_of(caplog) == []


async def test_warning_when_driver_numbers_by_negotiated_under_offered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Policy offered; the driver declines FREE_PAGE_HINT and starts queue 3
    (it numbers by negotiated features): vuser says which role the active
    layout gives queue 3 and which feature the driver did not accept."""
    caplog.set_level(logging.INFO, logger="vuser")
    dev = balloon()
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, decline=[F_FREE_PAGE_HINT], queues=[0, 1, 2, 3])
                await drv.probe()
                warnings = warnings_of(caplog)
                assert len(warnings) == 1, warnings
                w = warnings[0]
                assert "queue 3" in w and "free_page_vq" in w and "VIRTIO_BALLOON_F_FREE_PAGE_HINT" in w
                assert "reporting_vq" in w  # what the driver most likely means
                # The queue is served under the active policy's role (a free
                # page hint, not a report): nothing is reported.
                q = drv.queue(3)
                q.add_inbuf(64 * KiB)
                q.kick()
                await q.wait_used(1, timeout=10)
                assert dev.bytes_reported == 0
                assert roles(runner.status())[3] == "free_page_vq"
                # Warned once per queue, not per buffer or per kick.
                q.add_inbuf(4 * KiB)
                q.kick()
                await q.wait_used(1, timeout=10)
                assert len(warnings_of(caplog)) == 1


async def test_warning_when_driver_numbers_by_offered_under_negotiated(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vuser")
    dev = balloon(queue_policy="negotiated")
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock"):
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, decline=[F_FREE_PAGE_HINT], queues=[0, 1, 2, 4])
                await drv.probe()
                warnings = warnings_of(caplog)
                assert len(warnings) == 1, warnings
                assert "queue 4" in warnings[0] and "negotiated" in warnings[0]
                # Buffers on a queue the layout does not have come back untouched.
                q = drv.queue(4)
                q.add_inbuf(4 * KiB)
                q.kick()
                (elem,) = await q.wait_used(1, timeout=10)
                assert elem.length == 0 and dev.bytes_reported == 0


async def test_fixed_policy_keeps_spec_numbers(tmp_path: Path) -> None:
    """The spec's fixed numbers: with STATS_VQ not offered, reporting stays
    at 4 and index 2 is unused."""
    dev = balloon(queue_policy="fixed", without=["STATS_VQ"])
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, decline=[F_FREE_PAGE_HINT], queues=[0, 1, 4])
                await drv.probe()
                assert roles(runner.status())[4] == "reporting_vq"
                assert roles(runner.status())[2] is None
                await report_one(drv, 4, dev)


# ------------------------------------------------------------------ config writes


async def test_stale_whole_config_write_changes_only_driver_fields(tmp_path: Path) -> None:
    """QEMU 11.1 writes the whole balloon config from a stale cached copy:
    num_pages = 0 (the old target) comes along with the new ``actual``."""
    dev = balloon()
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock"):
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, queues=[0, 1])
                await drv.probe()
                assert await drv.read_config(0, 4) == bytes(4)  # caches num_pages = 0
                n = fe.config_changes
                dev.set_target(2000)
                await fe.wait_config_change(n, timeout=5)
                # The guest writes actual (and poison_val) without re-reading.
                await drv.write_config(4, struct.pack("<I", 1500))
                await drv.write_config(12, struct.pack("<I", 0xFEEDF00D))
                sent = [e for e in fe.trace if e.request == "SET_CONFIG"]
                assert len(sent) == 2
                assert struct.unpack_from("<I", sent[0].payload, 12)[0] == 0  # stale num_pages
                assert dev.num_pages == 2000
                assert dev.actual == 1500
                assert dev.poison_val == 0xFEEDF00D
                # A write over the read-only fields alone changes nothing.
                await fe.set_config(8, struct.pack("<I", 0xFFFF))
                await fe.set_config(0, struct.pack("<I", 1))
                cfg = struct.unpack("<IIII", await fe.get_config(0, BALLOON_CONFIG_SIZE))
                assert cfg == (2000, 1500, 0, 0xFEEDF00D)


async def test_config_change_announced_on_backend_channel(tmp_path: Path) -> None:
    dev = balloon()
    with trio.fail_after(30):
        async with served(dev, tmp_path / "b.sock") as runner:
            async with Frontend.connect(str(tmp_path / "b.sock"), config_size=BALLOON_CONFIG_SIZE) as fe:
                drv = Driver(fe, queues=[0, 1])
                await drv.probe()
                n = fe.config_changes
                dev.set_target(4096)
                assert await fe.wait_config_change(n, timeout=5) == n + 1
                assert fe.backend_messages[-1].request == "CONFIG_CHANGE_MSG"
                assert struct.unpack("<I", await drv.read_config(0, 4)) == (4096,)
                # Through the control hook, as `vuser ctl PATH set-target 16M` does.
                runner.control("set-target", ["16M"])
                assert await fe.wait_config_change(n + 1, timeout=5) == n + 2
                assert struct.unpack("<I", await fe.get_config(0, 4)) == (16 * 256,)


# ------------------------------------------------------------------ refusal at FEATURES_OK


REFUSAL = "this test device refuses VIRTIO_RING_F_EVENT_IDX"


class PickyRng(RngDevice):
    def validate_features(self, accepted: int) -> str | None:
        if accepted & (1 << F_EVENT_IDX):
            return REFUSAL
        return None


@pytest.mark.parametrize("feature_writes", ["each", "qemu"])
async def test_device_refuses_features_ok(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          feature_writes: str) -> None:
    caplog.set_level(logging.INFO, logger="vuser")
    with trio.fail_after(30):
        async with served(PickyRng(), tmp_path / "rng.sock") as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock")) as fe:
                drv = Driver(fe, feature_writes=feature_writes)  # type: ignore[arg-type]
                with pytest.raises(FeaturesRefused):
                    await drv.probe()
                status = await fe.get_status()
                assert not status & FEATURES_OK
                assert runner.status()["negotiated_features"] is None
                warnings = warnings_of(caplog)
                assert len(warnings) == 1 and REFUSAL in warnings[0], warnings
                assert "VIRTIO_RING_F_EVENT_IDX" in warnings[0]
                # The driver gives up on EVENT_IDX after a reset: accepted.
                await fe.set_status(0)
                drv = Driver(fe, feature_writes=feature_writes, decline=[F_EVENT_IDX])  # type: ignore[arg-type]
                await drv.probe()
                assert await fe.get_status() & FEATURES_OK
                assert "VIRTIO_RING_F_EVENT_IDX" not in runner.status()["negotiated_features"]
                q = drv.queue(0)
                added = submit_mixed(q)
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))


# ------------------------------------------------------------------ legacy


@pytest.mark.parametrize("feature_writes", ["qemu", "each"])
async def test_legacy_driver_is_served(tmp_path: Path, feature_writes: str) -> None:
    """A legacy driver does not accept VERSION_1 (seed 003): no FEATURES_OK
    step in the guest; the back-end learns the mode from the features."""
    with trio.fail_after(30):
        async with served(RngDevice(), tmp_path / "rng.sock") as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock")) as fe:
                drv = Driver(fe, feature_writes=feature_writes, decline=[F_VERSION_1])  # type: ignore[arg-type]
                await drv.probe()
                await sync(fe)
                st = runner.status()
                assert "VIRTIO_F_VERSION_1" not in st["accepted_features"]
                # At DRIVER_OK a legacy driver's features are final.
                assert st["negotiated_features"] == st["accepted_features"], st
                q = drv.queue(0)
                for _ in range(2):
                    added = submit_mixed(q)
                    q.kick()
                    check_rng_data(added, await q.wait_used(len(added), timeout=10))
                assert R.GET_VRING_BASE.name not in fe.sent()
