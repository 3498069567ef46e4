"""Parts shared by the RetinaNet heads of `ltdet.models.retinanet` and GFL's distribution head
(`ltdet.models.gfl_head`): the foreground normalisation, adopting a torchvision head, and the
delta regression head (the distribution head's base class). A module of its own so that both
import it without an import cycle.
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetRegressionHead

from ltdet.collectives import rank_mean
from ltdet.compat import adopt_module

__all__ = ["LTRetinaNetRegressionHead", "dense_foreground_weights"]


def _foreground_weights(matched, num_images):
    """Per-anchor weight `1 / (B * max(1, fg_b))` `[B, A]`: torchvision's per-image
    normalisation by the number of foreground anchors, averaged over the batch."""
    num_fg = (matched >= 0).sum(dim=1, keepdim=True).clamp_min(1)
    return (1.0 / (num_fg * num_images)).to(torch.float32).expand_as(matched)


#: `LossModule.dense_normaliser`'s values (see `dense_foreground_weights`).
DENSE_NORMALISERS = ("image", "batch")


def dense_foreground_weights(matched: Tensor, num_images: int, normaliser: str) -> Tensor:
    """Per-anchor weights `[B, A]` of a dense loss with `reduction="sum"`.

    "image": torchvision's `1 / (B * max(1, fg_b))`. "batch" (GFocal's `num_total_samples`):
    `1 / max(1, N / W)`, N the foreground anchors of the step on all W ranks; DDP's gradient
    average over W then makes it the single-process loss on the joined batch. (EOD's EFL head
    divides by `max(N, 1) / W`: the same unless a step has fewer foreground anchors than
    ranks.) A collective under DDP, called on every rank whatever its foreground count."""
    if normaliser == "image":
        return _foreground_weights(matched, num_images)
    if normaliser == "batch":
        norm = rank_mean((matched >= 0).sum()).clamp_min(1.0)
        return (1.0 / norm).expand_as(matched)
    raise ValueError(f"dense_normaliser must be one of {DENSE_NORMALISERS}, got {normaliser!r}")


def foreground_anchors(
    targets: List[Dict[str, Tensor]],
    bbox_regression: Tensor,
    anchors: List[Tensor],
    matched: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The foreground anchors of a batch in one gather, image-major (the order of torchvision's
    per-image loop): image index `[P]`, anchor index `[P]`, their regression `[P, K]`, anchor
    boxes `[P, 4]` and matched ground-truth boxes `[P, 4]`."""
    image, anchor = torch.where(matched >= 0)
    counts = torch.tensor([len(t["boxes"]) for t in targets], device=matched.device)
    first = torch.cumsum(counts, 0) - counts  # row of each image's first gt in the batch
    gt = torch.cat([t["boxes"] for t in targets])[first[image] + matched[image, anchor]]
    return image, anchor, bbox_regression[image, anchor], torch.stack(anchors)[image, anchor], gt


def _adopt_head(cls, head: nn.Module, expected_type: type, *, loss: nn.Module) -> nn.Module:
    """A `cls` instance sharing every submodule and setting of torchvision's `head` (not copied,
    not re-initialised; `ltdet.compat.adopt_module`), with `loss` as a submodule (its state
    joins the state_dict)."""
    if not isinstance(head, expected_type):
        raise TypeError(
            f"expected a torchvision {expected_type.__name__}, got {type(head).__name__}"
        )
    new = adopt_module(cls, head)
    new.loss = loss
    return new


class LTRetinaNetRegressionHead(RetinaNetRegressionHead):
    """torchvision's regression head (same modules, same weights) trained with an ltdet
    regression loss; build it with `from_head(head, loss=...)`."""

    @classmethod
    def from_head(cls, head, *, loss):
        return _adopt_head(cls, head, RetinaNetRegressionHead, loss=loss)

    @torch.jit.unused
    def compute_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        matched_idxs: List[Tensor],
    ) -> Tensor:
        """Box loss of a batch over its foreground anchors: a scalar, normalised as torchvision
        does."""
        bbox_regression = head_outputs["bbox_regression"]  # [B, A, 4]
        matched = torch.stack(matched_idxs)
        weight = _foreground_weights(matched, len(targets))
        image, anchor, pred, anchors_fg, gt_boxes = foreground_anchors(
            targets, bbox_regression, anchors, matched
        )
        gt_boxes = gt_boxes.to(pred.dtype)
        if self.loss.needs_boxes:
            pred = self.box_coder.decode_single(pred, anchors_fg)
            target = gt_boxes
        else:
            target = self.box_coder.encode_single(gt_boxes, anchors_fg)
        if self.loss.self_normalising:
            return self.loss(pred, target, reduction="mean")
        return self.loss(pred, target, weight=weight[image, anchor], reduction="sum")
