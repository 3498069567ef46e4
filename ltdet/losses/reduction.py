"""The one reducer shared by every ltdet loss.

Every loss computes a per-element loss (mmdetection's idiom) and `LossModule.forward` hands it
to `reduce_loss`:

* classification: per-element loss `[N]` (softmax losses, one value per RoI) or `[N, C+1]`
  (sigmoid losses, one value per logit; column 0 = background);
* regression: `[P, 4]` (per coordinate) or `[P]` (GIoU, one value per box).

`reduction="none"` returns the weighted per-element loss, `"sum"` its sum, and `"mean"` the sum
divided by `avg_factor` when given, else by the number of samples `N` (RoIs / anchors / boxes,
i.e. `loss.shape[0]`, never the number of elements). An `avg_factor` with `reduction="sum"` is an
error (mmdetection's `weight_reduce_loss` raises the same): a sum has no divisor, and silently
ignoring it hides a normalisation bug. With `"none"` it is ignored, as in mmdetection.
"""

from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["reduce_loss"]

_REDUCTIONS = ("none", "sum", "mean")


def _broadcast_weight(weight: Tensor, loss: Tensor) -> Tensor:
    """Per-sample weights `[N]` apply to every element of their row; `[N, K]` apply element-wise."""
    if weight.shape[0] != loss.shape[0]:
        raise ValueError(
            f"loss weight has {weight.shape[0]} rows but the loss has {loss.shape[0]} samples; "
            f"pass weight of shape [{loss.shape[0]}] or {list(loss.shape)}"
        )
    if weight.dim() == loss.dim():
        if weight.shape != loss.shape:
            raise ValueError(
                f"loss weight shape {list(weight.shape)} does not match the "
                f"per-element loss shape {list(loss.shape)}"
            )
        return weight
    if weight.dim() == 1:
        return weight.view(-1, *([1] * (loss.dim() - 1)))
    if weight.dim() == 2 and loss.dim() == 1:
        # A per-element weight on a per-sample loss (e.g. [P, 4] box weights on GIoU's [P]):
        # mmdetection's rule, one weight per sample = the mean over its elements.
        return weight.mean(dim=1)
    raise ValueError(
        f"loss weight of shape {list(weight.shape)} cannot weight a loss of shape "
        f"{list(loss.shape)}"
    )


def reduce_loss(
    loss: Tensor, weight: Optional[Tensor] = None, reduction: str = "mean", avg_factor: Any = None
) -> Tensor:
    """Weight then reduce a per-element loss.

    Args:
        loss: per-element loss, first dimension = samples (`[N]`, `[N, K]`).
        weight: None, `[N]` (per sample) or the shape of `loss` (per element).
        reduction: "none" | "sum" | "mean".
        avg_factor: divisor for "mean" (number or 0-dim tensor); default `N = loss.shape[0]`.
            An empty batch (N = 0, or avg_factor = 0) gives a finite zero, never NaN. Passing
            one with reduction "sum" raises ValueError (mmdetection's `weight_reduce_loss`).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if avg_factor is not None and reduction == "sum":
        raise ValueError(
            'avg_factor can not be used with reduction="sum": a sum has no divisor; '
            'use reduction="mean" to divide by avg_factor, or drop avg_factor'
        )
    if weight is not None:
        loss = loss * _broadcast_weight(weight.to(loss.dtype), loss)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if avg_factor is None:
        return total / max(loss.shape[0], 1)
    if torch.is_tensor(avg_factor):
        # Stays on device (no host sync); a zero divisor only happens with a zero sum.
        return total / avg_factor.to(total.dtype).clamp_min(torch.finfo(total.dtype).eps)
    return total / max(float(avg_factor), torch.finfo(total.dtype).eps)
