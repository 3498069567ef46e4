"""Reliability diagram of an :func:`.calibration.evaluate_calibration` result."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .calibration import _key

__all__ = ["plot_reliability"]

_PANEL_NAMES = {"all": "all classes", "r": "rare", "c": "common", "f": "frequent"}


def plot_reliability(
    cal: dict, path, groups: Sequence[str] = ("r", "c", "f"), title: str | None = None
) -> None:
    """Reliability diagram PNG: one column per group (r / c / f), precision per confidence bin
    against the diagonal (top) and the confidence histogram (bottom)."""
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in library code.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(groups), 6.0), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(
        2, len(groups), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for j, g in enumerate(groups):
        top, bottom = axes[0, j], axes[1, j]
        rel = cal["reliability"].get(g)
        top.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        if rel is not None:
            M = len(rel["count"])
            if "edges" in rel:
                left = np.asarray(rel["edges"][:-1])
                width = np.diff(rel["edges"])
            else:  # equal mass: bars span each bin's score range
                left = np.array([v if v is not None else np.nan for v in rel["lo"]])
                width = np.array([v if v is not None else np.nan for v in rel["hi"]]) - left
                width = np.maximum(np.nan_to_num(width), 0.005)
            prec = np.array([v if v is not None else 0.0 for v in rel["precision"]])
            conf = np.array([v if v is not None else np.nan for v in rel["confidence"]])
            count = np.asarray(rel["count"], np.float64)
            top.bar(
                left,
                prec,
                width=width,
                align="edge",
                color="tab:blue",
                alpha=0.75,
                edgecolor="k",
                lw=0.4,
                label="precision",
            )
            # The red mark is the bin's mean confidence: its distance to the bar top is the gap.
            top.scatter(
                left + width / 2,
                conf,
                s=12,
                marker="_",
                color="tab:red",
                zorder=3,
                linewidths=2,
                label="mean confidence",
            )
            bottom.bar(
                left, count, width=width, align="edge", color="tab:gray", edgecolor="k", lw=0.4
            )
            if count.sum() > 0:
                bottom.set_yscale("log")  # most detections sit in the lowest bin
            d = cal.get(_key("D-ECE", g), -1)
            n = cal.get("num_dets", {}).get(g, int(count.sum()))
            label = f"D-ECE {d:.3f}" if d != -1 else "no detections"
            top.set_title(f"{_PANEL_NAMES.get(g, g)}: {label} (n={n}, {M} bins)", fontsize=9)
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("precision (TP fraction)")
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("detections (log)")
        if j == 0:
            top.legend(loc="upper left", fontsize=7)
    fig.suptitle(
        title
        or f"Reliability at IoU {cal.get('iou_thr', 0.5):g} ({cal.get('binning', 'uniform')} bins)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(os.fspath(path))
