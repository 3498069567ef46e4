"""Seesaw loss (Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021,
Sec. 3).

Softmax CE in which the logit of every negative class j of a sample of class i is shifted by
`log S_ij`, so that

    sigma_i = e^{z_i} / (sum_{j != i} S_ij e^{z_j} + e^{z_i}),   S_ij = M_ij * C_ij
    M_ij = (N_j / N_i)^p if N_j < N_i else 1        (mitigation, N = cumulative instance counts)
    C_ij = (sigma_j / sigma_i)^q if sigma_j > sigma_i else 1   (compensation, detached scores)

with `p = 0.8, q = 2`, and `sigma_i` in C_ij clamped below at `eps = 1e-2` (as the reference
implementation does, so a tiny self-score cannot blow the factor up).

Two losses (registry `seesaw`, `seesaw_softmax`):

`SeesawLoss` (`seesaw`): the authors' design (mmdetection `mmdet/models/losses/seesaw_loss.py`,
`SeesawLoss` with `custom_cls_channels`). The classifier has `cls_channels = C + 2` outputs: the
C class logits, trained with the seesaw softmax above on foreground RoIs only, and a 2-way
objectness (foreground vs background) trained with plain softmax CE on every sampled RoI; the two
terms are summed with the same weights, `avg_factor` and `loss_weight` (mmdetection returns them
as `loss_cls_classes` and `loss_cls_objectness`, which its trainer sums). Background RoIs never
touch the class logits. Column order (torchvision's conventions kept where they exist):

    column 0        objectness logit "background"   (mmdetection: last column, C + 1)
    columns 1..C    class logits, column j = label j (mmdetection: columns 0..C-1, label j-1)
    column C + 1    objectness logit "foreground"   (mmdetection: column C)

so column 0 is the background in the logits and in the scores, class j keeps torchvision's index
j, and `activation` maps `[N, C+2]` to the usual `[N, C+1]` scores: column 0 = `p_bg` (the
objectness softmax's background probability), column j = `softmax_j(classes) * p_fg`
(mmdetection's `get_activation`, with its background column moved first). Every row sums to 1.
State: `cum_samples [C+1]` (index = label, 0 = background), counted from every label of the step
as mmdetection does (its buffer also counts background, at index C, and never reads it); the
mitigation factors read the foreground counts `cum_samples[1:]`.

`SeesawSoftmaxLoss` (`seesaw_softmax`, an ltdet variant, not the authors'): one softmax over
torchvision's `[N, C+1]` columns, `S_ij = 1` whenever i or j is the background, counts of the
foreground classes only (`cum_samples [C]`). It keeps a torchvision C+1 predictor (pretrained or
stage-1 weights, LWS on a C+1 classifier, checkpoints of ltdet's `seesaw` from before the
objectness design), at a price the authors' design does not pay: every background RoI pushes
every class logit down with plain CE, unmitigated (for a rare class this push dwarfs the one
seesaw mitigates; docs/losses.md). Scores: plain softmax.

Both: labels `[N]` in `[0, C]`; per-element loss `[N]` (one value per RoI); `cum_samples` float64
(exact counts far beyond 2^24), updated in training mode only, from the labels of the step before
the loss (as the reference), all-reduced across ranks.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..collectives import all_reduce_sum
from .base import ClassificationLoss


@torch.no_grad()
def seesaw_log_factors(
    logits: Tensor,
    labels: Tensor,
    cum_samples: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> Tensor:
    """`log S_ij` `[N, C+1]` for each RoI (row) and column; 0 on background rows and column 0."""
    log_s = torch.zeros_like(logits)
    if p > 0:
        log_n = torch.cat([cum_samples.new_zeros(1), cum_samples.clamp_min(1.0).log()]).to(
            logits.dtype
        )
        log_s += (log_n.unsqueeze(0) - log_n[labels].unsqueeze(1)).mul_(p).clamp_max_(0.0)
    if q > 0:
        log_scores = F.log_softmax(logits, dim=1)
        log_self = log_scores.gather(1, labels.unsqueeze(1)).clamp_min_(math.log(eps))
        log_s += log_scores.sub_(log_self).mul_(q).clamp_min_(0.0)
    log_s[:, 0] = 0.0
    return log_s.mul_((labels > 0).to(logits.dtype).unsqueeze(1))


def seesaw_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    cum_samples: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> Tensor:
    """Per-RoI seesaw loss `[N]`."""
    log_s = seesaw_log_factors(logits.detach(), labels, cum_samples, p, q, eps)
    # The target column has M = C = 1 (ratio 1), so log S is already 0 there.
    return F.cross_entropy(logits + log_s, labels, reduction="none")


class _SeesawCounts(ClassificationLoss):
    """What both seesaw losses share: hyper-parameters, the cumulative label counts
    `cum_samples` (float64 buffer) and counting them before the loss of each training step."""

    num_classes: int  # required here: the counts have one entry per class
    # buffers (registered in __init__), annotated for type checkers
    cum_samples: Tensor

    #: Whether `cum_samples` has a background entry at index 0 (`[C+1]`) or not (`[C]`).
    counts_background: bool = False

    def __init__(
        self,
        *,
        num_classes: int,
        p: float = 0.8,
        q: float = 2.0,
        eps: float = 1e-2,
        loss_weight: float = 1.0,
    ):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)
        if eps <= 0:
            raise ValueError(f"seesaw: eps must be > 0, got {eps}")
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.register_buffer(
            "cum_samples",
            torch.zeros(num_classes + int(self.counts_background), dtype=torch.float64),
        )

    @torch.no_grad()
    def _count(self, labels: Tensor) -> None:
        counts = torch.bincount(labels, minlength=self.num_classes + 1)
        if not self.counts_background:
            counts = counts[1:]
        self.cum_samples += all_reduce_sum(counts.to(self.cum_samples.dtype))

    def loss_elements(self, logits: Tensor, labels: Tensor, weight: Optional[Tensor]) -> Tensor:
        """Counts this step's labels first (training mode), as the reference, then the loss."""
        if self.training:
            self._count(labels)
        return self.elementwise(logits, labels)


