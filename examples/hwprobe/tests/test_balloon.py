"""The balloon takes 128 MiB from the guest; the host gets the memory back."""

import pytest

from vuser.testing import qemu_rss, wait_until

MiB = 1 << 20


async def inflated(balloon, size):
    """The balloon's status once it holds ``size`` bytes, else None."""
    status = await balloon.status()
    return status if status["actual"] >= size else None


@pytest.mark.trio
async def test_balloon_gives_memory_back_to_the_host(vuser_guest):
    async with vuser_guest("balloon --without REPORTING", qemu="11", memory="512M") as guest:
        balloon = guest.device("balloon")
        # Make 200 MiB of guest RAM resident, then free it inside the guest.
        await guest.check("dd if=/dev/zero of=/dev/shm/fill bs=1M count=200 && rm /dev/shm/fill")
        before = qemu_rss(guest.pid)["RssShmem"]

        await balloon.ctl("set-target", "128M")
        status = await wait_until(lambda: inflated(balloon, 128 * MiB), 60, "the balloon to inflate", 0.2)

        assert status["bytes_released"] >= 128 * MiB
        released = before - qemu_rss(guest.pid)["RssShmem"]
        assert released >= 0.9 * 128 * MiB, (before, released)
