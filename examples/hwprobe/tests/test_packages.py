"""Debian packages in the guest: iperf3 between two guests on a switch."""

import json

import pytest


@pytest.mark.trio
async def test_iperf3_between_two_guests(vuser_guest):
    server = vuser_guest("net", switch="lan", packages=["iperf3"])
    client = vuser_guest("net", switch="lan", packages=["iperf3"])
    async with vuser_guest.together(server, client) as (s, c):
        await s.check("iperf3 --server --daemon --one-off")
        result = await c.check(f"iperf3 --client {s.ip} --time 2 --json", timeout=60)
        received = json.loads(result.stdout)["end"]["sum_received"]
        assert received["bytes"] > 0
