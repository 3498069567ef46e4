"""Smooth L1 and L1 box-regression losses (Girshick, "Fast R-CNN", ICCV 2015, eq. 3).

Shapes: pred, target `[P, 4]` box deltas; per-element loss `[P, 4]`.
`smooth_l1(d) = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta`; torchvision's Fast R-CNN uses
`beta = 1/9`.
"""

import torch.nn.functional as F
from torch import Tensor

from .base import RegressionLoss


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0 / 9) -> Tensor:
    """Per-coordinate smooth L1 `[P, 4]`; beta = 0 is plain L1."""
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-coordinate absolute error `[P, 4]`."""
    return F.l1_loss(pred, target, reduction="none")


class SmoothL1Loss(RegressionLoss):
    """Smooth L1 on box deltas; the default box loss of torchvision's Faster R-CNN."""

    def __init__(self, *, beta: float = 1.0 / 9, loss_weight: float = 1.0):
        super().__init__(loss_weight=loss_weight)
        if beta < 0:
            raise ValueError(f"smooth_l1: beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return smooth_l1_loss(pred, target, self.beta)


class L1Loss(RegressionLoss):
    """L1 on box deltas."""

    def __init__(self, *, loss_weight: float = 1.0):
        super().__init__(loss_weight=loss_weight)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return l1_loss(pred, target)
