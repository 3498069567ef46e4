"""Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, eq. 5).

`FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)` per sigmoid element, computed by
`torchvision.ops.sigmoid_focal_loss`. Shapes: logits `[N, C+1]` (column 0 = background),
labels `[N]` in `[0, C]`. The targets are one-hot over the foreground columns 1..C (a background
RoI is all-negative); column 0 is not a class here and gets an exact zero loss and gradient.
Per-element loss `[N, C+1]`.
"""

from typing import Optional

from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from .base import SigmoidClassificationLoss, foreground_targets, pad_background


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-element focal loss `[N, C+1]` with column 0 identically zero."""
    target = foreground_targets(labels, logits.shape[1] - 1, logits.dtype)
    loss_fg = sigmoid_focal_loss(logits[:, 1:], target, alpha=alpha, gamma=gamma, reduction="none")
    return pad_background(loss_fg)


class FocalLoss(SigmoidClassificationLoss):
    """Sigmoid focal loss on the C foreground columns; scores = `sigmoid(z_j)`.

    Args:
        alpha: weight of positives (`1 - alpha` for negatives); a negative value disables it.
        gamma: focusing exponent.
    """

    def __init__(
        self,
        *,
        num_classes: Optional[int] = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
        loss_weight: float = 1.0,
    ):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return focal_loss(logits, labels, self.alpha, self.gamma)
