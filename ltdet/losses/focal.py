"""Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, eq. 5).

`FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)` per sigmoid element, computed by
`torchvision.ops.sigmoid_focal_loss`. Shapes: logits `[N, C+1]` (column 0 = background),
labels `[N]` in `[0, C]`. The targets are one-hot over the foreground columns 1..C (a background
RoI is all-negative); column 0 is not a class here and gets an exact zero loss and gradient.
Per-element loss `[N, C+1]`.
"""
from torchvision.ops import sigmoid_focal_loss

from .base import SigmoidClassificationLoss, foreground_targets, pad_background
from .reduction import reduce_loss


def focal_loss(logits, labels, alpha=0.25, gamma=2.0):
    """Per-element focal loss `[N, C+1]` with column 0 identically zero."""
    target = foreground_targets(labels, logits.shape[1] - 1, logits.dtype)
    loss_fg = sigmoid_focal_loss(logits[:, 1:], target, alpha=alpha, gamma=gamma,
                                 reduction="none")
    return pad_background(loss_fg)


class FocalLoss(SigmoidClassificationLoss):
    """Sigmoid focal loss on the C foreground columns; scores = `sigmoid(z_j)`.

    Args:
        alpha: weight of positives (`1 - alpha` for negatives); a negative value disables it.
        gamma: focusing exponent.
    """

    def __init__(self, *, num_classes=None, alpha=0.25, gamma=2.0, loss_weight=1.0):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def forward(self, logits, labels, weight=None, reduction="mean", avg_factor=None):
        self.check_inputs(logits, labels)
        loss = focal_loss(logits, labels, self.alpha, self.gamma)
        return self.loss_weight * reduce_loss(loss, weight, reduction, avg_factor)
