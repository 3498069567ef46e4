"""Equalization loss, EQL (Tan et al., "Equalization Loss for Long-Tailed Object Recognition",
CVPR 2020, Sec. 3.2).

Sigmoid BCE over the C foreground columns (a background RoI has an all-zero target; column 0 is
not a class and gets no gradient), with element weight

    w_j = 1 - E(r) * T_lambda(f_j) * (1 - y_j)

`E(r) = 1` for a foreground RoI and 0 for background; `T_lambda(f) = 1 if f < lambda`; `f_j` is
the frequency of class j = (number of training images containing j) / (number of images)
(Sec. 3.2). So rare classes are not suppressed by the negative gradients of other classes'
foreground RoIs; background RoIs still suppress every class. `lambda = 1.76e-3` on LVIS.
Per-element loss `[N, C+1]`, normalised by N (the paper's `1/N`).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    ClassStatsLike,
    SigmoidClassificationLoss,
    classes_from_stats,
    foreground_targets,
    pad_background,
)


def eql_loss(logits: Tensor, labels: Tensor, tail_mask: Tensor) -> Tensor:
    """Per-element EQL `[N, C+1]`; `tail_mask [C]` = `T_lambda(f_j)` as 0/1 floats."""
    target = foreground_targets(labels, logits.shape[1] - 1, logits.dtype)
    is_fg_roi = (labels > 0).to(logits.dtype)
    # 1 - E(r) T(f_j), then w = 1 on the RoI's own class (y_j = 1). Background rows are all 1,
    # so writing 1 into their (clamped) column 0 changes nothing.
    weight = 1.0 - torch.outer(is_fg_roi, tail_mask)
    weight.scatter_(1, (labels - 1).clamp_min(0).unsqueeze(1), 1.0)
    return pad_background(
        F.binary_cross_entropy_with_logits(logits[:, 1:], target, weight=weight, reduction="none")
    )


class EQLLoss(SigmoidClassificationLoss):
    """Equalization loss; scores `sigmoid(z_j)`.

    Args:
        stats: class statistics (ClassStats): `image_count / num_images` gives f_j.
        lambda_: frequency threshold of the tail classes.
    """

    # buffers (registered in __init__), annotated for type checkers
    tail_mask: Tensor

    def __init__(
        self,
        *,
        stats: ClassStatsLike,
        num_classes: Optional[int] = None,
        lambda_: float = 1.76e-3,
        loss_weight: float = 1.0,
    ):
        super().__init__(
            num_classes=classes_from_stats(stats, num_classes), loss_weight=loss_weight
        )
        if stats.num_images <= 0:
            raise ValueError(
                f"eql: class statistics report num_images={stats.num_images}; "
                f"the image frequency f_j needs at least one training image"
            )
        self.lambda_ = float(lambda_)
        freq = torch.as_tensor(stats.image_count, dtype=torch.float32) / float(stats.num_images)
        self.register_buffer("tail_mask", (freq < self.lambda_).float(), persistent=False)

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return eql_loss(logits, labels, self.tail_mask.to(logits.dtype))
