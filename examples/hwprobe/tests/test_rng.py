"""The guest reads entropy served by `vuser run rng`."""

import pytest


@pytest.mark.trio
async def test_guest_reads_entropy_from_vuser(vuser_guest):
    async with vuser_guest("rng", qemu="7.2") as guest:
        result = await guest.run("head -c 4096 /dev/hwrng | wc -c", timeout=60)
        assert (result.exit_code, result.stdout.strip()) == (0, "4096")
        status = await guest.device("rng").status()
        assert status["bytes_served"] >= 4096
