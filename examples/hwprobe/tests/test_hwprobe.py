"""This project's own tool, bin/hwprobe, copied into guests (files=) and run
against the devices vuser serves."""

from pathlib import Path

import pytest

HWPROBE = Path(__file__).resolve().parent.parent / "bin" / "hwprobe"


@pytest.mark.trio
async def test_hwprobe_lists_and_reads_the_rng(vuser_guest):
    async with vuser_guest("rng", "balloon", files={"/usr/local/bin/hwprobe": HWPROBE}) as guest:
        listed = await guest.check("hwprobe list")
        assert sorted(listed.stdout.splitlines()) == ["4 rng virtio_rng", "5 balloon virtio_balloon"]
        assert (await guest.check("hwprobe entropy 1000")).stdout == "1000\n"
        assert (await guest.device("rng").status())["bytes_served"] >= 1000


@pytest.mark.trio
async def test_hwprobe_without_an_rng_says_so(vuser_guest):
    async with vuser_guest("balloon", files={"/usr/local/bin/hwprobe": HWPROBE}) as guest:
        result = await guest.run("hwprobe entropy 16")
        assert (result.exit_code, result.stderr) == (2, "hwprobe: no hardware RNG\n")
