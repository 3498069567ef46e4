"""RoI samplers for `LTRoIHeads`: which proposals the box head learns from, and how much.

Label convention (torchvision's): per proposal `labels` in `[-1, C]`, -1 = ignored (IoU between
the matcher's thresholds), 0 = background, 1..C = foreground class.

A sampler is called once per training step by `LTRoIHeads.select_training_samples` with one
`RoICandidates` per image (all proposals with the ground truth appended, and their assignment),
and returns one `RoISelection` per image (indices into the candidates, plus optional
classification weights of the kept RoIs). After the box head has run with gradient on the kept
RoIs, `loss_weights` may return per-RoI classification weights `[N]` and per-positive box-loss
weights `[P]` (PISA's ISR-P and CARL); the head multiplies them with its own weights (mixup, LDS)
and passes the products to the losses' `weight` argument, so every sampler combines with every
classification loss. A sampler whose `extra_box_loss_key` is set (PISA with CARL: `"loss_carl"`)
asks for its box weights to define an *extra* loss term under that key instead: the head keeps
the ordinary box loss unweighted by them and adds `sum_i c_i L_box(i) / N` (mmdetection's
`PISARoIHead`: `loss_bbox` plus `carl_loss`).

Samplers:
- `random`: torchvision's `BalancedPositiveNegativeSampler` (same random draws), plus Fast
  R-CNN's lower IoU bound for negatives `bg_iou_lo` (negatives only from IoU in
  `[bg_iou_lo, bg_iou_thresh)`; Girshick, ICCV 2015, Sec. 2.3).
- `ohem`: online hard example mining (Shrivastava et al., CVPR 2016, Sec. 4).
- `pisa`: prime sample attention (Cao et al., CVPR 2020): IoU-HLR / ISR-P on positives,
  score-HLR / ISR-N on negatives, CARL on the box loss.

Build one with `build_roi_sampler({"type": "ohem", "nms_thresh": 0.7})`.
"""
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, nms


@dataclass
class RoICandidates:
    """All candidate RoIs of one image (proposals, then ground-truth boxes) and their assignment.

    boxes [R, 4] xyxy; labels int64 [R] in [-1, C]; matched_idxs int64 [R] index of the matched
    ground truth in the image's targets (0 where the image has none); ious [R] IoU with that
    ground truth (0 where the image has none); gt_boxes [K, 4]."""

    boxes: Tensor
    labels: Tensor
    matched_idxs: Tensor
    ious: Tensor
    gt_boxes: Tensor


@dataclass
class RoISelection:
    """RoIs kept for one image: indices [S] into its `RoICandidates` and optional classification
    weights [S] of those RoIs (None = all 1)."""

    indices: Tensor
    cls_weight: Optional[Tensor] = None


class RoISampler(nn.Module):
    """Base: `batch_size_per_image` / `positive_fraction` default to the head's
    (torchvision `RoIHeads.fg_bg_sampler`) when left None."""

    #: whether `forward` runs the box head on candidates (needs the feature maps)
    needs_features = False
    #: loss-dict key of an extra box-loss term weighted by `loss_weights`' box weights (added to
    #: the unweighted box loss); None: the box weights multiply the box loss itself
    extra_box_loss_key: Optional[str] = None

    def __init__(self, *, batch_size_per_image: Optional[int] = None,
                 positive_fraction: Optional[float] = None):
        super().__init__()
        if batch_size_per_image is not None and int(batch_size_per_image) < 1:
            raise ValueError(f"sampler.batch_size_per_image must be >= 1, got {batch_size_per_image}")
        if positive_fraction is not None and not 0.0 <= float(positive_fraction) <= 1.0:
            raise ValueError(f"sampler.positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def budget(self, head) -> tuple[int, int]:
        """(RoIs per image, largest number of positives per image)."""
        batch = self.batch_size_per_image or head.fg_bg_sampler.batch_size_per_image
        fraction = (self.positive_fraction if self.positive_fraction is not None
                    else head.fg_bg_sampler.positive_fraction)
        return int(batch), int(batch * fraction)

    def validate(self, head) -> None:
        """Checks the sampler against the head it is installed in; raises ValueError."""

    def loss_weights(self, head, class_logits: Tensor, box_regression: Tensor, samples):
        """(cls weight [N] or None, box weight [P] over positives in order, or None)."""
        return None, None

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items()
                         if not k.startswith("_") and k != "training")


