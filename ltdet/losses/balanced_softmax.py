"""Balanced softmax / logit adjustment (Ren et al., "Balanced Meta-Softmax", NeurIPS 2020;
Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, Sec. 4, the logit-adjusted
loss).

Training uses softmax CE on adjusted logits `z_c + tau * log(pi_c)`, with `pi` the class prior
over the C+1 columns of a RoI classifier. `tau = 1` is balanced softmax. In a detector the
background prior is the share of background RoIs the sampler produces (`bg_prior`, default
`1 - 0.25 = 0.75`, torchvision's positive fraction); the foreground prior splits the rest in
proportion to the training instance counts: `pi_c = (1 - bg_prior) * n_c / sum_k n_k`.

At test time the raw logits are the balanced predictor (Menon et al., Sec. 4): `activation` is a
plain softmax of `z`, without the prior.

Shapes: logits `[N, C+1]` (column 0 = background), labels `[N]` in `[0, C]`; loss `[N]`.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ClassificationLoss, ClassStatsLike, classes_from_stats


def detection_log_prior(instance_count: Tensor, bg_prior: float = 0.75) -> Tensor:
    """Log prior `[C+1]` over (background, classes); zero counts are treated as one instance."""
    n = torch.as_tensor(instance_count, dtype=torch.float64).clamp_min(1.0)
    prior = torch.cat([n.new_tensor([bg_prior]), (1.0 - bg_prior) * n / n.sum()])
    return prior.log().float()


def logit_adjusted_cross_entropy(
    logits: Tensor, labels: Tensor, log_prior: Tensor, tau: float = 1.0
) -> Tensor:
    """Per-RoI CE `[N]` of `z + tau * log(pi)`."""
    return F.cross_entropy(logits + tau * log_prior, labels, reduction="none")


class BalancedSoftmaxLoss(ClassificationLoss):
    """Logit-adjusted softmax CE.

    Args:
        stats: class statistics (ClassStats): `instance_count` gives the foreground prior.
        tau: adjustment strength (1 = balanced softmax).
        bg_prior: prior probability of background among the sampled RoIs (1 - positive fraction).
    """

    # buffers (registered in __init__), annotated for type checkers
    log_prior: Tensor

    def __init__(
        self,
        *,
        stats: ClassStatsLike,
        num_classes: Optional[int] = None,
        tau: float = 1.0,
        bg_prior: float = 0.75,
        loss_weight: float = 1.0,
    ):
        super().__init__(
            num_classes=classes_from_stats(stats, num_classes), loss_weight=loss_weight
        )
        if not 0.0 < bg_prior < 1.0:
            raise ValueError(f"balanced_softmax: bg_prior must be in (0, 1), got {bg_prior}")
        self.tau, self.bg_prior = float(tau), float(bg_prior)
        self.register_buffer(
            "log_prior", detection_log_prior(stats.instance_count, self.bg_prior), persistent=False
        )

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logit_adjusted_cross_entropy(
            logits, labels, self.log_prior.to(logits.dtype), self.tau
        )
