"""A short run of scripts/fuzz-protocol in CI (the long campaigns are the
script's, with their figures in the closing notes): mutated QEMU and DPDK
sessions and hostile rings on one port of a vuser run net process while two
other ports move frames; nothing dies, nothing grows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz-protocol"


async def test_short_campaign() -> None:
    with trio.fail_after(600):
        result = await trio.run_process([sys.executable, str(SCRIPT), "--messages", "3000", "--rings", "300",
                                         "--seed", "20261202", "--json"],
                                        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode in (0, 1), result.stderr.decode()[-3000:]
    stats = json.loads(result.stdout)
    print({k: stats[k] for k in ("messages", "mutated", "rings", "deaths", "growth", "traffic_frames",
                                 "traffic_max_gap_s")})
    assert stats["deaths"] == 0, stats["death_logs"]
    assert stats["messages"] >= 3000 and stats["rings"] >= 300 and stats["mutated"] > 100
    assert stats["traffic_frames"] > 0
    assert stats["ok"], (stats["growth"], result.stderr.decode()[-3000:])
