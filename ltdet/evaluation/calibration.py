"""Detection calibration by frequency group: D-ECE / MCE measurement.

D-ECE (Kueppers et al., "Multivariate Confidence Calibration for Object Detection", CVPR-W 2020),
confidence-only form: the detections are binned by score, and

    D-ECE = sum_m |B_m| / N * |precision(B_m) - confidence(B_m)|,   MCE = max_m |...|

over the non-empty bins, precision = the fraction of true positives at one IoU threshold
(default 0.5). A detection's TP / FP status is the evaluator's own (``lvis_eval``): the top
``max_dets`` per image, LVIS's federated filter (a detection of a class neither annotated nor in
the image's ``neg_category_ids`` is dropped), the greedy matching, and the ignore rules (matched to
an ignored gt, or unmatched on a class in the image's ``not_exhaustive_category_ids``): such a
detection counts for nothing, neither TP nor FP. The IoU threshold is one of the evaluator's
(0.50:0.05:0.95), area range "all". Groups: all detections, each LVIS frequency group r / c / f
of the detection's class, and each COCO-LT bin (training instances [1, 20), [20, 400),
[400, 8000), >= 8000) when instance counts are known. A group without detections has D-ECE -1
(undefined, like an AP of -1).

Bins: ``"uniform"``: M equal-width bins, bin m holds ``edges[m] < s <= edges[m+1]`` (a score of 0
in bin 0). ``"equal_mass"``: per group, the detections sorted by score split into M bins of equal
count by rank (``bin = first_rank * M // N``); equal scores always share the bin of their first
rank, so a bin is a score interval.

The post-hoc calibrators fitted on these TP / FP labels are in :mod:`.calibrators`, the
reliability diagram of an :func:`evaluate_calibration` result in :mod:`.reliability_plot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ltdet.frequency import COCO_LT_BIN_NAMES, FREQ_GROUPS, coco_lt_bins

# The evaluator's own pipeline pieces: cap + federated filter, matching order, gt tensors, matching.
from .ground_truth import GroundTruth, class_groups, load_ground_truth
from .iou import check_iou_type, detection_geometry, gt_geometry
from .matching import match
from .params import AREA_RNGS, IOU_THRS
from .prepare import gt_tensors, select_detections, sort_detections
from .results_io import load_detections

__all__ = [
    "BINNINGS",
    "REPORT_KEYS",
    "calibration_error",
    "calibration_metrics",
    "dece_metrics",
    "detection_outcomes",
    "evaluate_calibration",
]

BINNINGS = ("uniform", "equal_mass")
#: Detection status from :func:`detection_outcomes`.
FP, TP, IGNORED = 0, 1, -1


# ---------------------------------------------------------------------------------------------
# TP / FP status from the evaluator's matching


def detection_outcomes(
    gt, dets, iou_thr: float = 0.5, max_dets: int = 300, device=None, iou_type: str = "bbox"
) -> dict:
    """Status of every detection the evaluator keeps, at one IoU threshold, area range "all".

    Args: ``gt`` an LVIS / COCO json path or dict, or a loaded :class:`GroundTruth`; ``dets`` any
    input ``evaluate_lvis`` accepts (json path, result dicts, per-image tensor dicts) or
    :class:`DetColumns`.

    Returns dict of numpy arrays over the kept detections (input order): ``index`` (position in
    the input), ``score`` float64, ``category`` (index into ``gt.cat_ids``), ``status`` int8
    (1 TP, 0 FP, -1 ignored), and ``gt`` (the :class:`GroundTruth`). Detections the federated
    filter or the per-image cap drops are not in it.
    """
    t = _iou_index(iou_thr)
    check_iou_type(iou_type)
    device = torch.device(device or "cpu")
    gtd = gt if isinstance(gt, GroundTruth) else load_ground_truth(gt)
    cols = load_detections(dets)
    dt_geom, gt_geom = detection_geometry(iou_type, cols), gt_geometry(iou_type, gtd)
    det = sort_detections(select_detections(gtd, cols, max_dets, iou_type, dt_geom, device))
    gt_t, _ = gt_tensors(gtd, device)
    matched, matched_ig = match(det, gt_t, iou_type, dt_geom, gt_geom, device)
    m, mig = matched[t, 0], matched_ig[t, 0]
    # As the evaluator's accumulation: ignored = matched to an ignored gt, or unmatched and out of
    # the area range / of a not-exhaustive class.
    a_lo, a_hi = AREA_RNGS[0]
    unmatched_ignored = (det["area"] < a_lo) | (det["area"] > a_hi) | det["nel"]
    ignored = mig | (~m & unmatched_ignored)
    status = torch.where(
        ignored, torch.full_like(det["cat"], IGNORED), (m & ~mig).to(det["cat"].dtype)
    )
    back = torch.argsort(det["orig"])  # back to input order
    return dict(
        index=det["orig"][back].cpu().numpy(),
        score=det["score"][back].cpu().numpy(),
        category=det["cat"][back].cpu().numpy(),
        status=status[back].cpu().numpy().astype(np.int8),
        gt=gtd,
    )


def _iou_index(iou_thr: float) -> int:
    hit = np.flatnonzero(np.isclose(IOU_THRS, iou_thr))
    if hit.size != 1:
        raise ValueError(
            f"iou_thr must be one of the evaluator's thresholds "
            f"{np.round(IOU_THRS, 2).tolist()}, got {iou_thr!r}"
        )
    return int(hit[0])


def _groups(gtd: GroundTruth, train=None) -> tuple[list, np.ndarray | None]:
    """(r / c / f per class, training instance counts or None when not all known), from the
    evaluator's :func:`class_groups`."""
    cg = class_groups(gtd, train)
    inst = cg.instance_count
    if inst is not None and (np.asarray(inst) < 0).any():
        inst = None
    return cg.frequency, None if inst is None else np.asarray(inst)


