"""``vuser plot FILE -o PNG``: a picture of a time series recorded with
``vuser ctl PATH record FILE`` (``vuser.recorder``).

* balloon: the balloon's target (with the policy's decisions marked:
  up for inflate, down for deflate) and actual size, the guest's available
  memory; below, the host's available memory as the policy read it, what
  vuser released to the host, what the guest took back on its own (OOM);
* net: per port, Mbit/s and packets per second received (solid) and sent
  (dashed); below, drops per second by reason (and any other counter group
  a port reports, such as impairment counters).

matplotlib is an optional dependency (``pip install 'vuser[plot]'``); it is
imported only here, only when plotting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

MiB = 1 << 20


class PlotError(Exception):
    """The file cannot be plotted (the message says why)."""


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a recording.  A last line cut short (a recording still
    being written) is left out; any other bad line is an error."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise PlotError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or not isinstance(row.get("time"), (int, float)):
            raise PlotError(f"{path}:{number}: not a recorded row (no time)")
        rows.append(row)
    if len(rows) < 2:
        raise PlotError(f"{path}: {len(rows)} row(s); a plot needs at least two")
    return rows


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("vuser plot needs matplotlib: pip install 'vuser[plot]'") from None
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_file(path: str | Path, output: str | Path, *, title: str | None = None) -> str:
    """Draw the recording ``path`` into ``output``; returns the device kind."""
    rows = read_rows(path)
    kind = str(rows[0].get("device"))
    heights: tuple[int, ...]
    if kind == "balloon":
        draw, heights = _balloon, (3, 2)
    elif "ports" in rows[0]:
        draw, heights = _net, (2, 2, 2)
    else:
        raise PlotError(f"{path}: no picture for a {kind} recording (balloon and net have one)")
    plt = _pyplot()
    fig, axes = plt.subplots(len(heights), 1, sharex=True, figsize=(10, 7), gridspec_kw={"height_ratios": heights})
    try:
        draw(axes, rows)
        axes[-1].set_xlabel("seconds")
        for ax in axes:
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", fontsize="small", ncol=2)
        fig.suptitle(title or f"{kind}: {Path(path).name}")
        fig.tight_layout()
        fig.savefig(output, dpi=100)
    finally:
        plt.close(fig)
    return kind


def picture_facts(path: str | Path) -> dict[str, Any]:
    """Size, dimensions and how much the pixels vary (0 for a blank
    picture) of a PNG: enough to tell a drawing from an empty frame."""
    plt = _pyplot()
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise PlotError(f"{path}: not a PNG file")
    pixels = plt.imread(str(path))
    return {"bytes": len(data), "width": int(pixels.shape[1]), "height": int(pixels.shape[0]),
            "spread": float(pixels.std())}


def _seconds(rows: list[dict[str, Any]]) -> list[float]:
    t0 = rows[0]["time"]
    return [r["time"] - t0 for r in rows]


def _mib(values: Iterable[Any]) -> list[float]:
    return [float("nan") if v is None else v / MiB for v in values]


# ---------------------------------------------------------------- balloon

def _balloon(axes: Any, rows: list[dict[str, Any]]) -> None:
    t = _seconds(rows)
    top, bottom = axes
    top.step(t, _mib(r.get("target") for r in rows), where="post", color="tab:red", lw=2, label="balloon target")
    top.plot(t, _mib(r.get("actual") for r in rows), color="tab:orange", label="balloon actual")
    top.plot(t, _mib(r.get("stats", {}).get("available-memory") for r in rows), color="tab:green",
             label="guest available")
    top.plot(t, _mib(r.get("guest_ram") for r in rows), color="grey", ls=":", label="guest RAM")
    t0 = rows[0]["time"]
    decisions = [d for r in rows for d in r.get("decisions", [])]
    for action, marker, color in (("inflate", "^", "tab:red"), ("deflate", "v", "tab:blue")):
        chosen = [d for d in decisions if d.get("action") == action]
        if chosen:
            top.scatter([d["time"] - t0 for d in chosen], _mib(d["to"] for d in chosen), marker=marker,
                        color=color, zorder=3, label=f"policy: {action} ({len(chosen)})")
    policies = sorted({str(r["policy"]).partition(":")[0] for r in rows if r.get("policy")})
    top.set_ylabel("MiB" + (f"  (policy {', '.join(policies)})" if policies else ""))
    host = [r.get("host") or {} for r in rows]
    if any(host):
        bottom.plot(t, _mib(h.get("available") for h in host), color="tab:purple", label="host available")
        bottom.plot(t, _mib(h.get("total") for h in host), color="tab:purple", ls=":", label="host total / limit")
    bottom.plot(t, _mib(r.get("bytes_released") for r in rows), color="tab:brown", label="released by vuser")
    bottom.plot(t, _mib(r.get("oom_deflated") for r in rows), color="black", ls="--",
                label="taken back by the guest (OOM)")
    bottom.set_ylabel("MiB")


# ---------------------------------------------------------------- net

def _rates(t: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    """Per-second rates between rows (a counter that went back counts 0)."""
    times, rates = [], []
    for i in range(1, len(t)):
        dt = t[i] - t[i - 1]
        if dt > 0:
            times.append(t[i])
            rates.append(max(0.0, values[i] - values[i - 1]) / dt)
    return times, rates


def _counter_groups(port: dict[str, Any]) -> dict[str, float]:
    """Every counter in a port's sub-dicts (drops by reason, impairments
    ...), as "group:name"."""
    out = {}
    for group, value in port.items():
        if isinstance(value, dict):
            out.update({f"{group}:{k}": v for k, v in value.items() if isinstance(v, (int, float))})
    return out


def _net(axes: Any, rows: list[dict[str, Any]]) -> None:
    t = _seconds(rows)
    bits, packets, drops = axes
    count = max(len(r.get("ports", [])) for r in rows)
    drawn = 0
    for i in range(count):
        ports = [r["ports"][i] if i < len(r.get("ports", [])) else {} for r in rows]
        name = ports[-1].get("name", str(i))
        label = f"port {i}" + (f" ({Path(str(name)).name})" if name != str(i) else "")
        color = f"C{i % 10}"   # one colour a port, in every panel
        for direction, style in (("rx", "-"), ("tx", "--")):
            times, rates = _rates(t, [8e-6 * p.get(f"{direction}_bytes", 0) for p in ports])
            bits.plot(times, rates, color=color, ls=style, label=f"{label} {direction}")
            times, rates = _rates(t, [float(p.get(f"{direction}_packets", 0)) for p in ports])
            packets.plot(times, rates, color=color, ls=style)
        keys = sorted({k for p in ports for k in _counter_groups(p)})
        for n, key in enumerate(keys):
            times, rates = _rates(t, [float(_counter_groups(p).get(key, 0)) for p in ports])
            if any(rates):
                drops.plot(times, rates, color=color, ls=("-", "--", ":", "-.")[n % 4], label=f"{label} {key}")
                drawn += 1
    bits.set_ylabel("Mbit / s")
    packets.set_ylabel("packets / s")
    drops.set_ylabel("drops (and other\ncounters) / s")
    if not drawn:
        drops.text(0.5, 0.5, "no drops", transform=drops.transAxes, ha="center", va="center", color="grey")
