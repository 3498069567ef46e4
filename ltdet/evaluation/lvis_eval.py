"""LVIS-style box and mask AP, exact against the official ``lvis`` package (and ``pycocotools``
for COCO gt), and the Fixed AP / pooled AP of Dave et al. 2021.

Reference: Gupta, Dollar, Girshick, "LVIS: A Dataset for Large Vocabulary Instance
Segmentation", CVPR 2019, Sec. 5 (federated evaluation); the ``lvis`` package's ``LVISEval`` is
the reference implementation, ``pycocotools``' ``COCOeval`` for COCO-format ground truth.

Rules reproduced (LVIS ground truth, i.e. images carry ``neg_category_ids`` /
``not_exhaustive_category_ids``):
  1. keep the top ``max_dets`` detections per image across classes (ties: input order);
  2. federated filter: a detection of class c on image i is evaluated only if c has a ground-truth
     box on i or is in i's ``neg_category_ids``; all others are dropped;
  3. per (image, class), greedy matching in score order at IoU 0.50:0.05:0.95: each detection takes
     the unmatched non-ignored gt of highest IoU >= threshold (ties: the later gt), else an
     ignored gt (gt ``ignore`` flag or area outside the range); unmatched detections outside the
     area range, or of a class listed in the image's ``not_exhaustive_category_ids``, are ignored;
  4. per class: detections of all images sorted by score, cumulative TP / FP, precision made
     monotone and read at 101 recall points; classes without (non-ignored) gt are excluded;
  5. AP / AR are means over classes (and IoU thresholds, recall points); APr / APc / APf over the
     classes whose json ``frequency`` is r / c / f.
COCO ground truth (no federated fields): no federated filter, at most ``max_dets`` detections per
(image, class) as COCOeval's ``maxDets``, ``iscrowd`` gts are ignored regions (IoU = intersection
/ detection area, matchable any number of times).

``iou_type="segm"``: the same rules on masks (LVISEval / COCOeval with iou_type segm): IoU of the
RLE masks (``pycocotools.mask.iou``), gt masks from polygons / RLE as ``lvis``' ``ann_to_rle``,
a detection's area = its mask's foreground pixels (the gt's area stays the json ``area``).

``protocol="fixed"`` (Dave, Dollar, Ramanan, Kirillov, Girshick, "Evaluating Large-Vocabulary
Object Detectors: The Devil is in the Details", 2021; their scripts/evaluate_ap_fixed.py): rule 1
becomes "keep the top ``dets_per_class`` detections of each class over the whole set (ties: input
order), no per-image cap"; everything else is LVIS's. It also reports pooled AP (their
evaluate_ap_pooled.py / ``LVISPooledEval``): one precision-recall curve over the detections of all
classes (and of the r / c / f classes), averaged over the IoU thresholds, area ``all``.

Phases, one module each (as lvis-api's LVISEval): :mod:`.ground_truth` (gt columns, categories,
federated lists, class groups), :mod:`.results_io` (detection columns), :mod:`.prepare` (ids,
caps, filters, sorted tensors), :mod:`.iou` (the ``compute_iou(iou_type)`` seam), :mod:`.matching`,
:mod:`.accumulate`, :mod:`.summary`. Everything runs in float64 with the reference's operation
order, so results are bit-for-bit the reference's up to summation order in the final means.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from ltdet.frequency import FREQ_GROUPS

from .accumulate import accumulate
from .ground_truth import (
    ClassGroups,
    GroundTruth,
    GroundTruthFormatError,
    class_groups,
    load_ground_truth,
)
from .iou import check_iou_type, detection_geometry, gt_geometry
from .matching import match
from .prepare import gt_tensors, select_detections, sort_detections
from .results_io import DetColumns, load_detections
from .summary import mean_valid, summarize

__all__ = [
    "GroundTruthFormatError",
    "PROTOCOLS",
    "evaluate_arrays",
    "evaluate_lvis",
    "match_detections",
]

PROTOCOLS = ("standard", "fixed")

logger = logging.getLogger(__name__)


def evaluate_arrays(
    gt: GroundTruth,
    cols: DetColumns,
    max_dets: int = 300,
    device: torch.device | str | None = None,
    iou_type: str = "bbox",
) -> tuple[np.ndarray, np.ndarray]:
    """Core: returns (precision [T, A, K] averaged over the 101 recall points, recall [T, A, K])
    as float64 numpy arrays; -1 marks classes without gt in that area range."""
    device = torch.device(device or "cpu")
    det, matched, matched_ig, num_gt = match_detections(gt, cols, max_dets, device, iou_type)
    prec, recall = accumulate(det, matched, matched_ig, num_gt, len(gt.cat_ids), device)
    return prec.cpu().numpy(), recall.cpu().numpy()


def match_detections(
    gt: GroundTruth,
    cols: DetColumns,
    max_dets: int = 300,
    device: torch.device | str | None = None,
    iou_type: str = "bbox",
    protocol: str = "standard",
    dets_per_class: int = 10000,
) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lvis-api's ``evaluate`` phase: the kept detections (:func:`.prepare.select_detections`'
    columns, sorted by :func:`.prepare.sort_detections`), ``matched`` / ``matched_ignored`` bool
    [T, A, N] in that order, and the number of non-ignored gts int64 [A, K]."""
    device = torch.device(device or "cpu")
    dt_geom, gt_geom = detection_geometry(iou_type, cols), gt_geometry(iou_type, gt)
    det = sort_detections(
        select_detections(gt, cols, max_dets, iou_type, dt_geom, device, protocol, dets_per_class)
    )
    gt_t, num_gt = gt_tensors(gt, device)
    matched, matched_ig = match(det, gt_t, iou_type, dt_geom, gt_geom, device)
    return det, matched, matched_ig, num_gt


