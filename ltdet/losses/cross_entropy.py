"""Softmax cross-entropy over background + C classes: torchvision's Fast R-CNN default.

Shapes: logits `[N, C+1]` (column 0 = background), labels `[N]` in `[0, C]`; the per-element
loss is `[N]` (one value per RoI): `-log softmax(z)_y`.
"""
import torch.nn.functional as F

from .base import ClassificationLoss
from .reduction import reduce_loss


def cross_entropy(logits, labels):
    """Per-RoI softmax cross-entropy `[N]`."""
    return F.cross_entropy(logits, labels, reduction="none")


class CrossEntropyLoss(ClassificationLoss):
    """Softmax CE, the baseline every long-tail table compares against."""

    def __init__(self, *, num_classes=None, loss_weight=1.0):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)

    def forward(self, logits, labels, weight=None, reduction="mean", avg_factor=None):
        self.check_inputs(logits, labels)
        loss = cross_entropy(logits, labels)
        return self.loss_weight * reduce_loss(loss, weight, reduction, avg_factor)
