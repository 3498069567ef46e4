"""Parts shared by the RetinaNet heads of `ltdet.models.retinanet` and GFL's distribution head
(`ltdet.models.gfl_head`): the foreground normalisation, adopting a torchvision head, and the
delta regression head (the distribution head's base class). A module of its own so that both
import it without an import cycle.
"""

from typing import Dict, List

import torch
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetRegressionHead

from ltdet.compat import adopt_module

__all__ = ["LTRetinaNetRegressionHead"]


def _foreground_weights(matched, num_images):
    """Per-anchor weight `1 / (B * max(1, fg_b))` `[B, A]`: torchvision's per-image
    normalisation by the number of foreground anchors, averaged over the batch."""
    num_fg = (matched >= 0).sum(dim=1, keepdim=True).clamp_min(1)
    return (1.0 / (num_fg * num_images)).to(torch.float32).expand_as(matched)


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
        preds, anchor_parts, gt_parts, weights = [], [], [], []
        for image_target, pred, anchor, match, w in zip(
            targets, bbox_regression, anchors, matched, weight
        ):
            fg = torch.where(match >= 0)[0]
            preds.append(pred[fg])
            anchor_parts.append(anchor[fg])
            gt_parts.append(image_target["boxes"][match[fg]])
            weights.append(w[fg])
        pred = torch.cat(preds)
        anchors_fg = torch.cat(anchor_parts)
        gt_boxes = torch.cat(gt_parts).to(pred.dtype)
        if self.loss.needs_boxes:
            pred = self.box_coder.decode_single(pred, anchors_fg)
            target = gt_boxes
        else:
            target = self.box_coder.encode_single(gt_boxes, anchors_fg)
        if self.loss.self_normalising:
            return self.loss(pred, target, reduction="mean")
        return self.loss(pred, target, weight=torch.cat(weights), reduction="sum")