def pooled_ap(
    det: dict,
    matched: torch.Tensor,
    matched_ig: torch.Tensor,
    num_gt: torch.Tensor,
    groups: ClassGroups,
    device: torch.device,
) -> dict:
    """APpool over all classes and over each r / c / f group (-1: no gt in the pool)."""
    freq = np.array([f or "" for f in groups.frequency])
    # A class is in "all" and in at most one group: two passes of the accumulation ("all"; then
    # the r / c / f groups, which are disjoint; -1: a class in no group).
    res = {}
    group_of = torch.full((len(freq),), -1, dtype=torch.int64)
    for p, g in enumerate(FREQ_GROUPS):
        group_of[torch.from_numpy(freq == g)] = p
    group_of = group_of.to(device)
    for keys, pool_of_cat in (
        (["APpool"], torch.zeros_like(group_of)),
        ([f"APpool{g}" for g in FREQ_GROUPS], group_of),
    ):
        n = len(keys)
        gt_pool = torch.zeros(num_gt.shape[0], n, dtype=num_gt.dtype, device=device)
        inside = pool_of_cat >= 0
        gt_pool.index_add_(1, pool_of_cat[inside], num_gt[:, inside])
        prec, _ = accumulate(
            det, matched, matched_ig, gt_pool, n, device, pool=pool_of_cat[det["cat"]]
        )
        prec_np = prec.cpu().numpy()
        for j, k in enumerate(keys):
            res[k] = mean_valid(prec_np[:, 0, j])
    return res


