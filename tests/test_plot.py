"""``vuser plot FILE -o PNG`` on recorded rows (made here, shaped as the
balloon and net plugins' ``sample`` make them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from vuser.cli import main
from vuser.plot import PlotError, picture_facts, plot_file, read_rows

MiB = 1 << 20


def write(path: Path, rows: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def balloon_rows() -> list[dict[str, Any]]:
    out = []
    for i in range(30):
        target = min(i, 12) * 32 * MiB
        decisions = [{"seq": i, "time": 1000.0 + i, "action": "inflate", "from": target - 32 * MiB, "to": target,
                      "reason": "host short"}] if 0 < i <= 12 else []
        out.append({"time": 1000.0 + i, "device": "balloon", "connected": True, "guest_ram": 512 * MiB,
                    "target": target, "actual": max(0, target - 16 * MiB), "bytes_released": target,
                    "oom_deflated": 0, "stats": {"available-memory": 450 * MiB - target},
                    "host": {"total": 1000 * MiB, "available": 100 * MiB + target, "source": "test"},
                    "policy": "auto", "decisions": decisions, "cursor": i})
    return out


def net_rows() -> list[dict[str, Any]]:
    return [{"time": 50.0 + i / 2, "device": "net",
             "ports": [{"port": p, "name": f"/x/net{p}.sock", "rx_packets": 100 * i * (p + 1),
                        "tx_packets": 90 * i, "drops": {"no_rx_buffer": 3 * i} if p else {}, "dropped": 3 * i * p}
                       for p in range(2)]} for i in range(20)]


def assert_picture(path: Path) -> None:
    """A drawing, not an empty frame."""
    facts = picture_facts(path)
    assert facts["bytes"] > 20_000 and facts["width"] >= 600 and facts["height"] >= 400, facts
    assert facts["spread"] > 0.05, facts


def test_a_blank_picture_is_told_apart(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 7))
    fig.savefig(tmp_path / "blank.png")
    plt.close(fig)
    assert picture_facts(tmp_path / "blank.png")["spread"] == 0
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(PlotError, match="not a PNG"):
        picture_facts(tmp_path / "not.png")


@pytest.mark.parametrize("kind,make", [("balloon", balloon_rows), ("net", net_rows)])
def test_plot_draws_each_kind(tmp_path: Path, kind: str, make: Any) -> None:
    rec = write(tmp_path / f"{kind}.jsonl", make())
    assert plot_file(rec, tmp_path / f"{kind}.png") == kind
    assert_picture(tmp_path / f"{kind}.png")


def test_cli_plot_and_its_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rec = write(tmp_path / "b.jsonl", balloon_rows(), tail='{"time": 10')   # still being written
    assert main(["plot", str(rec), "-o", str(tmp_path / "b.png"), "--title", "test"]) == 0
    assert "balloon time series" in capsys.readouterr().out
    assert_picture(tmp_path / "b.png")
    bad = write(tmp_path / "bad.jsonl", [{"time": 1, "device": "balloon"}], tail="garbage\n{}\n")
    for path, message in ((tmp_path / "nope.jsonl", "No such file"), (bad, "bad.jsonl:2: not a JSON line"),
                          (write(tmp_path / "one.jsonl", [{"time": 1, "device": "net"}]), "at least two"),
                          (write(tmp_path / "rng.jsonl", [{"time": t, "device": "rng"} for t in (1, 2)]),
                           "no picture for a rng")):
        assert main(["plot", str(path), "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_error_says_what_to_install(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ImportError
    rec = write(tmp_path / "n.jsonl", net_rows())
    with pytest.raises(PlotError, match=r"pip install 'vuser\[plot\]'"):
        plot_file(rec, tmp_path / "n.png")
    assert len(read_rows(rec)) == 20
