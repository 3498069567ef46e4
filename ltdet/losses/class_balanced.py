"""Class-balanced loss (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
CVPR 2019, Sec. 4): the loss of a sample of class y is multiplied by `w_y`, the class-balanced
weight of its ground-truth class (`ltdet.imbalance.class_balanced_weights`, normalised to sum C).

Shapes: logits `[N, C+1]` (column 0 = background), labels `[N]` in `[0, C]`. The paper has no
background class; a background RoI keeps weight 1 (the mean of the normalised class weights), so
re-weighting only re-distributes the foreground loss between classes.

`base` picks the underlying loss, exactly as in the paper's three variants:
* `ce`: softmax CE over C+1 columns, per-element loss `[N]`;
* `sigmoid`: BCE over the C foreground columns (column 0 gets no gradient), loss `[N, C+1]`;
* `focal`: sigmoid focal loss on the foreground columns, loss `[N, C+1]`.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..imbalance.class_weights import CB_MODES, class_balanced_weights
from .base import (
    ClassificationLoss,
    ClassStatsLike,
    classes_from_stats,
    foreground_targets,
    pad_background,
    sigmoid_scores,
    softmax_scores,
)
from .cross_entropy import cross_entropy
from .focal import focal_loss

CB_BASES = ("ce", "sigmoid", "focal")
CB_COUNTS = ("instance", "image")


def sigmoid_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-element BCE `[N, C+1]` on the foreground columns; column 0 identically zero."""
    target = foreground_targets(labels, logits.shape[1] - 1, logits.dtype)
    return pad_background(
        F.binary_cross_entropy_with_logits(logits[:, 1:], target, reduction="none")
    )


def class_balanced_loss(
    logits: Tensor,
    labels: Tensor,
    column_weights: Tensor,
    base: str = "ce",
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Per-element class-balanced loss; `column_weights [C+1]` = (1, w_1, ..., w_C)."""
    sample_weight = column_weights[labels]
    if base == "ce":
        return cross_entropy(logits, labels) * sample_weight
    if base == "sigmoid":
        loss = sigmoid_cross_entropy(logits, labels)
    else:
        loss = focal_loss(logits, labels, alpha, gamma)
    return loss * sample_weight.unsqueeze(1)


class ClassBalancedLoss(ClassificationLoss):
    """Class-balanced re-weighting of CE, sigmoid CE or focal loss.

    Args:
        stats: class statistics (ClassStats): counts per class.
        base: "ce" | "sigmoid" | "focal".
        mode: "effective" (with `beta`) | "inverse" | "sqrt_inverse".
        beta: effective-number hyper-parameter (0.999; the paper sweeps 0.99 - 0.9999).
        count: "instance" (number of training boxes of the class, the paper's n_y) or "image".
        alpha, gamma: focal-loss parameters, used only with `base="focal"`.
    """

    # buffers (registered in __init__), annotated for type checkers
    column_weights: Tensor

    def __init__(
        self,
        *,
        stats: ClassStatsLike,
        num_classes: Optional[int] = None,
        base: str = "ce",
        mode: str = "effective",
        beta: float = 0.999,
        count: str = "instance",
        alpha: float = 0.25,
        gamma: float = 2.0,
        loss_weight: float = 1.0,
    ):
        super().__init__(
            num_classes=classes_from_stats(stats, num_classes), loss_weight=loss_weight
        )
        if base not in CB_BASES:
            raise ValueError(f"cb: base must be one of {CB_BASES}, got {base!r}")
        if mode not in CB_MODES:
            raise ValueError(f"cb: mode must be one of {CB_MODES}, got {mode!r}")
        if count not in CB_COUNTS:
            raise ValueError(f"cb: count must be one of {CB_COUNTS}, got {count!r}")
        self.base, self.mode, self.beta, self.count = base, mode, float(beta), count
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.use_sigmoid = base != "ce"
        counts = stats.instance_count if count == "instance" else stats.image_count
        weights = class_balanced_weights(
            torch.as_tensor(counts, dtype=torch.float32), mode, self.beta
        )
        # Derived from the statistics, not learned: rebuilt on construction, not checkpointed.
        self.register_buffer(
            "column_weights", torch.cat([weights.new_ones(1), weights]), persistent=False
        )

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        # module-level score functions (not the other base class's method): TorchScript compiles
        # this
        if self.use_sigmoid:
            return sigmoid_scores(logits)
        return softmax_scores(logits)

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return class_balanced_loss(
            logits, labels, self.column_weights.to(logits.dtype), self.base, self.alpha, self.gamma
        )
