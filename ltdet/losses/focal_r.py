"""Focal-R regression loss (Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021,
Sec. 3 / appendix): an L1 loss scaled by a focal factor of the error itself,

    L(e) = |e| * (2 sigmoid(beta |e|) - 1)^gamma      (activate="sigmoid")
    L(e) = |e| * tanh(beta |e|)^gamma                 (activate="tanh")

`beta = 0.2, gamma = 1`. The factor is not detached (the authors' code back-propagates through
it). Shapes: pred, target `[P, 4]` box deltas; per-element loss `[P, 4]`.
"""

import torch
from torch import Tensor

from .base import RegressionLoss

FOCAL_R_ACTIVATIONS = ("sigmoid", "tanh")


def focal_r_loss(
    pred: Tensor, target: Tensor, beta: float = 0.2, gamma: float = 1.0, activate: str = "sigmoid"
) -> Tensor:
    """Per-coordinate Focal-R `[P, 4]`."""
    err = (pred - target).abs()
    if activate == "tanh":
        factor = torch.tanh(beta * err)
    else:
        factor = 2.0 * torch.sigmoid(beta * err) - 1.0
    return err * factor.pow(gamma)


class FocalRLoss(RegressionLoss):
    """Focal-R on box deltas."""

    def __init__(
        self,
        *,
        beta: float = 0.2,
        gamma: float = 1.0,
        activate: str = "sigmoid",
        loss_weight: float = 1.0,
    ):
        super().__init__(loss_weight=loss_weight)
        if activate not in FOCAL_R_ACTIVATIONS:
            raise ValueError(
                f"focal_r: activate must be one of {FOCAL_R_ACTIVATIONS}, got {activate!r}"
            )
        self.beta, self.gamma, self.activate = float(beta), float(gamma), activate

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return focal_r_loss(pred, target, self.beta, self.gamma, self.activate)
