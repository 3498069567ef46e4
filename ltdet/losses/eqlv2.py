"""Equalization loss v2, EQLv2 (Tan et al., "Equalization Loss v2: A New Gradient Balance Approach
for Long-tailed Object Detection", CVPR 2021, Sec. 3).

Sigmoid BCE over all C+1 columns. Column 0 is the objectness / background column: its target is
1 for a background RoI and 0 for a foreground one (the one-hot of the label, as in the reference
implementation whose background column is trained the same way), and its weights stay 1. For
every foreground class j the loss keeps the accumulated absolute gradient w.r.t. the logit,
`|p - y|` times the element weight, over positives (`G+_j`) and negatives (`G-_j`), summed over
all ranks. With `g_j = G+_j / (G-_j + 1e-10)`:

    q_j = 1 / (1 + exp(-gamma (g_j - mu)))      (weight of negatives)
    r_j = 1 + alpha (1 - q_j)                   (weight of positives)
    L = sum_ij w_ij BCE(z_ij, y_ij) / N,  w = r y + q (1 - y)

`g` starts at 100 so the first step has all weights 1. The state (`pos_grad`, `neg_grad`,
`pos_neg`) lives in buffers, is updated in training mode only, after the loss of the step is
computed with the previous state, from detached values. Scores: `sigmoid(z_j) * (1 - sigmoid(z_0))`
in columns 1..C and `sigmoid(z_0)` in column 0.

Shapes: logits `[N, C+1]`, labels `[N]` in `[0, C]`; per-element loss `[N, C+1]`.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..collectives import all_reduce_sum
from .base import ClassificationLoss, one_hot_targets

# Initial gradient ratio: large, so that q = 1 and r = 1 before any statistics exist.
_INITIAL_POS_NEG = 100.0


def eqlv2_column_weights(
    pos_neg: Tensor, gamma: float, mu: float, alpha: float
) -> tuple[Tensor, Tensor]:
    """Positive and negative weights `[C+1]` (column 0 fixed at 1) from the ratios `g [C]`."""
    neg_w = torch.sigmoid(gamma * (pos_neg - mu))
    neg_w = torch.cat([neg_w.new_ones(1), neg_w])
    pos_w = 1.0 + alpha * (1.0 - neg_w)
    return pos_w, neg_w


def eqlv2_loss(logits: Tensor, labels: Tensor, pos_w: Tensor, neg_w: Tensor) -> Tensor:
    """Per-element EQLv2 `[N, C+1]` with column weights `pos_w`, `neg_w` `[C+1]`."""
    target = one_hot_targets(labels, logits.shape[1], logits.dtype)
    # w = r y + q (1 - y): q everywhere, then r on the one positive column of each row.
    weight = neg_w.expand_as(logits).clone()
    weight.scatter_(1, labels.unsqueeze(1), pos_w[labels].unsqueeze(1))
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")


@torch.no_grad()
def eqlv2_gradient_sums(
    logits: Tensor, labels: Tensor, pos_w: Tensor, neg_w: Tensor, weight: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Per-column sums `[C+1]` of `|dBCE/dz| * w` over positive and over negative elements.

    `|p - y|` is `1 - p` on a positive and `p` on a negative, and each row has exactly one
    positive, so the sums need one pass over the `[N, C+1]` probabilities plus O(N) work:
    `neg_j = q_j sum_{i: y_i != j} u_ij p_ij` (the true entries zeroed, then column sums) and
    `pos_j = r_j sum_{i: y_i = j} u_ij sigmoid(-z_ij)`, with `u` the caller's weights (default
    1). Neither is a difference of large sums: the column sum minus the positives' and the
    positive count minus their probabilities both cancel in float32 when the positives are
    confident (4e-4 and 3e-6 relative error with true-class p = 0.88 on 1204 columns).
    """
    # Sums over every RoI (or anchor): at least float32 so float16 (AMP) logits cannot overflow.
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    prob = z.sigmoid()
    true_z = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    if weight is not None:
        weight = weight.to(prob.dtype)
    if weight is not None and weight.dim() == 2:
        prob = prob * weight
        u_true = weight.gather(1, labels.unsqueeze(1)).squeeze(1)
    elif weight is not None:
        prob = prob * weight.unsqueeze(1)
        u_true = weight
    else:
        u_true = torch.ones_like(labels, dtype=prob.dtype)
    prob.scatter_(1, labels.unsqueeze(1), 0.0)  # the negatives alone (prob is a fresh tensor)
    neg_prob = prob.sum(dim=0)
    pos_grad = torch.zeros_like(neg_prob).index_add_(0, labels, u_true * torch.sigmoid(-true_z))
    return pos_w.to(prob.dtype) * pos_grad, neg_w.to(prob.dtype) * neg_prob


class EQLv2Loss(ClassificationLoss):
    """EQLv2 with gradient statistics in buffers (`pos_grad`, `neg_grad`, `pos_neg`, all `[C]`)."""

    # buffers (registered in __init__), annotated for type checkers
    pos_grad: Tensor
    neg_grad: Tensor
    pos_neg: Tensor

    use_sigmoid = True

    def __init__(
        self,
        *,
        num_classes: int,
        gamma: float = 12.0,
        mu: float = 0.8,
        alpha: float = 4.0,
        loss_weight: float = 1.0,
    ):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)
        self.gamma, self.mu, self.alpha = float(gamma), float(mu), float(alpha)
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        self.register_buffer("pos_neg", torch.full((num_classes,), _INITIAL_POS_NEG))

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        prob = logits.sigmoid()
        bg = prob[:, :1]
        return torch.cat([bg, prob[:, 1:] * (1.0 - bg)], dim=1)

    @torch.no_grad()
    def _collect_gradients(
        self, logits: Tensor, labels: Tensor, pos_w: Tensor, neg_w: Tensor, weight: Optional[Tensor]
    ) -> None:
        """Add this step's |dL/dz| (per class, positives and negatives) to the state."""
        pos, neg = eqlv2_gradient_sums(logits, labels, pos_w, neg_w, weight)
        # Column 0 (objectness) keeps weight 1 and has no statistics.
        increment = all_reduce_sum(torch.stack([pos[1:], neg[1:]]).to(self.pos_grad.dtype))
        self.pos_grad += increment[0]
        self.neg_grad += increment[1]
        self.pos_neg.copy_(self.pos_grad / (self.neg_grad + 1e-10))

    def _column_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return eqlv2_column_weights(self.pos_neg.to(dtype), self.gamma, self.mu, self.alpha)

    def elementwise(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss under the current statistics, without updating them."""
        return eqlv2_loss(logits, labels, *self._column_weights(logits.dtype))

    def loss_elements(self, logits: Tensor, labels: Tensor, weight: Optional[Tensor]) -> Tensor:
        """`elementwise`, then (training mode) the step's gradients join the statistics, with the
        same column weights: the state of the next step, never of this one."""
        pos_w, neg_w = self._column_weights(logits.dtype)
        loss = eqlv2_loss(logits, labels, pos_w, neg_w)
        if self.training:
            # The gradient that actually flows includes the caller's weights (e.g. ignored RoIs).
            self._collect_gradients(
                logits.detach(),
                labels,
                pos_w,
                neg_w,
                None if weight is None else weight.detach().to(logits.dtype),
            )
        return loss
