"""Candidate scoring for the RoI samplers: the box head's logits and the head's losses on RoIs
the training step has not sampled yet, leaving every state untouched.

`HeadScorer` is the `RoIScorer` an `LTRoIHeads` hands its sampler: it holds the box branch, the
losses and the box coder, and exposes only the narrow methods of `RoIScorer`. The functions
below are what it calls; the head's own box loss (`box_loss_of_positives`) is shared with the
head's training losses, so a sampler ranks RoIs with exactly the loss they are trained with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ltdet.compat import BatchNormBase, batchnorm_buffers

from .base import RoICandidates, matched_boxes

__all__ = ["HeadScorer", "box_loss_of_positives", "cls_loss_per_roi", "roi_logits", "roi_loss"]


@contextlib.contextmanager
def _eval_mode(*modules: Any) -> Iterator[None]:
    """Stateful losses / FDS update their state only in training mode: the no-gradient scoring
    passes of OHEM / PISA must not count as a training step."""
    modes = [(m, m.training) for m in modules if isinstance(m, nn.Module)]
    for m, _ in modes:
        m.train(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


@contextlib.contextmanager
def _keep_running_stats(*modules: nn.Module) -> Iterator[None]:
    """Runs in training mode (batch statistics, as the real forward) but restores BatchNorm running
    statistics afterwards, so a scoring pass over candidates leaves the model unchanged."""
    saved = [
        (bn, {name: buf.clone() for name, buf in batchnorm_buffers(bn).items()})
        for module in modules
        for bn in module.modules()
        if isinstance(bn, BatchNormBase) and bn.training and bn.track_running_stats
    ]
    try:
        yield
    finally:
        for bn, buffers in saved:
            own = batchnorm_buffers(bn)
            for name, value in buffers.items():
                own[name].copy_(value)


@torch.no_grad()
def roi_logits(
    box_roi_pool: nn.Module,
    box_head: nn.Module,
    box_predictor: nn.Module,
    features: dict[str, Tensor],
    boxes: list[Tensor],
    image_shapes: list[tuple[int, int]],
) -> tuple[Tensor, Tensor]:
    """Box head on candidate RoIs without gradient, leaving every state untouched (BatchNorm
    running statistics). Returns logits: (class_logits, box_regression)."""
    with _keep_running_stats(box_head, box_predictor):
        x = box_head(box_roi_pool(features, boxes, image_shapes))
        return box_predictor(x)


@torch.no_grad()
def cls_loss_per_roi(cls_loss: nn.Module, class_logits: Tensor, labels: Tensor) -> Tensor:
    """Classification loss of each RoI [N] (summed over columns for sigmoid losses), without
    updating the loss's state."""
    with _eval_mode(cls_loss):
        loss = cls_loss(class_logits, labels, reduction="none")
    return loss.sum(1) if loss.dim() > 1 else loss


def box_loss_of_positives(
    box_loss: nn.Module,
    box_coder: Any,
    box_regression: Tensor,
    labels: Tensor,
    proposals: Tensor,
    gt_boxes: Tensor,
    targets: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Box loss of positives: box_regression [P, (C+1)*4] (the deltas of each positive's class
    are used), labels [P] in [1, C]; decoded boxes against `gt_boxes` when the loss has
    `needs_boxes` (GIoU), else deltas against `targets` (encoded from `gt_boxes` when None).
    `kwargs` go to the loss (weight, reduction, avg_factor)."""
    deltas = box_regression.reshape(labels.shape[0], -1, 4)
    deltas = deltas[
        torch.arange(labels.shape[0], device=labels.device),
        labels if deltas.shape[1] > 1 else torch.zeros_like(labels),
    ]
    if box_loss.needs_boxes:
        return box_loss(box_coder.decode_single(deltas, proposals), gt_boxes, **kwargs)
    if targets is None:
        targets = box_coder.encode_single(gt_boxes, proposals)
    return box_loss(deltas, targets, **kwargs)


@torch.no_grad()
def roi_loss(
    cls_loss: nn.Module,
    box_loss: nn.Module,
    box_coder: Any,
    class_logits: Tensor,
    box_regression: Tensor,
    candidates: list[RoICandidates],
) -> Tensor:
    """Per-RoI training loss [sum R] (classification + box, both on torchvision's scale) of
    candidate RoIs, for OHEM's ranking. Ignored candidates count as background."""
    labels = torch.cat([c.labels for c in candidates]).clamp(min=0)
    loss = cls_loss_per_roi(cls_loss, class_logits, labels).clone()
    positive = torch.where(labels > 0)[0]
    if positive.numel():
        proposals = torch.cat([c.boxes for c in candidates])[positive]
        gt = torch.cat([matched_boxes(c.gt_boxes, c.matched_idxs) for c in candidates])[positive]
        with _eval_mode(box_loss):
            box = box_loss_of_positives(
                box_loss,
                box_coder,
                box_regression[positive],
                labels[positive],
                proposals,
                gt,
                reduction="none",
            )
        loss[positive] += box.reshape(positive.numel(), -1).sum(1)
    return loss


class HeadScorer:
    """The `RoIScorer` of an `LTRoIHeads` for one training step (`LTRoIHeads.roi_scorer`).

    `features` / `image_shapes` are the step's; without them (`loss_weights`, `validate`)
    `roi_logits` is unavailable."""

    def __init__(
        self,
        *,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        cls_loss: Any,
        box_loss: Any,
        box_coder: Any,
        batch_size_per_image: int,
        positive_fraction: float,
        bg_iou_thresh: float,
        features: dict[str, Tensor] | None = None,
        image_shapes: list[tuple[int, int]] | None = None,
    ):
        self._box_branch = (box_roi_pool, box_head, box_predictor)
        self._cls_loss, self._box_loss, self._box_coder = cls_loss, box_loss, box_coder
        self._features, self._image_shapes = features, image_shapes
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.bg_iou_thresh = bg_iou_thresh

    def roi_logits(self, boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
        if self._features is None or self._image_shapes is None:
            raise ValueError(
                "this RoIScorer has no feature maps: a sampler that scores "
                "candidates needs select_training_samples(proposals, targets, "
                "features, image_shapes)"
            )
        return roi_logits(*self._box_branch, self._features, boxes, self._image_shapes)

    def scores(self, class_logits: Tensor) -> Tensor:
        return self._cls_loss.activation(class_logits)

    def cls_loss_per_roi(self, class_logits: Tensor, labels: Tensor) -> Tensor:
        return cls_loss_per_roi(self._cls_loss, class_logits, labels)

    def roi_loss(
        self, class_logits: Tensor, box_regression: Tensor, candidates: list[RoICandidates]
    ) -> Tensor:
        return roi_loss(
            self._cls_loss,
            self._box_loss,
            self._box_coder,
            class_logits,
            box_regression,
            candidates,
        )

    def decode_boxes(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        return self._box_coder.decode_single(deltas, boxes)
