"""Label-aware smoothing loss, LAS (MiSLAS: Zhong et al., "Improving Calibration for Long-Tailed
Recognition", CVPR 2021, Sec. 3): softmax CE against soft targets whose smoothing factor
grows with the class's training count (`ltdet.imbalance.label_aware_smoothing`):
`1 - eps_y` on the true class, `eps_y / (K - 1)` on each of the other K - 1 = C columns.

Background. MiSLAS's rule is "the more samples a class has, the more over-confident the model is
on it, so the more it is smoothed". Background is by far the most frequent label of a RoI head
(three of every four sampled RoIs), so it is treated as the head-most class and smoothed with
`eps_head` (override with `bg_eps`). The foreground factors are interpolated between the most and
least frequent foreground classes only, so background's huge count does not squash every
foreground class to `eps_tail`.

Shapes: logits `[N, C+1]` (column 0 = background), labels `[N]` in `[0, C]`; per-element loss
`[N]`. Scores: softmax. Computed without materialising the `[N, C+1]` target:
`-sum_j q_j log p_j = -(1 - eps) log p_y - eps / (K - 1) * (sum_j log p_j - log p_y)`.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..imbalance.las_factors import LAS_SHAPES, label_aware_smoothing
from .base import ClassificationLoss, ClassStatsLike, classes_from_stats


def label_aware_smoothing_loss(logits: Tensor, labels: Tensor, eps: Tensor) -> Tensor:
    """Per-RoI smoothed CE `[N]`; `eps [C+1]` = smoothing factor per label value."""
    num_columns = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    log_p_true = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    eps_i = eps[labels]
    rest = log_p.sum(dim=1) - log_p_true
    return -(1.0 - eps_i) * log_p_true - eps_i / (num_columns - 1) * rest


class LabelAwareSmoothingLoss(ClassificationLoss):
    """Label-aware smoothing CE.

    Args:
        stats: class statistics (ClassStats): `instance_count` orders the classes.
        eps_head: smoothing of the most frequent class (eps_1).
        eps_tail: smoothing of the rarest class (eps_K).
        shape: "concave" | "linear" | "convex" | "exp" interpolation h (MiSLAS's four shapes).
        power: exponent of the "exp" shape, `h(x) = x^power` (required there, > 0; ignored by
            the other shapes, as in MiSLAS).
        bg_eps: smoothing of background; None = eps_head.
    """

    # buffers (registered in __init__), annotated for type checkers
    eps: Tensor

    def __init__(
        self,
        *,
        stats: ClassStatsLike,
        num_classes: Optional[int] = None,
        eps_head: float = 0.4,
        eps_tail: float = 0.1,
        shape: str = "concave",
        power: Optional[float] = None,
        bg_eps: Optional[float] = None,
        loss_weight: float = 1.0,
    ):
        super().__init__(
            num_classes=classes_from_stats(stats, num_classes), loss_weight=loss_weight
        )
        if shape not in LAS_SHAPES:
            raise ValueError(f"las: shape must be one of {LAS_SHAPES}, got {shape!r}")
        if shape == "exp" and power is None:
            raise ValueError(
                "las: shape 'exp' needs a power (h(x) = x^power), e.g. "
                "{type: las, shape: exp, power: 2.0}"
            )
        self.eps_head, self.eps_tail, self.shape = float(eps_head), float(eps_tail), shape
        self.power = power  # validated by label_aware_smoothing
        self.bg_eps = self.eps_head if bg_eps is None else float(bg_eps)
        if not 0.0 <= self.bg_eps < 1.0:
            raise ValueError(f"las: bg_eps must be in [0, 1), got {self.bg_eps}")
        fg_eps = label_aware_smoothing(
            torch.as_tensor(stats.instance_count, dtype=torch.float32),
            self.eps_head,
            self.eps_tail,
            shape,
            power=self.power,
        )
        self.register_buffer(
            "eps", torch.cat([fg_eps.new_tensor([self.bg_eps]), fg_eps]), persistent=False
        )

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return label_aware_smoothing_loss(logits, labels, self.eps.to(logits.dtype))