def evaluate_lvis(
    gt: str | os.PathLike | dict,
    dets: Any,
    iou_type: str = "bbox",
    max_dets: int = 300,
    device: torch.device | str | None = None,
    train: str | os.PathLike | dict | None = None,
    protocol: str = "standard",
    dets_per_class: int = 10000,
) -> dict:
    """LVIS-style (or, for COCO-format ``gt``, COCOeval-style) box or mask AP.

    Args:
        gt: LVIS v1 / COCO json path or loaded dict (``segm``: annotations carry
            ``segmentation`` polygons or RLE, images ``height`` / ``width``).
        dets: result json path, list of result dicts (``image_id, category_id, bbox xywh,
            score``; ``segm``: ``segmentation`` compressed RLE ``{"size", "counts"}``) or list of
            per-image tensor dicts ``{"image_id", "boxes" [K, 4] xyxy in original image
            coordinates, "scores" [K], "category_ids" [K]}`` (``segm``: ``"masks"``
            [K, 1, H, W] in original image pixels, probabilities thresholded at 0.5).
        iou_type: one of :data:`.iou.IOU_TYPES` (``"bbox"``, ``"segm"``).
        max_dets: per image across classes (LVIS) / per (image, class) (COCO maxDets); not used
            by ``protocol="fixed"``.
        device: torch device for matching and accumulation (default: the input tensors' device,
            else CPU).
        train: training json (path or dict) giving per-class training counts; for COCO gt it
            defines r / c / f (LVIS thresholds on image counts) and the COCO-LT bins AP1-AP4
            (training instances [1, 20), [20, 400), [400, 8000), [8000, inf)).
        protocol: ``"standard"`` (the references) or ``"fixed"`` (Fixed AP: the top
            ``dets_per_class`` detections of each class over the whole set, no per-image cap;
            adds pooled AP).
        dets_per_class: K of ``protocol="fixed"`` (10,000 for LVIS, as the paper).

    Returns:
        dict with AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AP50r, AP50c, AP50f,
        AR@{max_dets}, ARs@, ARm@, ARl@ (floats; -1 where undefined, as in the reference; with
        ``protocol="fixed"`` the AR keys are ``AR@-1`` ..., lvis' label for "no per-image
        limit"), AP1-AP4 for COCO gt with ``train``, ``iou_type``, ``protocol`` (and
        ``dets_per_class`` and APpool, APpoolr, APpoolc, APpoolf for ``"fixed"``), and
        ``per_class``: list of {id, name, frequency, image_count, instance_count, AP, AP50
        (None when the class has no gt)}.
    """
    check_iou_type(iou_type)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not isinstance(max_dets, int) or isinstance(max_dets, bool) or max_dets <= 0:
        raise ValueError(f"max_dets must be a positive int, got {max_dets!r}")
    if (
        not isinstance(dets_per_class, int)
        or isinstance(dets_per_class, bool)
        or dets_per_class <= 0
    ):
        raise ValueError(f"dets_per_class must be a positive int, got {dets_per_class!r}")
    if device is None and isinstance(dets, (list, tuple)) and dets and isinstance(dets[0], dict):
        t = dets[0].get("masks" if iou_type == "segm" else "boxes")
        if isinstance(t, torch.Tensor):
            device = t.device
    gtd = load_ground_truth(gt, iou_type)
    cols = load_detections(dets, iou_type=iou_type)
    device = torch.device(device or "cpu")
    det, matched, matched_ig, num_gt = match_detections(
        gtd, cols, max_dets, device, iou_type, protocol, dets_per_class
    )
    prec, recall = accumulate(det, matched, matched_ig, num_gt, len(gtd.cat_ids), device)
    groups = class_groups(gtd, train)
    fixed = protocol == "fixed"
    res = summarize(
        prec.cpu().numpy(),
        recall.cpu().numpy(),
        gtd.categories,
        groups,
        -1 if fixed else max_dets,
        gtd.is_lvis,
    )
    res["iou_type"], res["protocol"] = iou_type, protocol
    if fixed:
        res["dets_per_class"] = dets_per_class
        res.update(pooled_ap(det, matched, matched_ig, num_gt, groups, device))
        counts = (
            np.bincount(np.searchsorted(gtd.cat_ids, cols.category_id), minlength=len(gtd.cat_ids))
            if len(cols)
            else np.zeros(len(gtd.cat_ids), np.int64)
        )
        n_short = int((counts < dets_per_class).sum())
        if n_short:
            logger.warning(
                "Fixed AP: %d of %d classes have fewer than %d detections; AP is lower than the "
                "detector's (output the top %d per class over the set, e.g. test.topk_per_class)",
                n_short,
                len(gtd.cat_ids),
                dets_per_class,
                dets_per_class,
            )
    logger.info(
        "evaluated %d detections on %d images, %d classes (%s, %s): AP %.4f",
        len(cols),
        len(gtd.img_ids),
        len(gtd.cat_ids),
        iou_type,
        protocol,
        res["AP"],
    )
    return res
