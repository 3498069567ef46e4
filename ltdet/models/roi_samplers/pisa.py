"""`pisa`: prime sample attention (Cao et al., "Prime Sample Attention in Object Detection", CVPR
2020): IoU-HLR / ISR-P on positives, score-HLR / ISR-N on negatives, CARL on the box loss; and
the ranking maths they are built from (hierarchical local ranks, importance weights)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, nms

from ltdet.spec import check_choice, check_number

from .base import RoICandidates, RoISampler, RoISamples, RoIScorer, RoISelection, random_subset

__all__ = [
    "PISARoISampler",
    "aligned_iou",
    "hierarchical_rank",
    "importance_weights",
    "iou_hlr",
    "score_hlr",
]


def hierarchical_rank(groups: Tensor, keys: list[tuple[Tensor, bool]]) -> Tensor:
    """Rank (0-based) of every element inside its group, ordering by `keys` lexicographically.

    groups [M] int; keys: (values [M], descending) from most to least significant. Ties keep the
    input order. Built from stable sorts (least significant key first), no loop over elements."""
    num = groups.numel()
    order = torch.arange(num, device=groups.device)
    for values, descending in reversed(keys):
        order = order[torch.sort(values[order], descending=descending, stable=True).indices]
    order = order[torch.sort(groups[order], stable=True).indices]
    sorted_groups = groups[order]
    position = torch.arange(num, device=groups.device)
    is_start = torch.ones(num, dtype=torch.bool, device=groups.device)
    is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = torch.where(is_start, position, torch.zeros_like(position))
    group_start = torch.cummax(starts, 0).values
    rank = torch.empty_like(position)
    rank[order] = position - group_start
    return rank


def iou_hlr(labels: Tensor, gt_index: Tensor, ious: Tensor) -> tuple[Tensor, int]:
    """IoU hierarchical local rank of positives (PISA, Cao et al. 2020, Sec. 3.2).

    labels [P] classes of the positives, gt_index [P] their ground truth (unique over the batch),
    ious [P]. Local rank = rank by IoU (desc) among the positives of the same ground truth; the
    IoU-HLR of a positive is its rank among the positives of its class ordered by (local rank asc,
    IoU desc). Returns (rank [P], n_max = largest positive count of any class)."""
    if labels.numel() == 0:
        return torch.zeros_like(labels), 0
    local = hierarchical_rank(gt_index, [(ious, True)])
    rank = hierarchical_rank(labels, [(local, False), (ious, True)])
    return rank, int(torch.bincount(labels).max())


def score_hlr(boxes: Tensor, scores: Tensor, nms_thresh: float) -> Tensor:
    """Score hierarchical local rank of negatives (PISA, Sec. 3.2, "score-HLR").

    boxes [V, 4] predicted boxes, scores [V] their highest foreground score. A local NMS at
    `nms_thresh` splits the boxes into groups (each kept box plus the boxes it suppresses, i.e.
    every box joins the first kept box, in score order, that overlaps it above the threshold);
    local rank = rank by score within the group; the score-HLR is the rank over all boxes by
    (local rank asc, score desc). Returns rank [V]."""
    num = scores.numel()
    if num == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    keep = nms(boxes.float(), scores.float(), nms_thresh)
    overlaps = box_iou(boxes.float(), boxes[keep].float()) > nms_thresh
    has_group = overlaps.any(1)
    # argmax returns the first True, i.e. the highest-scoring kept box above the threshold, which
    # is the one greedy NMS suppressed this box with; a degenerate box (IoU nan) stays alone
    group = torch.where(
        has_group, overlaps.int().argmax(1), keep.numel() + torch.arange(num, device=scores.device)
    )
    local = hierarchical_rank(group, [(scores, True)])
    return hierarchical_rank(torch.zeros_like(group), [(local, False), (scores, True)])


def importance_weights(rank: Tensor, n_max: int, gamma: float, beta: float) -> Tensor:
    """PISA importance-based sample reweighting (ISR), Sec. 3.3: `u = (n_max - r) / n_max`,
    `w = ((1 - beta) u + beta) ** gamma`."""
    u = (n_max - rank.float()) / max(n_max, 1)
    return ((1.0 - beta) * u + beta).pow(gamma)


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of each box in a [P, 4] with the box in the same row of b [P, 4] (xyxy)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter).clamp(min=torch.finfo(a.dtype).eps)


class PISARoISampler(RoISampler):
    """Prime Sample Attention (Cao et al., "Prime Sample Attention in Object Detection", CVPR 2020).

    - Positives: up to `int(B * positive_fraction)` random positives (as torchvision); after the
      training forward, ISR-P (Sec. 3.3, Eq. 4-5) weights their classification loss by
      `((1 - beta) u + beta) ** gamma` with `u` from the IoU-HLR over the batch, rescaled so the
      positives' summed classification loss is unchanged. `iou="regressed"` ranks by the IoU of the
      regressed box with its ground truth (the paper's localisation quality, as mmdetection),
      `"proposal"` by the proposal's IoU.
    - Negatives: the box head runs without gradient on all negatives; those whose best foreground
      score exceeds `score_thresh` are ranked by score-HLR (local NMS at `nms_thresh` on their
      predicted boxes) and the top-ranked are kept (random low-score negatives fill the rest);
      ISR-N weights them with `neg_gamma` / `neg_beta` (`u = (n_max - r) / n_max`,
      `n_max = max(#kept negatives, #valid)`; random fill gets the smallest weight), rescaled so
      their summed classification loss is unchanged.
    - CARL (Sec. 3.4, Eq. 6): an extra loss `loss_carl = sum_i c_i L_box(i) / N`,
      `c_i = ((1 - bias) p_i + bias) ** k`, `p_i` the score of positive i for its ground-truth
      class (the classification loss's activation, with gradient, so CARL also trains the
      classifier), `c` rescaled to sum to #positives, `N` the sampled RoIs. As in mmdetection
      (`carl_loss` in mmdet/models/losses/pisa_loss.py, added by `PISARoIHead` to the head's
      losses), it is *added* to the ordinary, unweighted `loss_box_reg`, not a re-weighting of it.
    An image without ground truth contributes negatives only."""

    needs_features = True

    @property
    def extra_box_loss_key(self) -> str | None:
        return "loss_carl" if self.carl else None

    def __init__(
        self,
        *,
        gamma: float = 2.0,
        beta: float = 0.0,
        k: float = 1.0,
        bias: float = 0.2,
        neg_gamma: float = 0.5,
        neg_beta: float = 0.0,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        iou: str = "regressed",
        isr_p: bool = True,
        isr_n: bool = True,
        carl: bool = True,
        batch_size_per_image: int | None = None,
        positive_fraction: float | None = None,
    ):
        super().__init__(
            batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction
        )
        check_choice("sampler.iou", iou, ("regressed", "proposal"))
        for name, value in (("gamma", gamma), ("k", k), ("neg_gamma", neg_gamma)):
            check_number(f"sampler.{name}", value)
        for name, value in (
            ("beta", beta),
            ("bias", bias),
            ("neg_beta", neg_beta),
            ("score_thresh", score_thresh),
            ("nms_thresh", nms_thresh),
        ):
            check_number(f"sampler.{name}", value, low=0.0, high=1.0)
        self.gamma, self.beta, self.k, self.bias = float(gamma), float(beta), float(k), float(bias)
        self.neg_gamma, self.neg_beta = float(neg_gamma), float(neg_beta)
        self.score_thresh, self.nms_thresh, self.iou = float(score_thresh), float(nms_thresh), iou
        self.isr_p, self.isr_n, self.carl = bool(isr_p), bool(isr_n), bool(carl)

    def forward(self, scorer: RoIScorer, candidates: list[RoICandidates]) -> list[RoISelection]:
        batch, max_pos = self.budget(scorer)
        positives = []
        negatives = []
        for cand in candidates:
            positive = torch.where(cand.labels >= 1)[0]
            positives.append(random_subset(positive, min(positive.numel(), max_pos)))
            negatives.append(torch.where(cand.labels == 0)[0])
        if not self.isr_n or sum(n.numel() for n in negatives) == 0:
            return [
                RoISelection(
                    torch.cat([p, random_subset(n, min(n.numel(), batch - p.numel()))])
                    .sort()
                    .values
                )
                for p, n in zip(positives, negatives)
            ]
        neg_boxes = [c.boxes[n] for c, n in zip(candidates, negatives)]
        class_logits, box_regression = scorer.roi_logits(neg_boxes)
        with torch.no_grad():
            scores = scorer.scores(class_logits)
            neg_loss = scorer.cls_loss_per_roi(
                class_logits, torch.zeros_like(class_logits[:, 0], dtype=torch.long)
            )
        sizes = [n.numel() for n in negatives]
        selections = []
        for pos, neg, boxes, score, deltas, loss in zip(
            positives,
            negatives,
            neg_boxes,
            scores.split(sizes),
            box_regression.split(sizes),
            neg_loss.split(sizes),
        ):
            chosen, weight = self._isr_n(scorer, boxes, score, deltas, loss, batch - pos.numel())
            indices = torch.cat([pos, neg[chosen]])
            cls_weight = torch.cat([weight.new_ones(pos.numel()), weight])
            order = torch.sort(indices).indices
            selections.append(RoISelection(indices[order], cls_weight[order]))
        return selections

    def _isr_n(
        self,
        scorer: RoIScorer,
        boxes: Tensor,
        scores: Tensor,
        deltas: Tensor,
        loss: Tensor,
        num_expected: int,
    ) -> tuple[Tensor, Tensor]:
        """(indices into the image's negatives, ISR-N weights) for one image."""
        num_expected = min(num_expected, boxes.shape[0])
        max_score, argmax = scores[:, 1:].max(1)
        valid = torch.where(max_score > self.score_thresh)[0]
        invalid = torch.where(max_score <= self.score_thresh)[0]
        num_hlr = min(valid.numel(), num_expected)
        if num_hlr == 0:
            return random_subset(invalid, num_expected), loss.new_ones(num_expected)
        deltas = deltas.reshape(deltas.shape[0], -1, 4)[valid, argmax[valid] + 1]
        pred_boxes = scorer.decode_boxes(deltas, boxes[valid])
        rank = score_hlr(pred_boxes, max_score[valid], self.nms_thresh)
        by_rank = torch.argsort(rank)[:num_hlr]
        fill = random_subset(invalid, num_expected - num_hlr)
        chosen = torch.cat([valid[by_rank], fill])
        n_max = max(num_expected, valid.numel())
        weight = importance_weights(rank[by_rank], n_max, self.neg_gamma, self.neg_beta)
        weight = torch.cat([weight, weight[-1:].expand(fill.numel())])  # random fill: lowest weight
        kept_loss = loss[chosen]
        weight = weight * kept_loss.sum() / (kept_loss * weight).sum().clamp(min=1e-12)
        return chosen, weight

    def loss_weights(
        self, scorer: RoIScorer, class_logits: Tensor, box_regression: Tensor, samples: RoISamples
    ) -> tuple[Tensor | None, Tensor | None]:
        labels = torch.cat(samples.labels)
        positive = torch.where(labels > 0)[0]
        cls_weight = torch.cat(samples.cls_weights) if samples.cls_weights is not None else None
        box_weight = None
        if positive.numel() == 0:
            return cls_weight, box_weight
        labels_pos = labels[positive]
        if self.isr_p:
            with torch.no_grad():
                base = (
                    torch.cat(samples.gt_weights)[positive]
                    if samples.gt_weights is not None
                    else None
                )
                sizes = [0] + [g.shape[0] for g in samples.gt_boxes[:-1]]
                offsets = torch.cumsum(torch.tensor(sizes, device=labels.device), 0)
                gt_index = torch.cat([m + o for m, o in zip(samples.matched_idxs, offsets)])
                gt_index = gt_index[positive]
                if self.iou == "regressed":
                    deltas = box_regression.detach().reshape(labels.numel(), -1, 4)
                    deltas = deltas[positive, labels_pos]
                    pred = scorer.decode_boxes(deltas, torch.cat(samples.proposals)[positive])
                    ious = aligned_iou(pred, torch.cat(samples.matched_gt_boxes)[positive])
                else:
                    ious = torch.cat(samples.ious)[positive]
                rank, n_max = iou_hlr(labels_pos, gt_index, ious)
                weight = importance_weights(rank, n_max, self.gamma, self.beta)
                loss = scorer.cls_loss_per_roi(class_logits.detach()[positive], labels_pos)
                if base is not None:
                    loss = loss * base
                weight = weight * loss.sum() / (loss * weight).sum().clamp(min=1e-12)
                if cls_weight is None:
                    cls_weight = class_logits.new_ones(labels.numel())
                cls_weight = cls_weight.clone()
                cls_weight[positive] = weight
        if self.carl:
            score = scorer.scores(class_logits[positive]).gather(1, labels_pos[:, None])[:, 0]
            carl = ((1.0 - self.bias) * score + self.bias).pow(self.k)
            box_weight = carl * (positive.numel() / carl.sum().clamp(min=1e-12))
        return cls_weight, box_weight
