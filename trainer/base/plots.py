"""Training curves from a job's metrics.jsonl (one JSON object per line, `batch` plus metric keys),
drawn into a PNG written under a temporary name and renamed, so a reader never sees half a file."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

from trainer.base.config import UserError


@dataclasses.dataclass
class Panel:
    title: str
    # (metric key, legend label, matplotlib style); a key ending in "*" draws every key with that prefix
    curves: list[tuple[str, str, str]]
    ylabel: str = ""
    log_y: bool = False
    ylim: Optional[tuple[float, float]] = None


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    return [json.loads(line) for line in open(path) if line.strip()]


def _expand(rows: list[dict], key: str, label: str, style: str) -> list[tuple[str, str, str]]:
    if not key.endswith("*"):
        return [(key, label, style)]
    return [(k, k, style) for k in sorted({k for r in rows for k in r if k.startswith(key[:-1])})]


def plot_metrics(metrics_jsonl: str, png: str, panels: list[Panel], dpi: int = 100) -> str:
    """One subplot per panel, each curve its finite values against `batch`; returns png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_jsonl)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 2, 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key, label, style in (c for curve in panel.curves for c in _expand(rows, *curve)):
            pts = [(r["batch"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("batch"), ax.set_ylabel(panel.ylabel), ax.set_title(panel.title)
        if panel.log_y:
            ax.set_yscale("log")
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = png + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, png)
    return png
