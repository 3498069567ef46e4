"""Smooth L1 and L1 box-regression losses (Girshick, "Fast R-CNN", ICCV 2015, eq. 3).

Shapes: pred, target `[P, 4]` box deltas; per-element loss `[P, 4]`.
`smooth_l1(d) = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta`; torchvision's Fast R-CNN uses
`beta = 1/9`.
"""
import torch.nn.functional as F

from .base import RegressionLoss
from .reduction import reduce_loss


def smooth_l1_loss(pred, target, beta=1.0 / 9):
    """Per-coordinate smooth L1 `[P, 4]`; beta = 0 is plain L1."""
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none")


def l1_loss(pred, target):
    """Per-coordinate absolute error `[P, 4]`."""
    return F.l1_loss(pred, target, reduction="none")


class SmoothL1Loss(RegressionLoss):
    """Smooth L1 on box deltas; the default box loss of torchvision's Faster R-CNN."""

    def __init__(self, *, beta=1.0 / 9, loss_weight=1.0):
        super().__init__(loss_weight=loss_weight)
        if beta < 0:
            raise ValueError(f"smooth_l1: beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def forward(self, pred, target, weight=None, reduction="mean", avg_factor=None):
        self.check_inputs(pred, target)
        loss = smooth_l1_loss(pred, target, self.beta)
        return self.loss_weight * reduce_loss(loss, weight, reduction, avg_factor)


class L1Loss(RegressionLoss):
    """L1 on box deltas."""

    def __init__(self, *, loss_weight=1.0):
        super().__init__(loss_weight=loss_weight)

    def forward(self, pred, target, weight=None, reduction="mean", avg_factor=None):
        self.check_inputs(pred, target)
        return self.loss_weight * reduce_loss(l1_loss(pred, target), weight, reduction, avg_factor)
