"""``python -m benchmarks.plot``: time and memory against N and K, per loss, dtype and device.

For each (device, loss, dtype) one PNG: per axis (N, K) a time panel and a peak-memory
panel, one line per provider, log-log. "vs N" holds K at the value with the most distinct N
measured (and the other way round). An axis is drawn only where it has at least
``MIN_POINTS`` (3) sizes: a "curve" of one or two points says nothing about scaling (the
quick CPU sweep measures most losses at few sizes, so most of its groups get one axis or
none; ``--full`` sweeps both). Every provider has its own marker, line style and marker
size (larger first), so a provider whose numbers sit on another's stays visible. Uses the
latest row per (device, loss, shape, dtype, provider), or only the rows of one run with
``--run``. PNGs go to ``benchmarks/results/`` (gitignored).

    python -m benchmarks.plot [--results PATH] [--run RUN_ID] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from typing import Dict, List, Optional

from .common import RESULTS_DIR, RESULTS_FILE
from .report import _provider_rank, latest, load


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "device"


def _series(rows: List[dict], axis: str, other: str):
    """(fixed value of ``other``, {provider: [(x, time, mem)]}) along ``axis``."""
    with_axis = [r for r in rows if axis in (r.get("shape") or {})]
    if not with_axis:
        return None, {}
    if any(other in r["shape"] for r in with_axis):
        counts = Counter()
        for value in {r["shape"].get(other) for r in with_axis}:
            counts[value] = len({r["shape"][axis] for r in with_axis if r["shape"].get(other) == value})
        fixed = max(counts, key=lambda v: (counts[v], v if v is not None else -1))
        with_axis = [r for r in with_axis if r["shape"].get(other) == fixed]
    else:
        fixed = None
    lines: Dict[str, list] = {}
    for r in with_axis:
        lines.setdefault(r["provider"], []).append((r["shape"][axis], r.get("median_ms"), r.get("peak_mb")))
    for pts in lines.values():
        pts.sort()
    return fixed, lines


MIN_POINTS = 3
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
_STYLES = ["-", "--", "-.", ":"]


def _axes_to_draw(rows: List[dict]):
    """[(axis, other, fixed, lines)] for the axes with at least MIN_POINTS sizes."""
    out = []
    for axis, other in (("N", "K"), ("K", "N")):
        fixed, lines = _series(rows, axis, other)
        if max((len({p[0] for p in pts}) for pts in lines.values()), default=0) >= MIN_POINTS:
            out.append((axis, other, fixed, lines))
    return out


def plot(results: str = RESULTS_FILE, run_id: Optional[str] = None, out_dir: str = RESULTS_DIR) -> List[str]:
    """Draw the PNGs; returns their paths (groups without an axis of MIN_POINTS sizes get none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(results)
    rows = [r for r in rows if r.get("run_id") == run_id] if run_id else latest(rows)
    rows = [r for r in rows if r.get("status") == "ok"]
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("device", "unknown"), r.get("loss", "?"), r.get("dtype", "?")), []).append(r)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for (device, loss, dtype), grows in sorted(groups.items()):
        drawn = _axes_to_draw(grows)
        if not drawn:
            continue
        providers = sorted({r["provider"] for r in grows}, key=_provider_rank)
        look = {name: dict(marker=_MARKERS[i % len(_MARKERS)], linestyle=_STYLES[i % len(_STYLES)],
                           markersize=10 - 5 * i / max(1, len(providers) - 1), markerfacecolor="none", markeredgewidth=1.5)
                for i, name in enumerate(providers)}
        fig, axes = plt.subplots(2, len(drawn), figsize=(5.5 * len(drawn) + 1, 8), squeeze=False)
        for col, (axis, other, fixed, lines) in enumerate(drawn):
            for row, (metric, label) in enumerate(((1, "forward+backward ms (median)"), (2, "peak MB above inputs"))):
                ax = axes[row][col]
                for provider in providers:
                    pts = [(p[0], p[metric]) for p in lines.get(provider, []) if p[metric] is not None and p[metric] > 0]
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=provider, **look[provider])
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis + (f"   ({other} = {fixed})" if fixed is not None else ""))
                ax.set_ylabel(label)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"{loss} {dtype} on {device}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{_slug(device)}_{loss}_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=RESULTS_FILE)
    p.add_argument("--run", default=None, help="plot only this run_id")
    p.add_argument("--out-dir", default=RESULTS_DIR)
    args = p.parse_args(argv)
    for path in plot(args.results, args.run, args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
