"""vuser's rng served in-process by ``Runner`` on a real unix socket, driven
by the front-end harness with each personality.

What is shown: the connect-phase handshake and the probe complete; buffers
of every shape (direct, indirect, multi-segment, with a readable header)
come back filled with distinct entropy, with EVENT_IDX negotiated and
declined and with both ring implementations; GET_VRING_BASE (``fe.stop()``)
returns exactly the number of chains submitted, modulo 2^16, and a later
start resumes from it; memory tables replaced while running (DPDK),
ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS) and plain SET_MEM_TABLE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from conftest import (
    F_EVENT_IDX,
    F_INDIRECT,
    PERSONALITY_NAMES,
    RING_IMPLS,
    RngDevice,
    check_rng_data,
    served,
    submit_mixed,
    wait_idle,
)
from vuser.frontend import HARNESS_PROTOCOL_FEATURES, PERSONALITIES, Driver, Frontend
from vuser.wire import ProtocolFeature as PF

MiB = 1 << 20
EVENT_IDX_NAME = "VIRTIO_RING_F_EVENT_IDX"


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("personality", PERSONALITY_NAMES)
async def test_rng_serves_and_resumes(tmp_path: Path, personality: str, event_idx: bool,
                                      ring_impl: str) -> None:
    with trio.fail_after(60):
        dev = RngDevice()
        async with served(dev, tmp_path / "rng.sock", ring_impl=ring_impl) as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality=personality) as fe:
                drv = Driver(fe, decline=[] if event_idx else [F_EVENT_IDX])
                await drv.probe()
                assert drv.negotiated_features is not None
                st = runner.status()
                negotiated = st["negotiated_features"]
                # DPDK's virtio_user never passes EVENT_IDX on (design.md).
                wants_event_idx = event_idx and personality != "dpdk"
                assert (EVENT_IDX_NAME in negotiated) == wants_event_idx, negotiated
                assert "VIRTIO_F_VERSION_1" in negotiated
                assert st["queues"][0]["role"] == "requestq" and st["queues"][0]["running"]

                q = drv.queue(0)
                assert q.event_idx == wants_event_idx
                # Two batches: the second one is only kicked if the device
                # re-armed notifications (avail_event / NO_NOTIFY) correctly.
                total = 0
                for _ in range(2):
                    added = submit_mixed(q)
                    q.kick()
                    used = await q.wait_used(len(added), timeout=10)
                    check_rng_data(added, used)
                    total += len(added)
                assert q.stats.calls >= 1, "the device never signalled the call eventfd"
                served_bytes = dev.bytes_served
                assert served_bytes > 0

                bases = await fe.stop()
                assert bases == {0: total}
                assert runner.status()["queues"][0]["running"] is False

                # A later start resumes from the returned base.
                await restart(fe, drv)
                added = submit_mixed(q, rounds=2)
                q.kick()
                used = await q.wait_used(len(added), timeout=10)
                check_rng_data(added, used)
                total += len(added)
                assert dev.bytes_served > served_bytes
                assert await fe.stop() == {0: total}
            await wait_idle(runner, 1)


async def restart(fe: Frontend, drv: Driver) -> None:
    """Start the device again on the same connection (guest reboot)."""
    await fe.start(drv.queues, features=drv.features)


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
@pytest.mark.parametrize("personality", ["qemu-11.1", "dpdk"])
async def test_vring_base_wraps_modulo_2_16(tmp_path: Path, personality: str, ring_impl: str) -> None:
    """Rings handed over near the top of the 16-bit index space (as after a
    long-running guest): the base and the used index wrap through 0."""
    start = 0xFFF0

    def setup(drv: Driver) -> None:
        q = drv.queue(0)
        q.avail_idx = start
        q.publish()
        q.last_used_idx = start
        q.memory.pack("<H", q.used_gpa + 2, start)  # used->idx
        q.enable_callbacks()                           # used_event = last_used
        drv.fe.vring_bases[0] = start

    with trio.fail_after(60):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl):
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality=personality) as fe:
                drv = Driver(fe, setup=setup)
                await drv.probe()
                q = drv.queue(0)
                added = submit_mixed(q, rounds=3)
                assert len(added) > 0x10
                q.kick()
                used = await q.wait_used(len(added), timeout=10)
                check_rng_data(added, used)
                assert q.read_used_idx() == (start + len(added)) & 0xFFFF
                assert await fe.stop() == {0: (start + len(added)) & 0xFFFF}


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
async def test_dpdk_memory_table_replaced_while_running(tmp_path: Path, ring_impl: str) -> None:
    with trio.fail_after(60):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl) as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality="dpdk") as fe:
                drv = Driver(fe)
                await drv.probe()
                # DPDK replaced the table twice during start already.
                assert fe.sent().count("SET_MEM_TABLE") == 3
                q = drv.queue(0)
                added = submit_mixed(q)
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                total = len(added)

                # Buffers published (not kicked) before the table changes are
                # served once the rings are enabled again, and buffers in a
                # hot-added region are translated through the new table.
                pending = submit_mixed(q)
                await fe.replace_mem_table(add_region_size=4 * MiB)
                new = fe.memory.regions[-1]
                assert len(fe.memory.regions) == 3
                for size in (64, 4096, 8192):
                    gpa = fe.memory.alloc(size, 8, region=new.index)
                    pending.append((q.add_segments([(gpa, size, True)]), size))
                pending += submit_mixed(q)
                q.kick()
                check_rng_data(pending, await q.wait_used(len(pending), timeout=10))
                total += len(pending)

                await fe.replace_mem_table()  # once more, same regions
                more = submit_mixed(q)
                q.kick()
                check_rng_data(more, await q.wait_used(len(more), timeout=10))
                total += len(more)
                assert runner.status()["ring_error"] is None
                assert await fe.stop() == {0: total}


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
@pytest.mark.parametrize("layout", [(2, False), (4, True)], ids=["2regions-shared-fd", "4regions-own-fds"])
async def test_add_mem_reg_path(tmp_path: Path, ring_impl: str, layout: tuple[int, bool]) -> None:
    """With CONFIGURE_MEM_SLOTS QEMU sends the table region by region
    (ADD_MEM_REG); regions hot-added and removed later keep the ring going."""
    regions, separate = layout
    with trio.fail_after(60):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl) as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock"), regions=regions,
                                        separate_fds=separate) as fe:
                assert fe.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS)
                assert fe.max_mem_slots and fe.max_mem_slots >= 8
                drv = Driver(fe)
                await drv.probe()
                sent = fe.sent()
                assert sent.count("ADD_MEM_REG") == regions and "SET_MEM_TABLE" not in sent
                q = drv.queue(0)
                added = submit_mixed(q)
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                total = len(added)

                hot = fe.memory.add_region(2 * MiB)
                await fe.add_mem_reg(hot)
                gpa = fe.memory.alloc(4096, 8, region=hot.index)
                chains = [(q.add_segments([(gpa, 4096, True)]), 4096)]
                q.kick()
                check_rng_data(chains, await q.wait_used(1, timeout=10))
                total += 1

                await fe.rem_mem_reg(hot)
                fe.memory.remove_region(hot.index)
                added = submit_mixed(q)
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                total += len(added)
                assert runner.status()["ring_error"] is None
                assert await fe.stop() == {0: total}


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
@pytest.mark.parametrize("personality", ["qemu-11.1", "qemu-7.2"])
async def test_plain_set_mem_table_path(tmp_path: Path, personality: str, ring_impl: str) -> None:
    """A front-end without CONFIGURE_MEM_SLOTS sends one SET_MEM_TABLE."""
    pf = HARNESS_PROTOCOL_FEATURES & ~(1 << PF.CONFIGURE_MEM_SLOTS)
    with trio.fail_after(60):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl):
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality=personality,
                                        protocol_features=pf, regions=3) as fe:
                assert not fe.has_protocol_feature(PF.CONFIGURE_MEM_SLOTS)
                drv = Driver(fe)
                await drv.probe()
                sent = fe.sent()
                assert sent.count("SET_MEM_TABLE") == 1 and "ADD_MEM_REG" not in sent
                q = drv.queue(0)
                added = submit_mixed(q, rounds=2)
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                assert await fe.stop() == {0: len(added)}


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
async def test_qemu72_forces_ring_features_not_offered(tmp_path: Path, ring_impl: str) -> None:
    """QEMU 7.2's vhost-user-rng turns EVENT_IDX and INDIRECT_DESC on even
    when the back-end does not offer them (design.md): the rings still work."""
    dev = RngDevice(without=["EVENT_IDX", "INDIRECT_DESC"])
    with trio.fail_after(60):
        async with served(dev, tmp_path / "rng.sock", ring_impl=ring_impl):
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality="qemu-7.2") as fe:
                assert not fe.backend_features & (1 << F_EVENT_IDX | 1 << F_INDIRECT)
                drv = Driver(fe, force_features=[F_EVENT_IDX, F_INDIRECT])
                await drv.probe()
                q = drv.queue(0)
                assert q.event_idx and q.indirect
                total = 0
                for _ in range(2):
                    added = submit_mixed(q)
                    q.kick()
                    check_rng_data(added, await q.wait_used(len(added), timeout=10))
                    total += len(added)
                assert await fe.stop() == {0: total}


async def test_each_feature_write_personality_variant(tmp_path: Path) -> None:
    """Feature writes forwarded one by one (the seeds' semantics) with a
    QEMU 11.1 variant that does not re-read FEATURES_OK: still served."""
    pers = dataclasses.replace(PERSONALITIES["qemu-11.1"], verify_features_ok=False)
    with trio.fail_after(30):
        async with served(RngDevice(), tmp_path / "rng.sock") as runner:
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality=pers) as fe:
                drv = Driver(fe, feature_writes="each", pre_feature_writes=[0])
                await drv.probe()
                assert runner.status()["negotiated_features"] is not None
                q = drv.queue(0)
                added = submit_mixed(q)
                q.kick()
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                assert await fe.stop() == {0: len(added)}


@pytest.mark.parametrize("ring_impl", RING_IMPLS)
@pytest.mark.parametrize("personality", ["qemu-11.1", "qemu-7.2"])
async def test_vring_base_excludes_unconsumed_chains(tmp_path: Path, personality: str, ring_impl: str) -> None:
    """Chains the driver published but never kicked are not consumed: the
    base counts only what the device took, and after a restart from that
    base they are served (the ring is processed when it is enabled)."""
    with trio.fail_after(60):
        async with served(RngDevice(), tmp_path / "rng.sock", ring_impl=ring_impl):
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality=personality) as fe:
                drv = Driver(fe)
                await drv.probe()
                q = drv.queue(0)
                first = submit_mixed(q)
                q.kick()
                check_rng_data(first, await q.wait_used(len(first), timeout=10))
                pending = submit_mixed(q)  # published, no kick
                await trio.sleep(0.05)
                assert q.get_used() == []
                assert await fe.stop() == {0: len(first)}
                await restart(fe, drv)
                check_rng_data(pending, await q.wait_used(len(pending), timeout=10))
                assert await fe.stop() == {0: len(first) + len(pending)}


@pytest.mark.parametrize("personality", PERSONALITY_NAMES)
async def test_kick_signalled_before_the_ring_starts(tmp_path: Path, personality: str) -> None:
    """The driver fills the queue and kicks in its probe, before DRIVER_OK
    (the balloon stats buffer): the kick fd arrives already signalled."""
    added: list[tuple[int, int]] = []

    def setup(drv: Driver) -> None:
        q = drv.queue(0)
        added.extend(submit_mixed(q))
        q.notify()

    with trio.fail_after(30):
        async with served(RngDevice(), tmp_path / "rng.sock"):
            async with Frontend.connect(str(tmp_path / "rng.sock"), personality=personality) as fe:
                drv = Driver(fe, setup=setup)
                await drv.probe()
                q = drv.queue(0)
                check_rng_data(added, await q.wait_used(len(added), timeout=10))
                assert await fe.stop() == {0: len(added)}
