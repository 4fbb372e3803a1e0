"""Checks of the memory table: replaced while the rings run (DPDK's
virtio_user does it as its memory grows), and ADD/REM_MEM_REG up to the
slot count the back-end announces."""

from __future__ import annotations

from vuser.probe.context import CheckSpec, Probe
from vuser.probe.work import Fail, Skip
from vuser.wire import ProtocolFeature as PF

HOT_REGION = 2 << 20        # bytes of each region added while running
MAX_SLOTS_TRIED = 256       # regions the probe adds at most (fds and mappings of its own)


async def replace_while_running(p: Probe) -> str:
    """ENABLE 0, SET_MEM_TABLE with one more region, ENABLE 1, while the
    rings run; requests with buffers in the new region are served."""
    async with p.running() as r:
        await r.serve(3)
        await r.fe.replace_mem_table(add_region_size=HOT_REGION)
        r.q.buffer_region = r.fe.memory.regions[-1].index
        await r.serve(3)
        r.q.buffer_region = None
        await r.serve(3)
        await r.stop()
        return (f"SET_MEM_TABLE with {len(r.fe.memory.regions)} regions while running; requests with buffers "
                f"in the new region served")


async def mem_slots(p: Probe) -> str:
    """With CONFIGURE_MEM_SLOTS: ADD_MEM_REG until the announced slot count
    is used, requests with buffers in the last region, REM_MEM_REG of the
    added ones, requests again."""
    async with p.running() as r:
        fe, q = r.fe, r.q
        p.require_protocol(PF.CONFIGURE_MEM_SLOTS, fe)
        if fe.max_mem_slots is None:
            raise Fail("GET_MAX_MEM_SLOTS was not answered")
        slots = fe.max_mem_slots
        target = min(slots, MAX_SLOTS_TRIED)
        added = []
        while len(fe.memory.regions) < target:
            region = fe.memory.add_region(HOT_REGION)
            await fe.add_mem_reg(region)
            added.append(region)
        if not added:
            raise Skip(f"the back-end announces {slots} slots, no room for more regions")
        q.buffer_region = added[-1].index
        await r.serve(3)
        q.buffer_region = None
        for region in added:
            fe.memory.remove_region(region.index)
            await fe.rem_mem_reg(region)
        await r.serve(3)
        await r.stop()
        capped = f" (the probe stops at {MAX_SLOTS_TRIED})" if target < slots else ""
        return (f"{slots} slots announced; {target} regions held{capped}, requests served from the last one; "
                f"{len(added)} removed with REM_MEM_REG, requests served again")


CHECKS = (
    CheckSpec("memory/replace-while-running", "vhost-user.rst SET_MEM_TABLE; design.md (DPDK virtio_user "
              "memory hot-plug)", replace_while_running),
    CheckSpec("memory/add-rem-mem-reg", "vhost-user.rst GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG", mem_slots),
)

__all__ = ["CHECKS"]
