"""Greedy matching of detections to ground truth, every (image, class) group at once.

Rule (both references): per (image, class), detections in score order, at each IoU threshold,
take the unmatched non-ignored gt of highest IoU >= the threshold (equal IoU: the later gt), else
an ignored gt (gt ``ignore`` flag or area outside the range); a crowd gt can be matched any
number of times. Matching is sequential only inside a group, so the loop runs over the rank of a
detection inside its group, handling that rank in all groups, thresholds and area ranges at once
(state ``gt_matched`` [T, A, G]).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .grouping import rank_in_group
from .iou import compute_iou
from .params import AREA_RNGS, IOU_THRS


def match(
    det: dict, gt_t: dict, iou_type: str, dt_geom: Any, gt_geom: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy COCO/LVIS matching for all (image, class) groups at once.

    ``det`` tensors are sorted by (pair, -score, input order), ``gt_t`` by (pair, json order)
    (:mod:`.prepare`); the IoU of the candidate pairs comes from :func:`.iou.compute_iou` on the
    ``iou_type`` geometry. Returns ``matched`` (the references' ``dt_m != 0``) and
    ``matched_ignored`` (matched to an ignored gt) bool [T, A, N].
    """
    T, A = len(IOU_THRS), len(AREA_RNGS)
    N, G = det["pair"].shape[0], gt_t["pair"].shape[0]
    matched = torch.zeros(T, A, N, dtype=torch.bool, device=device)
    matched_ig = torch.zeros(T, A, N, dtype=torch.bool, device=device)
    if N == 0 or G == 0:
        return matched, matched_ig
    # Candidate (det, gt) pairs: same (image, class), IoU >= the lowest threshold.
    gpairs, gcounts = torch.unique_consecutive(gt_t["pair"], return_counts=True)
    gstart = torch.cumsum(gcounts, 0) - gcounts
    pos = torch.searchsorted(gpairs, det["pair"]).clamp(max=gpairs.shape[0] - 1)
    has = gpairs[pos] == det["pair"]
    n_g = torch.where(has, gcounts[pos], torch.zeros_like(gcounts[pos]))
    d_rep = torch.repeat_interleave(torch.arange(N, device=device), n_g)
    offs = torch.cumsum(n_g, 0) - n_g
    g_idx = gstart[pos][d_rep] + torch.arange(d_rep.shape[0], device=device) - offs[d_rep]
    iou = compute_iou(
        iou_type, dt_geom, gt_geom, det["orig"][d_rep], gt_t["rows"][g_idx], gt_t["crowd"][g_idx]
    )
    thrs = torch.tensor(np.minimum(IOU_THRS, 1 - 1e-10), dtype=torch.float64, device=device)
    keep = iou >= thrs.min()
    d_rep, g_idx, iou = d_rep[keep], g_idx[keep], iou[keep]
    if d_rep.numel() == 0:
        return matched, matched_ig
    # Matching is sequential only inside a group: step r handles, in every group at once, the
    # r-th detection (score order) among those that have candidates.
    cand_dets = torch.unique_consecutive(d_rep)
    step_of_det, _ = rank_in_group(det["pair"][cand_dets])
    step = torch.full((N,), -1, dtype=torch.int64, device=device)
    step[cand_dets] = step_of_det
    by_step = torch.sort(step[d_rep], stable=True)
    d_rep, g_idx, iou = d_rep[by_step.indices], g_idx[by_step.indices], iou[by_step.indices]
    bounds = torch.cumsum(torch.bincount(by_step.values), 0).tolist()

    gt_matched = torch.zeros(T, A, G, dtype=torch.bool, device=device)
    gt_ig = gt_t["ignore_area"]  # [A, G]
    crowd = gt_t["crowd"]
    # The references record a match as dt_m = gt["id"] and count "dt_m != 0" as matched
    # (lvis/eval.py:264, 358; pycocotools/cocoeval.py:295, 375): a detection that takes a gt
    # whose annotation id is 0 consumes it but is not a true positive (a FP unless ignored).
    counts_as_match = gt_t["id"] != 0
    a_ar = torch.arange(A, device=device)[None, :, None]
    t_ar = torch.arange(T, device=device)[:, None, None]
    lo = 0
    for hi in bounds:
        pd, pg, piou = d_rep[lo:hi], g_idx[lo:hi], iou[lo:hi]
        lo = hi
        ldet, inv = torch.unique_consecutive(pd, return_inverse=True)
        P, L = pd.shape[0], ldet.shape[0]
        inv3 = inv.expand(T, A, P)
        free = ~gt_matched[:, :, pg] | crowd[pg]  # crowd regions match any number of times
        cand = (piou[None, None, :] >= thrs[:, None, None]) & free  # [T, A, P]
        nig = ~gt_ig[:, pg]  # [A, P]
        # A detection prefers non-ignored gts; only without one does it take an ignored gt.
        has_nig = torch.zeros(T, A, L, dtype=torch.int32, device=device).scatter_reduce(
            2, inv3, (cand & nig).to(torch.int32), "amax"
        )
        elig = cand & (nig.to(torch.int32)[None] == has_nig.gather(2, inv3))
        iou_e = torch.where(elig, piou.expand(T, A, P), torch.full_like(piou, -1.0))
        best = torch.full((T, A, L), -1.0, dtype=torch.float64, device=device).scatter_reduce(
            2, inv3, iou_e, "amax"
        )
        # Equal IoU: the reference keeps the later gt in its (ignore-last, json) order.
        win = elig & (iou_e == best.gather(2, inv3))
        gsel = torch.where(win, pg.expand(T, A, P), torch.full_like(pg, -1))
        bestg = torch.full((T, A, L), -1, dtype=torch.int64, device=device).scatter_reduce(
            2, inv3, gsel, "amax"
        )
        ok = bestg >= 0
        g_safe = bestg.clamp(min=0)
        gt_matched[t_ar.expand_as(g_safe)[ok], a_ar.expand_as(g_safe)[ok], g_safe[ok]] = True
        matched[:, :, ldet] = ok & counts_as_match[g_safe]
        matched_ig[:, :, ldet] = ok & gt_ig[a_ar, g_safe]
    return matched, matched_ig
