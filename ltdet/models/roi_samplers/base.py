"""The RoI sampler contract: candidates in, selections out, and what a sampler may ask the head.

Label convention (torchvision's): per proposal `labels` in `[-1, C]`, -1 = ignored (IoU between
the matcher's thresholds), 0 = background, 1..C = foreground class.

A sampler is called once per training step by `LTRoIHeads.select_training_samples` as
`sampler(scorer, candidates)`: one `RoICandidates` per image (all proposals with the ground truth
appended, and their assignment), and a `RoIScorer`, the narrow view of the head a sampler gets
(the head's sampling budget and IoU threshold, the box head's logits on given RoIs, the head's
losses per RoI, box decoding). It returns one `RoISelection` per image (indices into the
candidates, plus optional classification weights of the kept RoIs). After the box head has run
with gradient on the kept RoIs, `loss_weights(scorer, class_logits, box_regression, samples)`
may return per-RoI classification weights `[N]` and per-positive box-loss weights `[P]` (PISA's
ISR-P and CARL); the head multiplies them with its own weights (mixup, LDS) and passes the
products to the losses' `weight` argument, so every sampler combines with every classification
loss. A sampler whose `extra_box_loss_key` is set (PISA with CARL: `"loss_carl"`) asks for its
box weights to define an *extra* loss term under that key instead: the head keeps the ordinary
box loss unweighted by them and adds `sum_i c_i L_box(i) / N` (mmdetection's `PISARoIHead`:
`loss_bbox` plus `carl_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ltdet.spec import check_number

__all__ = [
    "RoICandidates",
    "RoISampler",
    "RoISamples",
    "RoIScorer",
    "RoISelection",
    "matched_boxes",
    "random_subset",
]


@dataclass
class RoICandidates:
    """All candidate RoIs of one image (proposals, then ground-truth boxes) and their assignment.

    boxes [R, 4] xyxy; labels int64 [R] in [-1, C]; matched_idxs int64 [R] index of the matched
    ground truth in the image's targets (0 where the image has none); ious [R] IoU with that
    ground truth (0 where the image has none); gt_boxes [K, 4]."""

    boxes: Tensor
    labels: Tensor
    matched_idxs: Tensor
    ious: Tensor
    gt_boxes: Tensor


@dataclass
class RoISelection:
    """RoIs kept for one image: indices [S] into its `RoICandidates` and optional classification
    weights [S] of those RoIs (None = all 1)."""

    indices: Tensor
    cls_weight: Tensor | None = None


@dataclass
class RoISamples:
    """The sampled RoIs of a training batch, one tensor per image (S_i RoIs in image i).

    proposals [S_i, 4]; labels int64 [S_i] in [0, C]; matched_idxs int64 [S_i] (index into the
    image's gt, 0 for an image without gt); ious [S_i] IoU with the matched gt; regression_targets
    [S_i, 4] encoded deltas; matched_gt_boxes [S_i, 4]; gt_boxes [K_i, 4]; gt_weights [S_i] per-RoI
    mixup weights (None when no target has "weights"); cls_weights [S_i] sampler weights (None =
    all 1)."""

    proposals: list[Tensor]
    labels: list[Tensor]
    matched_idxs: list[Tensor]
    ious: list[Tensor]
    regression_targets: list[Tensor]
    matched_gt_boxes: list[Tensor]
    gt_boxes: list[Tensor]
    gt_weights: list[Tensor] | None = None
    cls_weights: list[Tensor] | None = None


@runtime_checkable
class RoIScorer(Protocol):
    """What a sampler may ask of the RoI head it serves (`LTRoIHeads.roi_scorer` makes one).

    Attributes: the head's own sampling budget, used where a sampler leaves its own None -
    `batch_size_per_image` (RoIs per image) and `positive_fraction` (torchvision's
    `fg_bg_sampler`) - and `bg_iou_thresh`, the matcher's upper IoU bound of negatives."""

    batch_size_per_image: int
    positive_fraction: float
    bg_iou_thresh: float

    def roi_logits(self, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(class_logits [sum R, cls_channels], box_regression [sum R, (C+1)*4]) of the box head
        on the given RoIs of each image of this step, without gradient and leaving every state
        (BatchNorm running statistics, stateful losses) untouched."""
        ...

    def scores(self, class_logits: Tensor) -> Tensor:
        """Scores [N, C+1] of the head's classification loss (its `activation`), with gradient."""
        ...

    def cls_loss_per_roi(self, class_logits: Tensor, labels: Tensor) -> Tensor:
        """The head's classification loss of each RoI [N], without gradient or state update."""
        ...

    def roi_loss(
        self, class_logits: Tensor, box_regression: Tensor, candidates: list[RoICandidates]
    ) -> Tensor:
        """Per-RoI training loss [sum R] (classification + box) of candidate RoIs, without
        gradient or state update; ignored candidates count as background."""
        ...

    def decode_boxes(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Boxes [P, 4] from deltas [P, 4] relative to `boxes` [P, 4] (the head's box coder)."""
        ...


def random_subset(indices: Tensor, num: int) -> Tensor:
    """`num` of `indices` in random order (one `randperm`, torchvision's sampler's draw)."""
    return indices[torch.randperm(indices.numel(), device=indices.device)[:num]]


def matched_boxes(gt_boxes: Tensor, matched_idxs: Tensor) -> Tensor:
    """The matched ground-truth box of each RoI [R, 4] (zeros for an image without gt)."""
    if gt_boxes.shape[0] == 0:
        return gt_boxes.new_zeros((matched_idxs.shape[0], 4))
    return gt_boxes[matched_idxs]


class RoISampler(nn.Module):
    """Base of the RoI samplers: `batch_size_per_image` / `positive_fraction` default to the
    head's (torchvision `RoIHeads.fg_bg_sampler`) when left None.

    A subclass writes `forward(scorer, candidates) -> list[RoISelection]`, and optionally
    `validate(scorer)` (its settings against the head's) and `loss_weights`."""

    #: whether `forward` runs the box head on candidates (`scorer.roi_logits`: needs the features)
    needs_features = False

    @property
    def extra_box_loss_key(self) -> str | None:
        """Loss-dict key of an extra box-loss term weighted by `loss_weights`' box weights (added
        to the unweighted box loss); None: the box weights multiply the box loss itself."""
        return None

    def __init__(
        self, *, batch_size_per_image: int | None = None, positive_fraction: float | None = None
    ):
        super().__init__()
        if batch_size_per_image is not None:
            check_number("sampler.batch_size_per_image", batch_size_per_image, low=1, integer=True)
        if positive_fraction is not None:
            check_number("sampler.positive_fraction", positive_fraction, low=0.0, high=1.0)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def budget(self, scorer: RoIScorer) -> tuple[int, int]:
        """(RoIs per image, largest number of positives per image)."""
        batch = self.batch_size_per_image or scorer.batch_size_per_image
        fraction = (
            self.positive_fraction
            if self.positive_fraction is not None
            else scorer.positive_fraction
        )
        return int(batch), int(batch * fraction)

    def validate(self, scorer: RoIScorer) -> None:
        """Checks the sampler against the head it is installed in; raises ValueError."""

    def loss_weights(
        self, scorer: RoIScorer, class_logits: Tensor, box_regression: Tensor, samples: RoISamples
    ) -> tuple[Tensor | None, Tensor | None]:
        """(cls weight [N] or None, box weight [P] over positives in order, or None)."""
        return None, None

    def extra_repr(self) -> str:
        return ", ".join(
            f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "training"
        )