class SeesawSoftmaxLoss(_SeesawCounts):
    """`seesaw_softmax`: seesaw inside one `[N, C+1]` softmax (an ltdet variant, module
    docstring), with the cumulative foreground counts in buffer `cum_samples [C]`."""

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return seesaw_cross_entropy(logits, labels, self.cum_samples, self.p, self.q, self.eps)


# ----------------------------------------------------------------------------- the authors' design


def split_seesaw_logits(logits: Tensor) -> tuple[Tensor, Tensor]:
    """`[N, C+2]` logits -> (class logits `[N, C]` = columns 1..C, objectness logits `[N, 2]` =
    (column 0 "background", column C+1 "foreground"), so objectness target 1 = foreground)."""
    return logits[:, 1:-1], torch.stack([logits[:, 0], logits[:, -1]], dim=1)


def seesaw_objectness_scores(logits: torch.Tensor) -> torch.Tensor:
    """Scores `[N, C+1]` from seesaw's `[N, C+2]` logits: column 0 = `p_bg` of the objectness
    softmax, column j = `softmax_j(class logits) * p_fg`; rows sum to 1 (TorchScript-able)."""
    objectness = torch.stack([logits[:, 0], logits[:, -1]], dim=1).softmax(dim=1)
    classes = logits[:, 1:-1].softmax(dim=1) * objectness[:, 1:]
    return torch.cat([objectness[:, :1], classes], dim=1)


@torch.no_grad()
def seesaw_class_log_factors(
    class_logits: Tensor,
    targets: Tensor,
    counts: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> Tensor:
    """`log S_ij` `[P, C]` of foreground RoIs: class logits `[P, C]`, targets `[P]` in
    `[0, C-1]` (label - 1), foreground counts `[C]` (clamped at 1, as the reference)."""
    log_s = torch.zeros_like(class_logits)
    if p > 0:
        log_n = counts.clamp_min(1.0).log().to(class_logits.dtype)
        log_s += (log_n.unsqueeze(0) - log_n[targets].unsqueeze(1)).mul_(p).clamp_max_(0.0)
    if q > 0:
        log_scores = F.log_softmax(class_logits, dim=1)
        log_self = log_scores.gather(1, targets.unsqueeze(1)).clamp_min_(math.log(eps))
        log_s += log_scores.sub_(log_self).mul_(q).clamp_min_(0.0)
    return log_s  # 0 in the target column: M = C = 1 there


def seesaw_objectness_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    fg_counts: Tensor,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> Tensor:
    """Per-RoI loss `[N]` on `[N, C+2]` logits: objectness CE (every RoI) + seesaw CE over the C
    class logits (foreground RoIs only; background rows contribute nothing to the classes)."""
    class_logits, objectness = split_seesaw_logits(logits)
    is_fg = labels > 0
    loss = F.cross_entropy(objectness, is_fg.long(), reduction="none")
    positive = torch.where(is_fg)[0]
    z = class_logits[positive]
    targets = labels[positive] - 1
    log_s = seesaw_class_log_factors(z.detach(), targets, fg_counts, p, q, eps)
    return loss.index_add(0, positive, F.cross_entropy(z + log_s, targets, reduction="none"))


class SeesawLoss(_SeesawCounts):
    """`seesaw`: the authors' seesaw with its objectness branch (module docstring); the
    classifier has `C + 2` outputs and `activation` returns `[N, C+1]` scores. Buffer
    `cum_samples [C+1]`, index = label (0 = background, counted like the reference)."""

    counts_background = True

    def get_cls_channels(self, num_classes: int) -> int:
        """C classes + 2 objectness channels (mmdetection's `get_cls_channels`)."""
        return int(num_classes) + 2

    def _layout(self) -> str:
        return (
            f"C+2 = {self.cls_channels} logit columns: 0 = objectness background, 1..C = "
            f"classes, C+1 = objectness foreground"
        )

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        return seesaw_objectness_cross_entropy(
            logits, labels, self.cum_samples[1:], self.p, self.q, self.eps
        )

    def activation(self, logits: Tensor) -> Tensor:
        """`[N, C+2]` logits -> `[N, C+1]` scores (`seesaw_objectness_scores`)."""
        return seesaw_objectness_scores(logits)