def _random_subset(indices: Tensor, num: int) -> Tensor:
    return indices[torch.randperm(indices.numel(), device=indices.device)[:num]]


class RandomRoISampler(RoISampler):
    """torchvision's balanced random sampling, with negatives restricted to IoU >= `bg_iou_lo`.

    Per image: up to `int(B * positive_fraction)` random positives, the rest of the `B` random
    negatives. The random draws are torchvision's (one `randperm` over positives, then one over
    negatives per image), so with `bg_iou_lo = 0` the same seed picks the same RoIs. An image
    without ground truth has only IoU-0 candidates, so with `bg_iou_lo > 0` it contributes no RoIs
    (as in Fast R-CNN)."""

    def __init__(self, *, bg_iou_lo: float = 0.0, batch_size_per_image: Optional[int] = None,
                 positive_fraction: Optional[float] = None):
        super().__init__(batch_size_per_image=batch_size_per_image,
                         positive_fraction=positive_fraction)
        self.bg_iou_lo = float(bg_iou_lo)

    def validate(self, head) -> None:
        bg_hi = head.proposal_matcher.low_threshold
        if not 0.0 <= self.bg_iou_lo < bg_hi:
            raise ValueError(f"sampler.bg_iou_lo={self.bg_iou_lo} must be in [0, bg_iou_thresh="
                             f"{bg_hi}) of the RoI head; negatives come from [bg_iou_lo, bg_iou_thresh)")

    def forward(self, head, candidates: list[RoICandidates], features=None, image_shapes=None):
        batch, max_pos = self.budget(head)
        selections = []
        for cand in candidates:
            positive = torch.where(cand.labels >= 1)[0]
            negative_mask = cand.labels == 0
            if self.bg_iou_lo > 0:
                negative_mask &= cand.ious >= self.bg_iou_lo
            negative = torch.where(negative_mask)[0]
            num_pos = min(positive.numel(), max_pos)
            num_neg = min(negative.numel(), batch - num_pos)
            chosen = torch.cat([_random_subset(positive, num_pos), _random_subset(negative, num_neg)])
            selections.append(RoISelection(chosen.sort().values))
        return selections


def ohem_select(loss: Tensor, labels: Tensor, boxes: Tensor, batch_size: int, max_positives: int,
                nms_thresh: Optional[float] = 0.7) -> Tensor:
    """Indices (ascending) of the hardest RoIs of one image (OHEM, Shrivastava et al. 2016, Sec. 4).

    loss [R] per-RoI loss; labels [R] in [-1, C] (-1 never kept); boxes [R, 4]. Optionally NMS at
    `nms_thresh` over the candidates with their loss as score (drops near-duplicates whose losses
    are correlated); then, in decreasing loss, positives beyond the `max_positives` hardest are
    skipped and the first `batch_size` remaining RoIs are kept."""
    valid = torch.where(labels >= 0)[0]
    if nms_thresh is not None:
        # nms returns the kept indices in decreasing score (= loss) order
        order = valid[nms(boxes[valid].float(), loss[valid].float(), float(nms_thresh))]
    else:
        order = valid[torch.sort(loss[valid], descending=True, stable=True).indices]
    is_pos = labels[order] > 0
    positive_rank = torch.cumsum(is_pos, 0) - 1
    eligible = order[~is_pos | (positive_rank < max_positives)]
    return eligible[:batch_size].sort().values


