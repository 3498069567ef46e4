"""Generalized IoU loss (Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019,
Algorithm 2): `1 - GIoU(pred, target)`, computed by `torchvision.ops.generalized_box_iou_loss`.

Shapes: pred, target `[P, 4]` decoded `xyxy` boxes (`needs_boxes = True`: the head decodes its
deltas against the proposals first); per-element loss `[P]` (one per box). A `[P, 4]` weight is
averaged over its 4 coordinates.
"""

from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from .base import RegressionLoss


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-box `1 - GIoU` `[P]`."""
    return generalized_box_iou_loss(pred, target, reduction="none", eps=eps)


class GIoULoss(RegressionLoss):
    """GIoU loss on decoded boxes."""

    needs_boxes = True

    def __init__(self, *, eps: float = 1e-7, loss_weight: float = 1.0):
        super().__init__(loss_weight=loss_weight)
        self.eps = float(eps)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return giou_loss(pred, target, self.eps)
