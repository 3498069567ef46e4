"""Generalized Focal Loss (Li et al., "Generalized Focal Loss: Learning Qualified and Distributed
Bounding Boxes for Dense Object Detection", NeurIPS 2020, eqs. 5-6): Quality Focal Loss (QFL) and
Distribution Focal Loss (DFL).

QFL, on the foreground sigmoid columns 1..C of `[N, C+1]` logits (column 0 = background, never
trained: exact zero loss and gradient): with `sigma = sigmoid(z)` and a soft target `y` that is the
localisation quality (the IoU of the anchor's regressed box with its ground truth) in the labelled
column of a foreground anchor and 0 everywhere else,

    QFL(z, y) = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma)),   beta = 2,

i.e. `BCE(z, y) * |sigma - y|^beta`, one formula for the negatives (`y = 0`: `BCE(z, 0) sigma^beta`)
and for the positive (the authors' code computes the two separately). Target: `labels [N]`, or the
pair `(labels, quality)` with `quality [N]` in [0, 1] (read on foreground rows only), the way
mmdetection passes `(label, score)`; plain labels mean quality 1 (hard targets). Scores:
`sigmoid(z_j)`, the joint class-quality score.

The per-element loss and its gradient come from one closed form (`quality_focal_elements`), as in
the equalized variant `ltdet.losses.efl` that needs the gradient for its statistics: the gradient
w.r.t. `z` is `sign(d) |d|^(beta-1) (d^2 + beta sigma (1 - sigma) BCE)`, `d = sigma - y`; the
backward pass multiplies by it instead of replaying the graph.

DFL, on a discretised distribution over `n + 1` values `0..n` (`reg_max = n = 16`) per box side:
for a target `y` in `[0, n]` between the integers `y_l = floor(y)` and `y_r = y_l + 1`,

    DFL(S, y) = -((y_r - y) log S_{y_l} + (y - y_l) log S_{y_r}),   S = softmax(pred),

a per-box loss `[P]`, the mean of its 4 sides (the authors' `avg_factor=4`). A side is decoded as
`sum_i S_i * i` (`distribution_integral`). Shapes: pred `[P, 4, n+1]` logits, target `[P, 4]`.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import RegressionLoss, SigmoidClassificationLoss, pad_background

__all__ = [
    "DistributionFocalLoss",
    "QualityFocalLoss",
    "distribution_focal_loss",
    "distribution_integral",
    "quality_focal_elements",
    "quality_focal_loss",
    "quality_targets",
    "split_quality_target",
]

QualityTarget = Union[Tensor, Tuple[Tensor, Tensor]]


class _ClosedFormGradient(torch.autograd.Function):
    """`loss` as a function of `z` whose backward is `grad_output * grad` (both precomputed)."""

    @staticmethod
    def forward(ctx, z: Tensor, loss: Tensor, grad: Tensor) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.z_dtype = z.dtype
        return loss.clone()  # a new tensor: autograd owns the outputs of a Function

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad_output * grad).to(ctx.z_dtype), None, None


def quality_focal_elements(
    logits_fg: Tensor,
    target: Tensor,
    gamma: Union[Tensor, float],
    factor: Union[Tensor, float] = 1.0,
) -> Tuple[Tensor, Tensor]:
    """`factor * BCE(z, y) * |sigmoid(z) - y|^gamma` `[N, C]` and its gradient w.r.t. `z`.

    `gamma` and `factor` are numbers or per-column tensors `[C]` (EQFL's focusing and weighting
    factors), constants for the gradient as in the authors' code. Computed in at least float32;
    the loss carries the closed-form gradient (`_ClosedFormGradient`), and the gradient is
    returned detached as well (the equalized losses' statistics).
    """
    dtype = torch.promote_types(logits_fg.dtype, torch.float32)
    with torch.no_grad():
        z = logits_fg.detach().to(dtype)
        y = target.to(dtype)
        if torch.is_tensor(gamma):
            gamma = gamma.to(dtype)
        if torch.is_tensor(factor):
            factor = factor.to(dtype)
        sigma = z.sigmoid()
        d = sigma - y
        ce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        abs_d = d.abs()
        # |d|^(gamma - 1), so that the loss (times |d|) and the gradient share one power
        low = abs_d.pow(gamma - 1.0) * factor
        loss = low * abs_d * ce
        grad = low * torch.sign(d) * (d * d + gamma * sigma * (1.0 - sigma) * ce)
    if logits_fg.requires_grad:
        loss = _ClosedFormGradient.apply(logits_fg, loss, grad)
    return loss, grad


def split_quality_target(target: QualityTarget) -> Tuple[Tensor, Optional[Tensor]]:
    """`labels` or `(labels, quality)` -> `(labels, quality or None)`."""
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(
                f"a quality target is (labels [N], quality [N]), got {len(target)} tensors"
            )
        return target[0], target[1]
    return target, None


def quality_targets(
    labels: Tensor, quality: Optional[Tensor], num_classes: int, dtype: torch.dtype
) -> Tensor:
    """Soft targets `[N, C]` of the foreground columns: `quality_i` (1 when None) in column
    `labels_i` of a foreground row, 0 elsewhere; background rows are all zero."""
    fg = labels > 0
    value = (
        fg.to(dtype)
        if quality is None
        else torch.where(fg, quality.to(dtype), torch.zeros((), dtype=dtype, device=labels.device))
    )
    target = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    # Background rows scatter a 0 into column 0, leaving them all-zero.
    target.scatter_(1, (labels - 1).clamp_min(0).unsqueeze(1), value.unsqueeze(1))
    return target


def quality_focal_loss(
    logits: Tensor, labels: Tensor, quality: Optional[Tensor] = None, beta: float = 2.0
) -> Tensor:
    """Per-element QFL `[N, C+1]` with column 0 identically zero."""
    target = quality_targets(labels, quality, logits.shape[1] - 1, logits.dtype)
    loss, _ = quality_focal_elements(logits[:, 1:], target, beta)
    return pad_background(loss)


class QualityFocalLoss(SigmoidClassificationLoss):
    """QFL on the C foreground columns; scores `sigmoid(z_j)`.

    Called as `loss(logits, (labels, quality), weight=..., ...)` (or with plain labels: quality
    1). `needs_quality`: a dense head passes the IoU of each foreground anchor's regressed box
    with its ground truth.

    Args:
        beta: exponent of the modulating factor `|y - sigma|^beta` (2 in the paper).
    """

    #: The target is `(labels, quality)`: a head passes the IoU of the regressed box.
    needs_quality: bool = True
    #: GFocal's `num_total_samples`: the step's foreground count, averaged over ranks.
    dense_normaliser = "batch"

    def __init__(self, *, num_classes=None, beta=2.0, loss_weight=1.0):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)
        if beta < 1:
            raise ValueError(f"qfl: beta must be >= 1 (|d|^(beta - 1) in the gradient), got {beta}")
        self.beta = float(beta)

    def check_inputs(self, logits: Tensor, target: QualityTarget) -> None:
        labels, quality = split_quality_target(target)
        super().check_inputs(logits, labels)
        if quality is not None and quality.shape != labels.shape:
            raise ValueError(
                f"{type(self).__name__}: quality must be [N] = "
                f"[{labels.shape[0]}] like the labels, got {list(quality.shape)}"
            )

    def elementwise(self, logits: Tensor, target: QualityTarget) -> Tensor:
        labels, quality = split_quality_target(target)
        return quality_focal_loss(logits, labels, quality, self.beta)


def distribution_integral(pred: Tensor) -> Tensor:
    """Expected value `sum_i softmax(pred)_i * i` over the last dimension (`n + 1` bins):
    `[..., n+1]` logits -> `[...]` in `[0, n]`."""
    bins = torch.arange(pred.shape[-1], dtype=pred.dtype, device=pred.device)
    return pred.softmax(dim=-1) @ bins


def distribution_focal_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-box DFL `[P]`: the mean over the 4 sides of the two-bin cross-entropy.

    `pred [P, 4, n+1]` logits, `target [P, 4]` in `[0, n]`. A target of exactly `n` uses the
    bins `n - 1, n` with all its weight on `n` (the authors clamp targets below `n` instead)."""
    n = pred.shape[-1] - 1
    target = target.to(pred.dtype)
    left = target.detach().floor().clamp(0, n - 1)
    weight_right = target - left
    weight_left = 1.0 - weight_right
    log_prob = pred.log_softmax(dim=-1)
    index = left.long().unsqueeze(-1)
    log_left = log_prob.gather(-1, index).squeeze(-1)
    log_right = log_prob.gather(-1, index + 1).squeeze(-1)
    return -(weight_left * log_left + weight_right * log_right).mean(dim=1)


class DistributionFocalLoss(RegressionLoss):
    """DFL on box-side distributions: pred `[P, 4, reg_max + 1]` logits, target `[P, 4]`
    distances in bin units in `[0, reg_max]`; per-box loss `[P]`.

    Args:
        reg_max: n, the largest value of the discretised range `0..n` (16 in the paper).
    """

    def __init__(self, *, reg_max=16, loss_weight=1.0):
        super().__init__(loss_weight=loss_weight)
        if int(reg_max) != reg_max or reg_max < 1:
            raise ValueError(f"dfl: reg_max must be a positive integer, got {reg_max}")
        self.reg_max = int(reg_max)

    def check_inputs(self, pred: Tensor, target: Tensor) -> None:
        bins = self.reg_max + 1
        if (
            pred.dim() != 3
            or pred.shape[1:] != (4, bins)
            or target.dim() != 2
            or target.shape != pred.shape[:2]
        ):
            raise ValueError(
                f"{type(self).__name__}: pred must be [P, 4, reg_max + 1 = {bins}] "
                f"and target [P, 4], got {list(pred.shape)} and "
                f"{list(target.shape)}"
            )

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return distribution_focal_loss(pred, target)
