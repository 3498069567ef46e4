"""Precision / recall arrays -> the metrics dict of :func:`ltdet.evaluation.evaluate_lvis`
(lvis-api's ``summarize``, plus AP50 per frequency group, COCO-LT bins and per-class AP)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ltdet.frequency import COCO_LT_BIN_NAMES, FREQ_GROUPS, coco_lt_bins

from .ground_truth import ClassGroups
from .params import AREA_NAMES, IOU_THRS


def mean_valid(x: np.ndarray) -> float:
    """Mean over the entries > -1 (defined), or -1 when there is none (as the references)."""
    v = x[x > -1]
    return float(v.mean()) if v.size else -1.0


def summarize(
    prec: np.ndarray,
    recall: np.ndarray,
    categories: list,
    groups: ClassGroups,
    max_dets: int,
    is_lvis: bool,
) -> dict:
    """``prec`` [T, A, K] (averaged over recall points) and ``recall`` [T, A, K] -> metrics.

    Returns AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AP50r, AP50c, AP50f, AR@, ARs@, ARm@,
    ARl@ (``@{max_dets}``), AP1-AP4 for COCO gt with instance counts, and ``per_class``.
    """
    t75 = int(np.flatnonzero(np.isclose(IOU_THRS, 0.75))[0])
    res: dict[str, Any] = {
        "AP": mean_valid(prec[:, 0]),
        "AP50": mean_valid(prec[0, 0]),
        "AP75": mean_valid(prec[t75, 0]),
        "APs": mean_valid(prec[:, 1]),
        "APm": mean_valid(prec[:, 2]),
        "APl": mean_valid(prec[:, 3]),
    }
    freq = groups.frequency
    freq_arr = np.array([f or "" for f in freq])
    for g in FREQ_GROUPS:
        res[f"AP{g}"] = mean_valid(prec[:, 0, freq_arr == g])
    # AP50 per frequency group: not in the official summary, but the easiest-to-read signal of
    # whether a short run learned a group at all (same precision array, IoU 0.5 only).
    for g in FREQ_GROUPS:
        res[f"AP50{g}"] = mean_valid(prec[0, 0, freq_arr == g])
    res[f"AR@{max_dets}"] = mean_valid(recall[:, 0])
    for a, name in enumerate(AREA_NAMES[1:], start=1):
        res[f"AR{name[0]}@{max_dets}"] = mean_valid(recall[:, a])
    image_count, instance_count = groups.image_count, groups.instance_count
    if not is_lvis and instance_count is not None:
        bins = coco_lt_bins(instance_count)
        for b, name in enumerate(COCO_LT_BIN_NAMES):
            res[name] = mean_valid(prec[:, 0, bins == b])

    # A class is valid (has gt) at every threshold or at none.
    per_class_ap = [
        a if ok else None
        for a, ok in zip(prec[:, 0].mean(0).tolist(), (recall[0, 0] > -1).tolist())
    ]
    per_class_ap50 = [
        a if ok else None for a, ok in zip(prec[0, 0].tolist(), (recall[0, 0] > -1).tolist())
    ]
    res["per_class"] = [
        {
            "id": int(c["id"]),
            "name": c.get("name", str(c["id"])),
            "frequency": freq[k],
            "image_count": None
            if image_count is None or image_count[k] < 0
            else int(image_count[k]),
            "instance_count": None
            if instance_count is None or instance_count[k] < 0
            else int(instance_count[k]),
            "AP": per_class_ap[k],
            "AP50": per_class_ap50[k],
        }
        for k, c in enumerate(categories)
    ]
    return res
