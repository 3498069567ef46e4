"""Console table and on-disk report for an :func:`ltdet.evaluation.evaluate_lvis` result.

``write_report(res, out_dir)`` writes
- ``metrics.json``: every scalar metric (AP, AP50, ..., AR@300, AP1-AP4 when present);
- ``per_class_ap.csv``: id, class, frequency group, training images, training instances, AP
  (empty AP: the class has no ground truth in the evaluated set);
- ``ap_vs_frequency.png``: per-class AP against training images (log x), coloured by r / c / f.
Metrics of -1 are undefined (no class in that group / area has ground truth), as in ``lvis``.
"""

from __future__ import annotations

import csv
import json
import math
import os

from ltdet.frequency import COMMON_MAX_IMAGES, FREQ_GROUPS, RARE_MAX_IMAGES

SUMMARY_ORDER = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "APr",
    "APc",
    "APf",
    "AP50r",
    "AP50c",
    "AP50f",
    "AP1",
    "AP2",
    "AP3",
    "AP4",
    "APpool",
    "APpoolr",
    "APpoolc",
    "APpoolf",
)
# Settings recorded in a result, not metrics (iou_type / protocol are strings).
SETTING_KEYS = ("dets_per_class",)
FREQ_COLOURS = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue", None: "tab:gray"}


def scalar_metrics(res: dict) -> dict:
    """The float metrics of a result, in reporting order (AP block, then AR block)."""
    keys = [k for k in SUMMARY_ORDER if k in res]
    keys += [k for k in res if k.startswith("AR") and k not in keys]
    keys += [
        k
        for k in res
        if k not in keys and k not in SETTING_KEYS and isinstance(res[k], (int, float))
    ]
    return {k: float(res[k]) for k in keys}


def format_table(res: dict) -> str:
    """Readable console table: one line per metric (undefined metrics shown as n/a), then the
    number of classes with ground truth per frequency group."""
    metrics = scalar_metrics(res)
    width = max((len(k) for k in metrics), default=2)
    lines = []
    if res.get("protocol") == "fixed":
        lines.append(
            f"Fixed AP protocol: top {res.get('dets_per_class')} detections per class "
            f"over the set, no per-image cap"
        )
    lines += [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for k, v in metrics.items():
        lines.append(f"{k:<{width}}  {'n/a' if v == -1 else f'{v:.4f}'}")
    per_class = res.get("per_class", [])
    if per_class:
        counts: dict = {}
        for c in per_class:
            if c["AP"] is not None:
                counts[c["frequency"]] = counts.get(c["frequency"], 0) + 1
        evaluated = sum(counts.values())
        groups = ", ".join(f"{g}: {counts[g]}" for g in FREQ_GROUPS if g in counts)
        lines.append(
            f"classes with gt: {evaluated} of {len(per_class)}" + (f" ({groups})" if groups else "")
        )
    return "\n".join(lines)


def write_report(res: dict, out_dir: str | os.PathLike) -> dict:
    """Write metrics.json, per_class_ap.csv and ap_vs_frequency.png; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "metrics": os.path.join(out_dir, "metrics.json"),
        "per_class": os.path.join(out_dir, "per_class_ap.csv"),
        "plot": os.path.join(out_dir, "ap_vs_frequency.png"),
    }
    with open(paths["metrics"], "w") as f:
        json.dump(scalar_metrics(res), f, indent=2)
    per_class = res.get("per_class", [])
    with open(paths["per_class"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "class", "frequency", "training_images", "training_instances", "AP"])
        for c in per_class:
            w.writerow(
                [
                    c["id"],
                    c["name"],
                    c["frequency"] or "",
                    "" if c["image_count"] is None else c["image_count"],
                    "" if c["instance_count"] is None else c["instance_count"],
                    "" if c["AP"] is None else f"{c['AP']:.6f}",
                ]
            )
    _plot_ap_vs_frequency(per_class, paths["plot"])
    return paths


def _plot_ap_vs_frequency(per_class: list, path: str) -> None:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch in library code.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    shown = [c for c in per_class if c["AP"] is not None]
    have_counts = bool(shown) and all(c["image_count"] for c in shown)
    for group in (*FREQ_GROUPS, None):
        pts = [c for c in shown if c["frequency"] == group]
        if not pts:
            continue
        xs = [c["image_count"] if have_counts else i for i, c in enumerate(pts)]
        label = {"r": "rare", "c": "common", "f": "frequent", None: "no group"}[group]
        ax.scatter(
            xs,
            [100 * c["AP"] for c in pts],
            s=10,
            alpha=0.7,
            c=FREQ_COLOURS[group],
            label=f"{label} ({len(pts)})",
        )
    if have_counts:
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class (log)")
        # The r / c and c / f boundaries, between the integer counts.
        ax.axvline(RARE_MAX_IMAGES + 0.5, color="k", lw=0.5, ls=":")
        ax.axvline(COMMON_MAX_IMAGES + 0.5, color="k", lw=0.5, ls=":")
    else:
        ax.set_xlabel("class (training counts unknown: pass train=)")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(-2, 102)
    ap = [c["AP"] for c in shown]
    mean = sum(ap) / len(ap) if ap else math.nan
    ax.set_title(f"Per-class AP vs training frequency (mean {100 * mean:.1f})")
    if shown:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
