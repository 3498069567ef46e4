"""Softmax cross-entropy over background + C classes: torchvision's Fast R-CNN default.

Shapes: logits `[N, C+1]` (column 0 = background), labels `[N]` in `[0, C]`; the per-element
loss is `[N]` (one value per RoI): `-log softmax(z)_y`.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .base import ClassificationLoss


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-RoI softmax cross-entropy `[N]`."""
    return F.cross_entropy(logits, labels, reduction="none")


class CrossEntropyLoss(ClassificationLoss):
    """Softmax CE, the baseline every long-tail table compares against."""

    def __init__(self, *, num_classes: Optional[int] = None, loss_weight: float = 1.0):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(logits, labels)
