"""The README's pictures: ``scripts/figures`` runs its real-guest scenarios
(balloon under ``auto``, two guests on a net switch), and each PNG it
draws with ``vuser plot`` must be there and be a drawing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio

from vuser.plot import picture_facts

pytestmark = pytest.mark.guest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "figures"


async def test_figures_script_draws_both_pictures(tmp_path: Path) -> None:
    with trio.fail_after(900):
        result = await trio.run_process([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                                        capture_stdout=True, stderr=subprocess.STDOUT, check=False)
    output = result.stdout.decode()
    print(output)
    assert result.returncode == 0, output
    for name in ("balloon.png", "net.png"):
        facts = picture_facts(tmp_path / name)
        assert facts["bytes"] > 20_000 and facts["width"] >= 600 and facts["height"] >= 400, (name, facts)
        assert facts["spread"] > 0.05, (name, facts)
