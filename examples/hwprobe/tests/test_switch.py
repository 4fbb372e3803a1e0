"""Two guests on one switch (ports of one `vuser run net`) ping each other."""

import pytest


@pytest.mark.trio
async def test_two_guests_ping_over_a_switch(vuser_guest):
    async with vuser_guest("net", switch="lan") as a, vuser_guest("net", switch="lan") as b:
        result = await a.run(f"ping -c 3 -W 5 {b.ip}", timeout=30)
        assert result.exit_code == 0, result.stdout
        assert "3 packets received" in result.stdout
        ports = (await a.device("net").status())["sockets"]
        assert [port["connected"] for port in ports[:2]] == [True, True]
