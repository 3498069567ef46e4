"""Balanced L1 loss (Pang et al., "Libra R-CNN", CVPR 2019, Sec. 3.3).

With `x = |pred - target|` and `b` such that `alpha ln(b + 1) = gamma` (gradient continuity at
x = beta, i.e. `b = e^{gamma / alpha} - 1`):

    L(x) = alpha / b (b x + 1) ln(b x / beta + 1) - alpha x     if x < beta
    L(x) = gamma x + gamma / b - alpha beta                     otherwise

so `dL/dx = alpha ln(b x / beta + 1)` inside and `gamma` outside; `alpha = 0.5, gamma = 1.5,
beta = 1`. Shapes: pred, target `[P, 4]` box deltas; per-element loss `[P, 4]`.
"""

import math

import torch
from torch import Tensor

from .base import RegressionLoss


def balanced_l1_loss(
    pred: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0
) -> Tensor:
    """Per-coordinate balanced L1 `[P, 4]`."""
    x = (pred - target).abs()
    b = math.exp(gamma / alpha) - 1.0
    inner = alpha / b * (b * x + 1.0) * torch.log1p(b * x / beta) - alpha * x
    outer = gamma * x + gamma / b - alpha * beta
    return torch.where(x < beta, inner, outer)


class BalancedL1Loss(RegressionLoss):
    """Balanced L1 on box deltas."""

    def __init__(
        self, *, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0, loss_weight: float = 1.0
    ):
        super().__init__(loss_weight=loss_weight)
        if alpha <= 0 or gamma <= 0 or beta <= 0:
            raise ValueError(
                f"balanced_l1: alpha, gamma, beta must be > 0, got {alpha}, {gamma}, {beta}"
            )
        self.alpha, self.gamma, self.beta = float(alpha), float(gamma), float(beta)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return balanced_l1_loss(pred, target, self.alpha, self.gamma, self.beta)
