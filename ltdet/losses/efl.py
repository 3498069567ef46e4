"""Equalized Focal Loss, EFL (Li et al., "Equalized Focal Loss for Dense Long-Tailed Object
Detection", CVPR 2022, Sec. 3), and its quality variant EQFL (the authors' ModelTC/EOD).

Sigmoid focal loss on the foreground columns 1..C of `[N, C+1]` logits (column 0 = background,
never trained: exact zero loss and gradient; a background anchor is all-negative), with a focusing
factor and a weighting factor per class j:

    gamma_j = gamma_b + s (1 - g_j)                 (focusing factor)
    EFL = -sum_j alpha_t (gamma_j / gamma_b) (1 - p_t)^gamma_j log(p_t)

`gamma_b = 2, s = 8, alpha = 0.25`. `g_j` is the accumulated positive / negative gradient ratio
of class j, clipped to [0, 1]: `g_j = clamp(G+_j / (G-_j + 1e-10), 0, 1)`, with `G+_j` / `G-_j`
the sums of `|dL/dz_ij|` (the gradient of the weighted loss: the caller's weight times the
closed-form derivative of the element, the factors held constant as the authors detach them) over
the positive / negative elements of column j, summed over all ranks. `g` starts at 1, so the first
step is the plain focal loss; a class without positives yet has `g_j = 0` (`gamma_j = 10`).

EQFL replaces the focal term by QFL's (`ltdet.losses.gfl`): `(gamma_j / gamma_b) BCE(z, y)
|sigmoid(z) - y|^gamma_j` with the soft quality target `y` (no alpha); its statistics are the same,
positives being the labelled columns.

The authors collect `|dL/dz|` with a backward hook on the classifier's output; their notes name
the closed form (EQLv2's way) as the equivalent, which is what is used here: the statistics are
updated in `forward`, in training mode only, from detached values, after the loss of the step has
been computed with the previous state, and the same closed-form gradient is the backward pass.
State: buffers `pos_grad`, `neg_grad`, `pos_neg` `[C]`. Scores: `sigmoid(z_j)`.

Shapes: logits `[N, C+1]`, labels `[N]` in `[0, C]` (EQFL: or `(labels, quality [N])`);
per-element loss `[N, C+1]`.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..collectives import all_reduce_sum
from .base import SigmoidClassificationLoss, foreground_targets, pad_background
from .gfl import (
    QualityTarget,
    _ClosedFormGradient,
    quality_focal_elements,
    quality_targets,
    split_quality_target,
)

__all__ = [
    "EqualizedFocalLoss",
    "EqualizedQualityFocalLoss",
    "equalized_focal_elements",
    "focusing_factors",
]


def focusing_factors(pos_neg: Tensor, gamma_b: float, scale: float) -> Tuple[Tensor, Tensor]:
    """Focusing factors `gamma_j = gamma_b + s (1 - g_j)` and weighting factors
    `gamma_j / gamma_b`, both `[C]`."""
    gamma = gamma_b + scale * (1.0 - pos_neg)
    return gamma, gamma / gamma_b


def equalized_focal_elements(
    logits_fg: Tensor, target: Tensor, gamma: Tensor, factor: Tensor, alpha: float
) -> Tuple[Tensor, Tensor]:
    """`alpha_t * factor_j * (1 - p_t)^gamma_j * CE(p_t)` `[N, C]` (binary targets) and its
    gradient w.r.t. `z`, `-/+ alpha_t factor (1 - p_t)^gamma ((1 - p_t) - gamma p_t log p_t)`
    (minus on positives). Computed in at least float32; the loss carries the closed-form
    gradient, which is also returned detached."""
    dtype = torch.promote_types(logits_fg.dtype, torch.float32)
    with torch.no_grad():
        z = logits_fg.detach().to(dtype)
        y = target.to(dtype)
        gamma, factor = gamma.to(dtype), factor.to(dtype)
        ce = F.binary_cross_entropy_with_logits(z, y, reduction="none")  # -log p_t
        one_minus_pt = -torch.expm1(-ce)  # 1 - p_t, exact as p_t -> 1
        if alpha >= 0:
            pos, neg = alpha * factor, (1.0 - alpha) * factor  # alpha_t folded into [C]
        else:
            pos = neg = factor
        coef = (neg + y * (pos - neg)) * one_minus_pt.pow(gamma)
        loss = coef * ce
        grad = (1.0 - 2.0 * y) * coef * (one_minus_pt + gamma * (1.0 - one_minus_pt) * ce)
    if logits_fg.requires_grad:
        loss = _ClosedFormGradient.apply(logits_fg, loss, grad)
    return loss, grad


class EqualizedFocalLoss(SigmoidClassificationLoss):
    """EFL with gradient statistics in buffers (`pos_grad`, `neg_grad`, `pos_neg`, all `[C]`).

    Args:
        gamma_b: the base focusing factor (the focal loss's gamma; 2).
        scale: s, how far a rare class's focusing factor rises above gamma_b (8).
        alpha: weight of positives (`1 - alpha` for negatives; 0.25); negative disables it.
    """

    #: EOD divides the dense loss by the step's foreground count (averaged over ranks) and its
    #: hook reads the gradient under that normaliser: one constant per step, so every image's
    #: anchors count alike in `g_j`.
    dense_normaliser = "batch"

    pos_grad: Tensor
    neg_grad: Tensor
    pos_neg: Tensor

    def __init__(self, *, num_classes, gamma_b=2.0, scale=8.0, alpha=0.25, loss_weight=1.0):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)
        if gamma_b <= 0:
            raise ValueError(f"{type(self).__name__}: gamma_b must be > 0, got {gamma_b}")
        self.gamma_b, self.scale, self.alpha = float(gamma_b), float(scale), float(alpha)
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        # g = 1 before any statistics: gamma_j = gamma_b, weight 1 (the focal loss)
        self.register_buffer("pos_neg", torch.ones(num_classes))

    def _factors(self) -> Tuple[Tensor, Tensor]:
        return focusing_factors(self.pos_neg, self.gamma_b, self.scale)

    def _elements(self, logits: Tensor, target: QualityTarget) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-element loss `[N, C]`, its gradient `[N, C]` and the labels."""
        labels, _ = split_quality_target(target)  # EFL's target is plain labels
        gamma, factor = self._factors()
        target_fg = foreground_targets(labels, logits.shape[1] - 1, logits.dtype)
        loss, grad = equalized_focal_elements(logits[:, 1:], target_fg, gamma, factor, self.alpha)
        return loss, grad, labels

    def elementwise(self, logits: Tensor, target: QualityTarget) -> Tensor:
        """The loss under the current statistics, without updating them."""
        return pad_background(self._elements(logits, target)[0])

    def loss_elements(
        self, logits: Tensor, target: QualityTarget, weight: Optional[Tensor]
    ) -> Tensor:
        """`elementwise`, then (training mode) this step's gradients join the statistics: the
        state of the next step, never of this one."""
        loss, grad, labels = self._elements(logits, target)
        if self.training:
            self._collect_gradients(grad, labels, weight)
        return pad_background(loss)

    @torch.no_grad()
    def _collect_gradients(self, grad: Tensor, labels: Tensor, weight: Optional[Tensor]) -> None:
        """Add `sum |dL/dz| * w` over the positives and the negatives of each class.

        Each row has at most one positive (its label's column): its value is gathered, then
        zeroed, and the column sums are the negatives' alone. (Taking the negatives as column
        sum minus positives cancels catastrophically in float32: the focal term makes a
        negative's gradient ~1e-5 of a positive's, and `G-` came out 5% off.)"""
        magnitude = grad.abs()  # a fresh tensor: zeroed in place below
        if weight is None:
            row_weight = torch.ones(labels.shape[0], dtype=magnitude.dtype, device=grad.device)
        elif weight.dim() == 1:
            row_weight = weight.detach().to(magnitude.dtype)
        else:
            magnitude = magnitude * weight.detach()[:, 1:].to(magnitude.dtype)
            row_weight = torch.ones(labels.shape[0], dtype=magnitude.dtype, device=grad.device)
        fg = torch.where(labels > 0)[0]
        cls = labels[fg] - 1
        pos_values = magnitude[fg, cls] * row_weight[fg]
        magnitude[fg, cls] = 0.0
        neg = row_weight @ magnitude
        pos = torch.zeros_like(neg).index_add_(0, cls, pos_values)
        increment = all_reduce_sum(torch.stack([pos, neg]).to(self.pos_grad.dtype))
        self.pos_grad += increment[0]
        self.neg_grad += increment[1]
        self.pos_neg.copy_((self.pos_grad / (self.neg_grad + 1e-10)).clamp(0.0, 1.0))


class EqualizedQualityFocalLoss(EqualizedFocalLoss):
    """EQFL: EFL's factors on QFL's term, `(gamma_j / gamma_b) BCE(z, y) |sigmoid(z) - y|^gamma_j`
    with quality targets (`loss(logits, (labels, quality))`; plain labels: quality 1). No alpha,
    as in the authors' EQFL.

    Args:
        gamma_b, scale: as EFL (2, 8).
    """

    #: The target is `(labels, quality)`: a head passes the IoU of the regressed box.
    needs_quality: bool = True

    def __init__(self, *, num_classes, gamma_b=2.0, scale=8.0, loss_weight=1.0):
        super().__init__(
            num_classes=num_classes,
            gamma_b=gamma_b,
            scale=scale,
            alpha=-1.0,
            loss_weight=loss_weight,
        )
        if gamma_b < 1:
            raise ValueError(
                f"eqfl: gamma_b must be >= 1 (|d|^(gamma - 1) in the gradient), got {gamma_b}"
            )

    def check_inputs(self, logits: Tensor, target: QualityTarget) -> None:
        labels, quality = split_quality_target(target)
        super().check_inputs(logits, labels)
        if quality is not None and quality.shape != labels.shape:
            raise ValueError(
                f"{type(self).__name__}: quality must be [N] = "
                f"[{labels.shape[0]}] like the labels, got {list(quality.shape)}"
            )

    def _elements(self, logits: Tensor, target: QualityTarget) -> Tuple[Tensor, Tensor, Tensor]:
        labels, quality = split_quality_target(target)
        gamma, factor = self._factors()
        target_fg = quality_targets(labels, quality, logits.shape[1] - 1, logits.dtype)
        loss, grad = quality_focal_elements(logits[:, 1:], target_fg, gamma, factor)
        return loss, grad, labels
