"""Seesaw loss (Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021,
Sec. 3).

Softmax CE in which the logit of every negative class j of a sample of class i is shifted by
`log S_ij`, so that

    sigma_i = e^{z_i} / (sum_{j != i} S_ij e^{z_j} + e^{z_i}),   S_ij = M_ij * C_ij
    M_ij = (N_j / N_i)^p if N_j < N_i else 1        (mitigation, N = cumulative instance counts)
    C_ij = (sigma_j / sigma_i)^q if sigma_j > sigma_i else 1   (compensation, detached scores)

with `p = 0.8, q = 2`, and `sigma_i` in C_ij clamped below at `eps = 1e-2` (as the reference
implementation does, so a tiny self-score cannot blow the factor up).

Background (column 0 = torchvision's background). The paper and mmdetection give background its
own objectness branch, so the seesaw factors only ever act between foreground classes. A
torchvision box predictor has a single `[N, C+1]` softmax, so here the same decoupling is done
inside it: `S_ij = 1` whenever i or j is the background (background RoIs keep plain CE and
suppress every class at full strength; a foreground RoI's background logit is not re-scaled),
and the cumulative counts `N` cover the foreground classes only. Seesaw then re-balances exactly
the class-vs-class gradients it was designed for. Scores at test time: plain softmax.

Shapes: logits `[N, C+1]`, labels `[N]` in `[0, C]`; per-element loss `[N]`. State: buffer
`cum_samples [C]` (float64: exact counts far beyond 2^24), updated in training mode from the
labels of the step (before the loss, like the reference) and all-reduced across ranks.
"""
import math

import torch
import torch.nn.functional as F

from .base import ClassificationLoss
from .reduction import all_reduce_sum, reduce_loss


@torch.no_grad()
def seesaw_log_factors(logits, labels, cum_samples, p=0.8, q=2.0, eps=1e-2):
    """`log S_ij` `[N, C+1]` for each RoI (row) and column; 0 on background rows and column 0."""
    log_s = torch.zeros_like(logits)
    if p > 0:
        log_n = torch.cat([cum_samples.new_zeros(1), cum_samples.clamp_min(1.0).log()]).to(logits.dtype)
        log_s += (log_n.unsqueeze(0) - log_n[labels].unsqueeze(1)).mul_(p).clamp_max_(0.0)
    if q > 0:
        log_scores = F.log_softmax(logits, dim=1)
        log_self = log_scores.gather(1, labels.unsqueeze(1)).clamp_min_(math.log(eps))
        log_s += log_scores.sub_(log_self).mul_(q).clamp_min_(0.0)
    log_s[:, 0] = 0.0
    return log_s.mul_((labels > 0).to(logits.dtype).unsqueeze(1))


def seesaw_cross_entropy(logits, labels, cum_samples, p=0.8, q=2.0, eps=1e-2):
    """Per-RoI seesaw loss `[N]`."""
    log_s = seesaw_log_factors(logits.detach(), labels, cum_samples, p, q, eps)
    # The target column has M = C = 1 (ratio 1), so log S is already 0 there.
    return F.cross_entropy(logits + log_s, labels, reduction="none")


class SeesawLoss(ClassificationLoss):
    """Seesaw loss with the cumulative per-class counts in buffer `cum_samples`."""

    def __init__(self, *, num_classes, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)
        if eps <= 0:
            raise ValueError(f"seesaw: eps must be > 0, got {eps}")
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.register_buffer("cum_samples", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def _count(self, labels):
        counts = torch.bincount(labels, minlength=self.num_classes + 1)[1:]
        self.cum_samples += all_reduce_sum(counts.to(self.cum_samples.dtype))

    def forward(self, logits, labels, weight=None, reduction="mean", avg_factor=None):
        self.check_inputs(logits, labels)
        if self.training:
            self._count(labels)
        loss = seesaw_cross_entropy(logits, labels, self.cum_samples, self.p, self.q, self.eps)
        return self.loss_weight * reduce_loss(loss, weight, reduction, avg_factor)
