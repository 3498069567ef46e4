"""Per-class precision / recall from the matches (lvis-api's ``accumulate``).

Detections of all images sorted by score per class, cumulative TP / FP as segmented cumulative
sums, precision made monotone and read at the 101 recall points: "precision at recall >= r" is a
scatter-max into the recall buckets followed by a suffix max. Classes without (non-ignored) gt
get -1.

Pooled AP (Dave et al. 2021, ``LVISPooledEval.accumulate`` in their eval_wrapper.py) is the same
computation with a pool of classes in place of a class: the detections of all classes of the
pool in one ranking (ties: image order, then class order, then the per-(image, class) order), the
non-ignored gts of all its classes as positives.
"""

from __future__ import annotations

import torch

from .grouping import rank_in_group, stable_order
from .params import AREA_RNGS, EPS, IOU_THRS, REC_THRS


def accumulate(
    det: dict,
    matched: torch.Tensor,
    matched_ig: torch.Tensor,
    num_gt: torch.Tensor,
    num_cats: int,
    device: torch.device,
    pool: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class precision averaged over the R recall points [T, A, K] and recall [T, A, K]
    (-1 where a class has no gt). With ``pool`` (int64 [N], the pool of each detection, -1: in
    none), the same per pool: ``num_gt`` [A, num_cats] then holds each pool's gts and
    ``num_cats`` is the number of pools."""
    T, A, R, K = len(IOU_THRS), len(AREA_RNGS), len(REC_THRS), num_cats
    lo = torch.tensor([r[0] for r in AREA_RNGS], dtype=torch.float64, device=device)
    hi = torch.tensor([r[1] for r in AREA_RNGS], dtype=torch.float64, device=device)
    area = det["area"][None, :]
    ignored_if_unmatched = (area < lo[:, None]) | (area > hi[:, None]) | det["nel"][None, :]
    # The references' dt_ig = gt_ig[m] if matched, or (dt_m == 0) & out of range / not exhaustive.
    tp = matched & ~matched_ig  # [T, A, N]
    fp = ~matched & ~matched_ig & ~ignored_if_unmatched[None]
    if pool is None:
        # Reference order: class, score descending, image order, input order.
        order = stable_order(det["orig"], det["img"], -det["score"], det["cat"])
        cat = det["cat"][order]
    else:
        # LVISPooledEval: per pool, (image, class, per-image order) concatenated, then a stable
        # sort by descending score.
        inside = torch.nonzero(pool >= 0).flatten()
        order = inside[
            stable_order(
                det["orig"][inside],
                det["cat"][inside],
                det["img"][inside],
                -det["score"][inside],
                pool[inside],
            )
        ]
        cat = pool[order]
    tp, fp = tp[:, :, order], fp[:, :, order]
    _, seg_start = rank_in_group(cat)
    tp_cum = torch.cumsum(tp, 2, dtype=torch.int32)
    fp_cum = torch.cumsum(fp, 2, dtype=torch.int32)
    # Interpolated precision at recall r = max precision over positions with recall >= r. Only
    # true positives can attain it: after a FP or an ignored detection the recall is unchanged
    # and the precision is not higher. So: precision / recall at the TP positions, scatter-max
    # into the bucket of the highest recall point <= recall, then a suffix max over buckets.
    t_i, a_i, n_i = tp.nonzero(as_tuple=True)
    s0 = seg_start[n_i]
    tp_at = tp_cum[t_i, a_i, n_i] - tp_cum[t_i, a_i, s0] + tp[t_i, a_i, s0]
    fp_at = fp_cum[t_i, a_i, n_i] - fp_cum[t_i, a_i, s0] + fp[t_i, a_i, s0]
    c_at = cat[n_i]
    tpf, fpf = tp_at.to(torch.float64), fp_at.to(torch.float64)
    rc = tpf / num_gt[a_i, c_at].clamp(min=1).to(torch.float64)
    pr = tpf / (fpf + tpf + EPS)
    rec = torch.tensor(REC_THRS, dtype=torch.float64, device=device)
    bucket = torch.searchsorted(rec, rc, right=True) - 1
    tak = (t_i * A + a_i) * K + c_at
    # Only (threshold, area, class) rows with a TP have non-zero precision: compact them.
    rows, row_of = torch.unique(tak, return_inverse=True)
    curve = (
        torch.zeros(rows.shape[0] * R, dtype=torch.float64, device=device)
        .scatter_reduce(0, row_of * R + bucket, pr, "amax")
        .view(-1, R)
    )
    curve = curve.flip(1).cummax(1).values.flip(1)
    prec = torch.zeros(T * A * K, dtype=torch.float64, device=device)
    prec[rows] = curve.mean(1)
    prec = prec.view(T, A, K)
    tp_total = torch.bincount(tak, minlength=T * A * K).view(T, A, K).to(torch.float64)
    valid = (num_gt > 0)[None]  # [1, A, K]
    recall = torch.where(valid, tp_total / num_gt.clamp(min=1)[None], torch.full_like(tp_total, -1))
    prec = torch.where(valid, prec, torch.full_like(prec, -1))
    return prec, recall
