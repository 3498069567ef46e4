"""Balanced softmax / logit adjustment (Ren et al., "Balanced Meta-Softmax", NeurIPS 2020;
Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, Sec. 4, the logit-adjusted loss).

Training uses softmax CE on adjusted logits `z_c + tau * log(pi_c)`, with `pi` the class prior
over the C+1 columns of a RoI classifier. `tau = 1` is balanced softmax. In a detector the
background prior is the share of background RoIs the sampler produces (`bg_prior`, default
`1 - 0.25 = 0.75`, torchvision's positive fraction); the foreground prior splits the rest in
proportion to the training instance counts: `pi_c = (1 - bg_prior) * n_c / sum_k n_k`.

At test time the raw logits are the balanced predictor (Menon et al., Sec. 4): `activation` is a
plain softmax of `z`, without the prior.

Shapes: logits `[N, C+1]` (column 0 = background), labels `[N]` in `[0, C]`; loss `[N]`.
"""
import torch
import torch.nn.functional as F

from .base import ClassificationLoss, classes_from_stats
from .reduction import reduce_loss


def detection_log_prior(instance_count, bg_prior=0.75):
    """Log prior `[C+1]` over (background, classes); zero counts are treated as one instance."""
    n = torch.as_tensor(instance_count, dtype=torch.float64).clamp_min(1.0)
    prior = torch.cat([n.new_tensor([bg_prior]), (1.0 - bg_prior) * n / n.sum()])
    return prior.log().float()


def logit_adjusted_cross_entropy(logits, labels, log_prior, tau=1.0):
    """Per-RoI CE `[N]` of `z + tau * log(pi)`."""
    return F.cross_entropy(logits + tau * log_prior, labels, reduction="none")


class BalancedSoftmaxLoss(ClassificationLoss):
    """Logit-adjusted softmax CE.

    Args:
        stats: class statistics (ClassStats): `instance_count` gives the foreground prior.
        tau: adjustment strength (1 = balanced softmax).
        bg_prior: prior probability of background among the sampled RoIs (1 - positive fraction).
    """

    def __init__(self, *, stats, num_classes=None, tau=1.0, bg_prior=0.75, loss_weight=1.0):
        super().__init__(num_classes=classes_from_stats(stats, num_classes),
                         loss_weight=loss_weight)
        if not 0.0 < bg_prior < 1.0:
            raise ValueError(f"balanced_softmax: bg_prior must be in (0, 1), got {bg_prior}")
        self.tau, self.bg_prior = float(tau), float(bg_prior)
        self.register_buffer("log_prior", detection_log_prior(stats.instance_count, self.bg_prior),
                             persistent=False)

    def forward(self, logits, labels, weight=None, reduction="mean", avg_factor=None):
        self.check_inputs(logits, labels)
        loss = logit_adjusted_cross_entropy(logits, labels, self.log_prior.to(logits.dtype), self.tau)
        return self.loss_weight * reduce_loss(loss, weight, reduction, avg_factor)
