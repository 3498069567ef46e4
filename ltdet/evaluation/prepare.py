"""Detections and ground truth as sorted tensor columns, ready for matching (lvis-api's
``_prepare``): id validation, the per-image (LVIS) or per-(image, class) (COCO) cap - or, for
``protocol="fixed"``, the top detections of each class over the whole set -, the federated
filter, LVIS's ``0 < area`` filter, and the area-range ignore flags of the gt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .ground_truth import GroundTruth, index_of
from .grouping import group_sizes, pair_lookup, rank_in_group, stable_order
from .iou import InvalidGeometry, detection_area, detection_size
from .params import AREA_RNGS
from .results_io import DetColumns, DetectionFormatError


def select_detections(
    gt: GroundTruth,
    cols: DetColumns,
    max_dets: int,
    iou_type: str,
    dt_geom: Any,
    device: torch.device,
    protocol: str = "standard",
    dets_per_class: int = 10000,
) -> dict:
    """Validate ids, apply the cap and the federated filter. Returns tensors on ``device`` for
    the kept detections, in input order: ``orig`` (row in ``cols``), ``img`` / ``cat`` (indices
    into the gt's ids), ``pair`` (``img * K + cat``), ``score``, ``area``, ``nel`` (class not
    exhaustively annotated on the image)."""
    K = len(gt.cat_ids)

    def describe(i):
        return f"{cols.source}: detection #{i} {cols.entry(i)}"

    img = index_of(gt.img_ids, cols.image_id, "image_id", describe, DetectionFormatError)
    cat = index_of(gt.cat_ids, cols.category_id, "category_id", describe, DetectionFormatError)
    size = detection_size(iou_type, dt_geom)
    if size is not None and len(img):
        assert gt.img_hw is not None  # segm ground truth always records image sizes
        bad = np.flatnonzero((size != gt.img_hw[img]).any(axis=1))
        if bad.size:
            i = int(bad[0])
            raise DetectionFormatError(
                f"{describe(i)}: mask size [height, width] {size[i].tolist()} differs from its "
                f"image's {gt.img_hw[img[i]].tolist()} ({bad.size} such entries); masks must be "
                f"in original image pixels (paste them into the full image, as torchvision's "
                f"postprocess does)"
            )
    t_img = torch.from_numpy(img).to(device)
    t_cat = torch.from_numpy(cat).to(device)
    score = torch.from_numpy(cols.score).to(device)
    pair = t_img * K + t_cat
    if protocol == "fixed":
        # Dave et al. 2021 (evaluate_ap_fixed): the top dets_per_class of each class over the
        # whole set (sorted by score, stable), no per-image cap.
        group, cap, n_groups = t_cat, dets_per_class, K
    else:
        # LVISResults caps per image (sorted by score, stable); COCOeval per (image, class).
        group, cap, n_groups = (
            (t_img, max_dets, len(gt.img_ids))
            if gt.is_lvis
            else (pair, max_dets, len(gt.img_ids) * K)
        )
    keep = torch.arange(pair.shape[0], device=device)
    if pair.numel() and int(group_sizes(group, n_groups).max()) > cap:
        order = stable_order(-score, group)
        rank, _ = rank_in_group(group[order])
        keep = torch.sort(order[rank < cap]).values
    if gt.is_lvis:
        pos_pairs = torch.from_numpy(gt.ann_img * K + gt.ann_cat).to(device)
        allowed = pair_lookup(
            torch.cat([pos_pairs, torch.from_numpy(gt.neg_pairs).to(device)]), len(gt.img_ids) * K
        )
        keep = keep[allowed(pair[keep])]
        nel = pair_lookup(
            torch.from_numpy(gt.not_exhaustive_pairs).to(device), len(gt.img_ids) * K
        )(pair[keep])
    else:
        nel = torch.zeros(keep.shape[0], dtype=torch.bool, device=device)
    try:
        area = detection_area(iou_type, dt_geom, keep)
    except InvalidGeometry as e:
        i = int(keep[e.index])
        raise DetectionFormatError(f"{describe(i)}: {e.why} ({e.count} such entries)") from None
    if gt.is_lvis:
        # LVISEval._prepare loads the detections through get_ann_ids(img_ids, cat_ids) as well,
        # which keeps only 0 < area < inf (lvis/lvis.py:85-96, lvis/eval.py:67-69): a zero-width
        # or zero-height detection is dropped (not a false positive). It still counted towards
        # the per-image cap above (LVISResults caps first, results.py:39-40). COCOeval keeps it.
        ok = (area > 0) & (area < float("inf"))
        if not bool(ok.all()):
            keep, area, nel = keep[ok], area[ok], nel[ok]
    return dict(
        orig=keep,
        img=t_img[keep],
        cat=t_cat[keep],
        pair=pair[keep],
        score=score[keep],
        area=area,
        nel=nel,
    )


def sort_detections(det: dict) -> dict:
    """Detections grouped by (image, class) pair, score descending inside a group, ties in input
    order (``det["orig"]`` is ascending already): the order matching walks them in."""
    order = stable_order(-det["score"], det["pair"])
    return {k: v[order] for k, v in det.items()}


def gt_tensors(gt: GroundTruth, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Gt columns sorted by (pair, json order) and the number of non-ignored gts per area range
    and class, int64 [A, K]. ``rows`` maps a sorted position to the gt's row (its geometry);
    ``ignore_area`` [A, G] is the gt ``ignore`` flag or an area outside the range."""
    K = len(gt.cat_ids)
    g_pair = torch.from_numpy(gt.ann_img * K + gt.ann_cat).to(device)
    g_order = stable_order(g_pair)
    g_area = torch.from_numpy(gt.ann_area).to(device)[g_order]
    g_ign = torch.from_numpy(gt.ann_ignore).to(device)[g_order]
    lo = torch.tensor([r[0] for r in AREA_RNGS], dtype=torch.float64, device=device)[:, None]
    hi = torch.tensor([r[1] for r in AREA_RNGS], dtype=torch.float64, device=device)[:, None]
    gt_t = dict(
        pair=g_pair[g_order],
        rows=g_order,
        crowd=torch.from_numpy(gt.ann_crowd).to(device)[g_order],
        id=torch.from_numpy(gt.ann_id).to(device)[g_order],
        ignore_area=g_ign[None] | (g_area[None] < lo) | (g_area[None] > hi),  # [A, G]
    )
    g_cat = torch.from_numpy(gt.ann_cat).to(device)[g_order]
    num_gt = torch.zeros(len(AREA_RNGS), K, dtype=torch.int64, device=device).scatter_add(
        1, g_cat.expand(len(AREA_RNGS), -1), (~gt_t["ignore_area"]).long()
    )
    return gt_t, num_gt