class OHEMRoISampler(RoISampler):
    """Online hard example mining (Shrivastava et al., CVPR 2016).

    The box head runs without gradient on every candidate (all proposals plus the ground truth);
    each one's loss (classification + box, the head's own losses, reduction none) ranks it; after
    an optional NMS at `nms_thresh` (None disables it) the `batch_size_per_image` hardest are kept,
    with at most `positive_fraction` of them positive; only those go through the training forward.
    """

    needs_features = True

    def __init__(self, *, nms_thresh: Optional[float] = 0.7,
                 batch_size_per_image: Optional[int] = None,
                 positive_fraction: Optional[float] = None):
        super().__init__(batch_size_per_image=batch_size_per_image,
                         positive_fraction=positive_fraction)
        if nms_thresh is not None and not 0.0 < float(nms_thresh) <= 1.0:
            raise ValueError(f"sampler.nms_thresh must be in (0, 1] or None, got {nms_thresh}")
        self.nms_thresh = None if nms_thresh is None else float(nms_thresh)

    def forward(self, head, candidates: list[RoICandidates], features, image_shapes):
        batch, max_pos = self.budget(head)
        class_logits, box_regression = head.score_rois(features, [c.boxes for c in candidates],
                                                       image_shapes)
        losses = head.roi_loss(class_logits, box_regression, candidates)
        sizes = [c.boxes.shape[0] for c in candidates]
        return [RoISelection(ohem_select(loss, c.labels, c.boxes, batch, max_pos, self.nms_thresh))
                for loss, c in zip(losses.split(sizes), candidates)]


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
    group_start = torch.cummax(torch.where(is_start, position, torch.zeros_like(position)), 0).values
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
    group = torch.where(has_group, overlaps.int().argmax(1),
                        keep.numel() + torch.arange(num, device=scores.device))
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
    def extra_box_loss_key(self) -> Optional[str]:
        return "loss_carl" if self.carl else None

    def __init__(self, *, gamma: float = 2.0, beta: float = 0.0, k: float = 1.0, bias: float = 0.2,
                 neg_gamma: float = 0.5, neg_beta: float = 0.0, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, iou: str = "regressed", isr_p: bool = True,
                 isr_n: bool = True, carl: bool = True, batch_size_per_image: Optional[int] = None,
                 positive_fraction: Optional[float] = None):
        super().__init__(batch_size_per_image=batch_size_per_image,
                         positive_fraction=positive_fraction)
        if iou not in ("regressed", "proposal"):
            raise ValueError(f"sampler.iou must be 'regressed' or 'proposal', got {iou!r}")
        for name, value in (("beta", beta), ("bias", bias), ("neg_beta", neg_beta),
                            ("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"sampler.{name} must be in [0, 1], got {value}")
        self.gamma, self.beta, self.k, self.bias = float(gamma), float(beta), float(k), float(bias)
        self.neg_gamma, self.neg_beta = float(neg_gamma), float(neg_beta)
        self.score_thresh, self.nms_thresh, self.iou = float(score_thresh), float(nms_thresh), iou
        self.isr_p, self.isr_n, self.carl = bool(isr_p), bool(isr_n), bool(carl)

    def forward(self, head, candidates: list[RoICandidates], features, image_shapes):
        batch, max_pos = self.budget(head)
        positives = []
        negatives = []
        for cand in candidates:
            positive = torch.where(cand.labels >= 1)[0]
            positives.append(_random_subset(positive, min(positive.numel(), max_pos)))
            negatives.append(torch.where(cand.labels == 0)[0])
        if not self.isr_n or sum(n.numel() for n in negatives) == 0:
            return [RoISelection(torch.cat([p, _random_subset(n, min(n.numel(), batch - p.numel()))])
                                 .sort().values) for p, n in zip(positives, negatives)]
        neg_boxes = [c.boxes[n] for c, n in zip(candidates, negatives)]
        class_logits, box_regression = head.score_rois(features, neg_boxes, image_shapes)
        with torch.no_grad():
            scores = head.cls_loss.activation(class_logits)
            neg_loss = head.cls_loss_per_roi(class_logits, torch.zeros_like(class_logits[:, 0],
                                                                            dtype=torch.long))
        sizes = [n.numel() for n in negatives]
        selections = []
        for pos, neg, boxes, score, deltas, loss in zip(
                positives, negatives, neg_boxes, scores.split(sizes), box_regression.split(sizes),
                neg_loss.split(sizes)):
            chosen, weight = self._isr_n(head, boxes, score, deltas, loss, batch - pos.numel())
            indices = torch.cat([pos, neg[chosen]])
            cls_weight = torch.cat([weight.new_ones(pos.numel()), weight])
            order = torch.sort(indices).indices
            selections.append(RoISelection(indices[order], cls_weight[order]))
        return selections

    def _isr_n(self, head, boxes, scores, deltas, loss, num_expected):
        """(indices into the image's negatives, ISR-N weights) for one image."""
        num_expected = min(num_expected, boxes.shape[0])
        max_score, argmax = scores[:, 1:].max(1)
        valid = torch.where(max_score > self.score_thresh)[0]
        invalid = torch.where(max_score <= self.score_thresh)[0]
        num_hlr = min(valid.numel(), num_expected)
        if num_hlr == 0:
            return _random_subset(invalid, num_expected), loss.new_ones(num_expected)
        deltas = deltas.reshape(deltas.shape[0], -1, 4)[valid, argmax[valid] + 1]
        pred_boxes = head.box_coder.decode_single(deltas, boxes[valid])
        rank = score_hlr(pred_boxes, max_score[valid], self.nms_thresh)
        by_rank = torch.argsort(rank)[:num_hlr]
        fill = _random_subset(invalid, num_expected - num_hlr)
        chosen = torch.cat([valid[by_rank], fill])
        n_max = max(num_expected, valid.numel())
        weight = importance_weights(rank[by_rank], n_max, self.neg_gamma, self.neg_beta)
        weight = torch.cat([weight, weight[-1:].expand(fill.numel())])  # random fill: lowest weight
        kept_loss = loss[chosen]
        weight = weight * kept_loss.sum() / (kept_loss * weight).sum().clamp(min=1e-12)
        return chosen, weight

    def loss_weights(self, head, class_logits: Tensor, box_regression: Tensor, samples):
        labels = torch.cat(samples.labels)
        positive = torch.where(labels > 0)[0]
        cls_weight = torch.cat(samples.cls_weights) if samples.cls_weights is not None else None
        box_weight = None
        if positive.numel() == 0:
            return cls_weight, box_weight
        labels_pos = labels[positive]
        if self.isr_p:
            with torch.no_grad():
                base = (torch.cat(samples.gt_weights)[positive] if samples.gt_weights is not None
                        else None)
                offsets = torch.cumsum(torch.tensor([0] + [g.shape[0] for g in samples.gt_boxes[:-1]],
                                                    device=labels.device), 0)
                gt_index = torch.cat([m + o for m, o in zip(samples.matched_idxs, offsets)])[positive]
                if self.iou == "regressed":
                    deltas = box_regression.detach().reshape(labels.numel(), -1, 4)[positive, labels_pos]
                    pred = head.box_coder.decode_single(deltas, torch.cat(samples.proposals)[positive])
                    ious = aligned_iou(pred, torch.cat(samples.matched_gt_boxes)[positive])
                else:
                    ious = torch.cat(samples.ious)[positive]
                rank, n_max = iou_hlr(labels_pos, gt_index, ious)
                weight = importance_weights(rank, n_max, self.gamma, self.beta)
                loss = head.cls_loss_per_roi(class_logits.detach()[positive], labels_pos)
                if base is not None:
                    loss = loss * base
                weight = weight * loss.sum() / (loss * weight).sum().clamp(min=1e-12)
                if cls_weight is None:
                    cls_weight = class_logits.new_ones(labels.numel())
                cls_weight = cls_weight.clone()
                cls_weight[positive] = weight
        if self.carl:
            score = head.cls_loss.activation(class_logits[positive]).gather(1, labels_pos[:, None])[:, 0]
            carl = ((1.0 - self.bias) * score + self.bias).pow(self.k)
            box_weight = carl * (positive.numel() / carl.sum().clamp(min=1e-12))
        return cls_weight, box_weight


ROI_SAMPLERS = {"random": RandomRoISampler, "ohem": OHEMRoISampler, "pisa": PISARoISampler}


def build_roi_sampler(cfg) -> RoISampler:
    """Builds a RoI sampler from `{"type": "random" | "ohem" | "pisa", **options}`, None (random)
    or an already built `RoISampler` (returned as is)."""
    if cfg is None:
        return RandomRoISampler()
    if isinstance(cfg, RoISampler):
        return cfg
    if not isinstance(cfg, dict):
        raise TypeError(f"sampler must be a dict like {{'type': 'ohem'}} or a RoISampler, "
                        f"got {type(cfg).__name__}")
    options = dict(cfg)
    kind = options.pop("type", "random")
    if kind not in ROI_SAMPLERS:
        raise ValueError(f"unknown sampler.type {kind!r}; valid: {sorted(ROI_SAMPLERS)}")
    cls = ROI_SAMPLERS[kind]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler.type {kind!r}; valid: {valid}")
    return cls(**options)