# ---------------------------------------------------------------------------------------------
# D-ECE


def calibration_error(conf, correct, num_bins: int = 10, binning: str = "uniform") -> dict:
    """D-ECE / MCE of confidences ``conf`` [N] against 0/1 ``correct`` [N] (tensors or arrays).

    Returns ``{"D-ECE", "MCE", "count" [M], "confidence" [M], "precision" [M], "lo" [M],
    "hi" [M], "edges" [M+1] (uniform only)}`` (lists; the per-bin means of an empty bin are
    None; D-ECE and MCE are -1 without detections)."""
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    conf = torch.as_tensor(conf, dtype=torch.float64).reshape(-1)
    correct = torch.as_tensor(correct).reshape(-1).to(torch.float64)
    n, M = conf.shape[0], num_bins
    edges = torch.linspace(0.0, 1.0, M + 1, dtype=torch.float64)
    if binning == "uniform":
        b = torch.searchsorted(edges[1:-1].contiguous(), conf, right=False)
    else:
        srt = torch.sort(conf).values
        first = torch.searchsorted(srt, conf, right=False)  # first rank of an equal score
        b = (first * M) // max(n, 1)
    count = torch.bincount(b, minlength=M).to(torch.float64)
    s_conf = torch.zeros(M, dtype=torch.float64).index_add_(0, b, conf)
    s_corr = torch.zeros(M, dtype=torch.float64).index_add_(0, b, correct)
    lo = torch.full((M,), float("inf"), dtype=torch.float64).scatter_reduce(0, b, conf, "amin")
    hi = torch.full((M,), -float("inf"), dtype=torch.float64).scatter_reduce(0, b, conf, "amax")
    nz = count > 0
    mean_conf = torch.where(nz, s_conf / count.clamp(min=1), torch.zeros_like(s_conf))
    prec = torch.where(nz, s_corr / count.clamp(min=1), torch.zeros_like(s_corr))
    gap = (prec - mean_conf).abs()
    dece = float((count / max(n, 1) * gap).sum()) if n else -1.0
    mce = float(gap[nz].max()) if n else -1.0

    def per_bin(x):
        return [float(v) if ok else None for v, ok in zip(x.tolist(), nz.tolist())]

    out = {
        "D-ECE": dece,
        "MCE": mce,
        "count": count.long().tolist(),
        "confidence": per_bin(mean_conf),
        "precision": per_bin(prec),
        "lo": per_bin(lo),
        "hi": per_bin(hi),
    }
    if binning == "uniform":
        out["edges"] = edges.tolist()
    return out


def _group_masks(category: np.ndarray, freq: Sequence, instance_count) -> dict:
    freq_arr = np.array([f or "" for f in freq])
    masks = {"all": np.ones(category.shape[0], bool)}
    for g in FREQ_GROUPS:
        masks[g] = freq_arr[category] == g if category.size else np.zeros(0, bool)
    if instance_count is not None:
        bins = coco_lt_bins(instance_count)
        for i, name in enumerate(COCO_LT_BIN_NAMES):
            masks[name[2:]] = bins[category] == i if category.size else np.zeros(0, bool)
    return masks


