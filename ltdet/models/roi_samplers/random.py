"""`random`: torchvision's balanced random RoI sampling, with Fast R-CNN's lower IoU bound.

Torchvision's `BalancedPositiveNegativeSampler` (same random draws), plus a lower IoU bound for
negatives `bg_iou_lo` (negatives only from IoU in `[bg_iou_lo, bg_iou_thresh)`; Girshick, ICCV
2015, Sec. 2.3).
"""

from __future__ import annotations

import torch

from ltdet.spec import check_number

from .base import RoICandidates, RoISampler, RoIScorer, RoISelection, random_subset

__all__ = ["RandomRoISampler"]


class RandomRoISampler(RoISampler):
    """torchvision's balanced random sampling, with negatives restricted to IoU >= `bg_iou_lo`.

    Per image: up to `int(B * positive_fraction)` random positives, the rest of the `B` random
    negatives. The random draws are torchvision's (one `randperm` over positives, then one over
    negatives per image), so with `bg_iou_lo = 0` the same seed picks the same RoIs. An image
    without ground truth has only IoU-0 candidates, so with `bg_iou_lo > 0` it contributes no RoIs
    (as in Fast R-CNN)."""

    def __init__(
        self,
        *,
        bg_iou_lo: float = 0.0,
        batch_size_per_image: int | None = None,
        positive_fraction: float | None = None,
    ):
        super().__init__(
            batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction
        )
        check_number("sampler.bg_iou_lo", bg_iou_lo)
        self.bg_iou_lo = float(bg_iou_lo)

    def validate(self, scorer: RoIScorer) -> None:
        bg_hi = scorer.bg_iou_thresh
        if not 0.0 <= self.bg_iou_lo < bg_hi:
            raise ValueError(
                f"sampler.bg_iou_lo={self.bg_iou_lo} must be in [0, bg_iou_thresh="
                f"{bg_hi}) of the RoI head; negatives come from "
                f"[bg_iou_lo, bg_iou_thresh)"
            )

    def forward(self, scorer: RoIScorer, candidates: list[RoICandidates]) -> list[RoISelection]:
        batch, max_pos = self.budget(scorer)
        selections = []
        for cand in candidates:
            positive = torch.where(cand.labels >= 1)[0]
            negative_mask = cand.labels == 0
            if self.bg_iou_lo > 0:
                negative_mask &= cand.ious >= self.bg_iou_lo
            negative = torch.where(negative_mask)[0]
            num_pos = min(positive.numel(), max_pos)
            num_neg = min(negative.numel(), batch - num_pos)
            chosen = torch.cat([random_subset(positive, num_pos), random_subset(negative, num_neg)])
            selections.append(RoISelection(chosen.sort().values))
        return selections
