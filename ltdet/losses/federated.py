"""Federated loss (Zhou et al., "Probabilistic two-stage detection", arXiv 2103.07461, 2021,
Sec. 4 / appendix): sigmoid BCE restricted, per batch, to a subset of classes: every class with a
ground-truth RoI in the batch, plus negative classes sampled without replacement with probability
proportional to `f_c^power` (`f_c` = training image count of class c, `power = 0.5`), up to
`num_classes_sampled = 50` classes in total.

Shapes: logits `[N, C+1]` (column 0 = background, not a class: no gradient), labels `[N]` in
`[0, C]`; per-element loss `[N, C+1]`, zero outside the sampled classes; normalised by N.

Sampling uses the Gumbel-top-k trick: the k largest `log w_c + Gumbel` keys are a draw without
replacement proportional to `w` (the same distribution as sequential `torch.multinomial`), with
present classes given key +inf. It is vectorised and needs no host synchronisation. The noise
comes from the loss's own `torch.Generator` (seeded with `seed + rank`), so runs are reproducible
and the global RNG stream is left alone. Classes with zero training images are never sampled as
negatives (their weight is 0).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..collectives import get_rank
from .base import (
    ClassStatsLike,
    SigmoidClassificationLoss,
    classes_from_stats,
    foreground_targets,
    pad_background,
)


def federated_class_mask(
    labels: Tensor, log_weight: Tensor, num_sampled: int, uniform: Tensor
) -> Tensor:
    """Boolean `[C]`: classes present in `labels` plus sampled negatives (at most
    `max(num_sampled, #present)` classes in total).

    Args:
        labels: `[N]` in `[0, C]`.
        log_weight: `[C]` log sampling weights (`-inf` = never sampled).
        num_sampled: total number of classes to keep.
        uniform: `[C]` uniform(0, 1) noise.
    """
    num_classes = log_weight.numel()
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels.device)
    present[labels] = True
    present = present[1:]
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))
    keys = torch.where(present, torch.full_like(log_weight, float("inf")), log_weight + gumbel)
    top = keys.topk(min(num_sampled, num_classes)).indices
    chosen = torch.zeros_like(present)
    chosen[top] = True
    return present | (chosen & torch.isfinite(log_weight))


def federated_loss(logits: Tensor, labels: Tensor, class_mask: Tensor) -> Tensor:
    """Per-element federated BCE `[N, C+1]`; `class_mask [C]` selects the trained classes."""
    target = foreground_targets(labels, logits.shape[1] - 1, logits.dtype)
    column_weight = class_mask.to(logits.dtype).unsqueeze(0)
    return pad_background(
        F.binary_cross_entropy_with_logits(
            logits[:, 1:], target, weight=column_weight, reduction="none"
        )
    )


class FederatedLoss(SigmoidClassificationLoss):
    """Federated sigmoid loss; scores `sigmoid(z_j)`.

    Args:
        stats: class statistics (ClassStats): `image_count` gives f_c.
        num_classes_sampled: number of classes trained per batch (50 in the paper for LVIS).
        power: exponent on the image counts for the negative-sampling weights.
        seed: seed of the sampling generator (offset by the distributed rank).
    """

    # buffers (registered in __init__), annotated for type checkers
    log_weight: Tensor

    def __init__(
        self,
        *,
        stats: ClassStatsLike,
        num_classes: Optional[int] = None,
        num_classes_sampled: int = 50,
        power: float = 0.5,
        seed: int = 0,
        loss_weight: float = 1.0,
    ):
        super().__init__(
            num_classes=classes_from_stats(stats, num_classes), loss_weight=loss_weight
        )
        if num_classes_sampled < 1:
            raise ValueError(
                f"federated: num_classes_sampled must be >= 1, got {num_classes_sampled}"
            )
        self.num_classes_sampled = int(num_classes_sampled)
        self.power, self.seed = float(power), int(seed)
        counts = torch.as_tensor(stats.image_count, dtype=torch.float32)
        # log(f^power), with -inf (never sampled) for classes without training images; written
        # with where() so that power = 0 (uniform sampling) does not produce 0 * -inf = NaN.
        log_weight = torch.where(
            counts > 0,
            self.power * counts.clamp_min(1e-12).log(),
            torch.full_like(counts, float("-inf")),
        )
        self.register_buffer("log_weight", log_weight, persistent=False)
        self._generator = None

    def _uniform(self, device):
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed + get_rank())
        # Drawn on the CPU generator (device-independent stream), then copied to the device.
        return torch.rand(self.log_weight.numel(), generator=self._generator).to(device)

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        # Draws the next negative sample from the loss's generator: one draw per call.
        mask = federated_class_mask(
            labels, self.log_weight, self.num_classes_sampled, self._uniform(logits.device)
        )
        return federated_loss(logits, labels, mask)
