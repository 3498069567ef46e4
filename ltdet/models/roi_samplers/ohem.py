"""`ohem`: online hard example mining (Shrivastava et al., CVPR 2016, Sec. 4)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import nms

from ltdet.spec import check_number

from .base import RoICandidates, RoISampler, RoIScorer, RoISelection

__all__ = ["OHEMRoISampler", "ohem_select"]


def ohem_select(
    loss: Tensor,
    labels: Tensor,
    boxes: Tensor,
    batch_size: int,
    max_positives: int,
    nms_thresh: float | None = 0.7,
) -> Tensor:
    """Indices (ascending) of the hardest RoIs of one image (OHEM, Shrivastava et al. 2016, Sec. 4).

    loss [R] per-RoI loss; labels [R] in [-1, C] (-1 never kept); boxes [R, 4]. Optionally NMS at
    `nms_thresh` over the candidates with their loss as score (drops near-duplicates whose losses
    are correlated); then, in decreasing loss, positives beyond the `max_positives` hardest are
    skipped and the first `batch_size` remaining RoIs are kept."""
    valid = torch.where(labels >= 0)[0]
    if nms_thresh is not None:
        # nms returns the kept indices in decreasing score (= loss) order
        order = valid[nms(boxes[valid].float(), loss[valid].float(), float(nms_thresh))]
    else:
        order = valid[torch.sort(loss[valid], descending=True, stable=True).indices]
    is_pos = labels[order] > 0
    positive_rank = torch.cumsum(is_pos, 0) - 1
    eligible = order[~is_pos | (positive_rank < max_positives)]
    return eligible[:batch_size].sort().values


class OHEMRoISampler(RoISampler):
    """Online hard example mining (Shrivastava et al., CVPR 2016).

    The box head runs without gradient on every candidate (all proposals plus the ground truth);
    each one's loss (classification + box, the head's own losses, reduction none) ranks it; after
    an optional NMS at `nms_thresh` (None disables it) the `batch_size_per_image` hardest are kept,
    with at most `positive_fraction` of them positive; only those go through the training forward.
    """

    needs_features = True

    def __init__(
        self,
        *,
        nms_thresh: float | None = 0.7,
        batch_size_per_image: int | None = None,
        positive_fraction: float | None = None,
    ):
        super().__init__(
            batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction
        )
        if nms_thresh is not None:
            check_number(
                "sampler.nms_thresh (or None)", nms_thresh, low=0.0, high=1.0, low_open=True
            )
        self.nms_thresh = None if nms_thresh is None else float(nms_thresh)

    def forward(self, scorer: RoIScorer, candidates: list[RoICandidates]) -> list[RoISelection]:
        batch, max_pos = self.budget(scorer)
        class_logits, box_regression = scorer.roi_logits([c.boxes for c in candidates])
        losses = scorer.roi_loss(class_logits, box_regression, candidates)
        sizes = [c.boxes.shape[0] for c in candidates]
        return [
            RoISelection(ohem_select(loss, c.labels, c.boxes, batch, max_pos, self.nms_thresh))
            for loss, c in zip(losses.split(sizes), candidates)
        ]