def _key(metric: str, group: str) -> str:
    return metric if group == "all" else f"{metric}_{group}"


def evaluate_calibration(
    gt,
    dets,
    iou_thr: float = 0.5,
    num_bins: int = 10,
    binning: str = "uniform",
    max_dets: int = 300,
    device=None,
    train=None,
    min_score: float = 0.0,
    iou_type: str = "bbox",
) -> dict:
    """D-ECE and MCE overall, per r / c / f group and per COCO-LT bin, with reliability data.

    Args: as ``evaluate_lvis`` (``gt`` json path or dict; ``dets`` a result json path, result
    dicts or per-image tensor dicts; ``max_dets`` per image; ``train`` training json for the
    class groups of COCO-format gt), plus ``iou_thr`` (TP threshold, one of 0.50:0.05:0.95),
    ``num_bins`` and ``binning`` (``"uniform"`` or ``"equal_mass"``), ``min_score``: only
    detections scoring above it are binned (Kueppers et al. use 0.3; Dave et al.'s ``min_score``;
    default 0: every detection the evaluator counts). Matching still sees every detection, so a
    detection's status does not depend on ``min_score``.

    Returns: ``D-ECE``, ``MCE``, ``D-ECE_r`` / ``_c`` / ``_f``, ``MCE_r`` ..., ``D-ECE_1`` ..
    ``D-ECE_4`` (COCO-LT bins, when training instance counts are known); ``num_dets`` /
    ``num_tp`` per group (``{group: n}``, detections counted, ignored ones excluded),
    ``num_ignored``, ``reliability`` ``{group: calibration_error(...) per-bin data}`` and the
    settings ``iou_thr``, ``num_bins``, ``binning``. -1 = undefined (no detection in the group).
    """
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
    if (
        device is None
        and isinstance(dets, (list, tuple))
        and dets
        and isinstance(dets[0], dict)
        and isinstance(dets[0].get("boxes"), torch.Tensor)
    ):
        device = dets[0]["boxes"].device
    out = detection_outcomes(
        gt, dets, iou_thr=iou_thr, max_dets=max_dets, device=device, iou_type=iou_type
    )
    freq, instance_count = _groups(out["gt"], train)
    counted = out["status"] != IGNORED
    if min_score > 0:  # with the default every score counts, 0 included
        counted &= out["score"] > min_score
    score, cat, tp = out["score"][counted], out["category"][counted], out["status"][counted] == TP
    res: dict[str, Any] = {}
    reliability, num_dets, num_tp = {}, {}, {}
    for g, mask in _group_masks(cat, freq, instance_count).items():
        ce = calibration_error(score[mask], tp[mask], num_bins, binning)
        res[_key("D-ECE", g)] = ce["D-ECE"]
        res[_key("MCE", g)] = ce["MCE"]
        reliability[g] = ce
        num_dets[g], num_tp[g] = int(mask.sum()), int(tp[mask].sum())
    res.update(
        num_dets=num_dets,
        num_tp=num_tp,
        num_ignored=int((out["status"] == IGNORED).sum()),
        reliability=reliability,
        iou_thr=float(iou_thr),
        num_bins=num_bins,
        binning=binning,
        min_score=float(min_score),
    )
    return res


def dece_metrics(cal: dict) -> dict:
    """The scalar D-ECE / MCE entries of an :func:`evaluate_calibration` result."""
    return {k: v for k, v in cal.items() if k.startswith(("D-ECE", "MCE"))}


#: The calibration entries of a run's metrics.json (with D-ECE_1 .. _4 where AP1 .. AP4 are).
REPORT_KEYS = ("D-ECE", "D-ECE_r", "D-ECE_c", "D-ECE_f", "MCE")


def calibration_metrics(cal: dict, coco_lt_bins: bool = False) -> dict:
    """The entries of a result that go into metrics.json and the metric table: D-ECE overall
    and per r / c / f, MCE, and D-ECE per COCO-LT bin when ``coco_lt_bins``."""
    keys = list(REPORT_KEYS) + (
        [f"D-ECE_{n[2:]}" for n in COCO_LT_BIN_NAMES] if coco_lt_bins else []
    )
    return {k: float(cal[k]) for k in keys if k in cal}
