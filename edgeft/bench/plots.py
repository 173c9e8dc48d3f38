"""Accuracy vs size and accuracy vs decode speed, the Pareto front marked; PNGs with deterministic bytes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edgeft.constants import REPORT_PLOTS  # noqa: E402

ACCURACY = "rouge_l"  # the metric the gate keeps a share of


def pareto(points: list[tuple[float, float]], x_lower_is_better: bool) -> list[int]:
    """Indices of points no other point beats on both axes (y: higher is better), sorted by x."""
    sign = -1.0 if x_lower_is_better else 1.0
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((sign * x2 >= sign * x and y2 >= y) and (sign * x2 > sign * x or y2 > y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write(records: list[dict], out: Path) -> list[Path]:
    """Both plots into `out`; returns their paths."""
    specs = [("size_bytes", "size (MB)", 1e-6, True, REPORT_PLOTS[0]),
             ("decode_tok_s", "decode tokens/s", 1.0, False, REPORT_PLOTS[1])]
    paths = []
    for key, label, scale, lower_better, fname in specs:
        recs = [r for r in records if r.get(key) and r.get(ACCURACY) is not None]
        if not recs:
            continue
        pts = [(r[key] * scale, r[ACCURACY]) for r in recs]
        front = pareto(pts, lower_better)
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="0.55", zorder=2, label="variant")
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", color="tab:red", zorder=3,
                label="Pareto front")
        for r, (x, y) in zip(recs, pts):
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label + (" (lower is better)" if lower_better else " (higher is better)"))
        ax.set_ylabel(f"{ACCURACY} (higher is better)")
        if key == "size_bytes":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, format="png", metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    return paths
