"""GFL's distribution regression head for RetinaNet and its integral decoding.

Distribution regression (GFL's DFL, Li et al., NeurIPS 2020, Sec. 3.3; `patch_retinanet(...,
dfl=...)`): `LTRetinaNetDistributionHead` keeps torchvision's regression tower and replaces its last
convolution by one with `4 (n + 1)` outputs per anchor (`reg_max = n = 16`), a discrete
distribution over `0..n` for each side's distance from the anchor centre (left, top, right,
bottom); a side decodes as the distribution's expectation (`decode_distribution`) times a unit of
the anchor's size over 8 (`sqrt(w h) / 8`: GFL's ATSS anchors are 8 strides wide, so this is GFL's
unit, the level's stride, on GFL's own anchors). It is trained with DFL on the ground-truth
distances (clamped to n - 0.1, GFocal's `bbox2distance`) plus the box loss (GIoU, `needs_boxes`)
on the decoded boxes. With `score_weighted` (GFL's head), both are weighted per foreground anchor
by its detached best foreground score and normalised by the batch's sum of those weights
averaged over ranks (GFocal's `avg_factor`);
otherwise by RetinaNet's per-image foreground weights (`1 / (B * max(1, fg_b))`,
`ltdet.models.retinanet`). `LTRetinaNet`'s postprocess decodes either output.
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetRegressionHead

from ltdet.collectives import rank_mean

from .retinanet_parts import (
    LTRetinaNetRegressionHead,
    _adopt_head,
    _foreground_weights,
    foreground_anchors,
)

__all__ = ["LTRetinaNetDistributionHead", "decode_distribution"]


#: Distance targets stay this far below the top bin (GFocal's `bbox2distance(..., dt=0.1)`;
#: mmdetection's `eps=0.1`), so the upper of a target's two bins is at most `reg_max`.
_DISTANCE_EPS = 0.1


def _centres_and_units(anchors: Tensor) -> Tuple[Tensor, Tensor]:
    """Anchor centres `[P, 2]` and each anchor's distance unit `sqrt(w h) / 8` `[P, 1]`."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    wh = (anchors[:, 2:] - anchors[:, :2]).clamp_min(1e-6)
    # GFL's geometry: GFL's ATSS anchors are 8 strides wide (`octave_base_scale=8`), so a unit of
    # the anchor's size over 8 is GFL's unit, the level's stride, on GFL's own anchors (a
    # literal: TorchScript compiles this for the postprocess and cannot read module globals)
    unit = torch.sqrt(wh[:, 0] * wh[:, 1]).unsqueeze(1) / 8.0
    return centres, unit


def decode_distribution(pred: Tensor, anchors: Tensor) -> Tensor:
    """Integral decoding: side distributions `[P, 4 (n+1)]` (logits) -> xyxy boxes `[P, 4]`,
    each side `unit * sum_i softmax_i * i` from the anchor centre (left, top, right, bottom)."""
    bins = pred.shape[-1] // 4
    prob = pred.reshape(-1, 4, bins).softmax(dim=-1)
    distance = prob @ torch.arange(bins, dtype=prob.dtype, device=prob.device)
    centres, unit = _centres_and_units(anchors.to(prob.dtype))
    distance = distance * unit
    return torch.cat([centres - distance[:, :2], centres + distance[:, 2:]], dim=1)


class LTRetinaNetDistributionHead(LTRetinaNetRegressionHead):
    """GFL's distribution regression on torchvision's regression tower (module docstring):
    `bbox_reg` predicts `4 (reg_max + 1)` logits per anchor; trained with `dfl` (a
    `DistributionFocalLoss`) plus `loss` (a `needs_boxes` loss, GIoU) on the decoded boxes.

    Build it with `from_head(head, loss=..., dfl=..., score_weighted=...)`: the tower is shared,
    `bbox_reg` is new (weight N(0, 0.01^2), bias 0: torchvision's and GFL's init of the layer).
    """

    @classmethod
    def from_head(cls, head, *, loss, dfl, score_weighted=True):
        if not getattr(loss, "needs_boxes", False):
            raise ValueError(
                f"the distribution regression head (dfl) trains its decoded boxes "
                f"with a box loss on xyxy boxes (needs_boxes, e.g. giou), got "
                f"{type(loss).__name__}"
            )
        new = _adopt_head(cls, head, RetinaNetRegressionHead, loss=loss)
        old = new.bbox_reg
        num_anchors = old.out_channels // getattr(head, "channels_per_anchor", 4)
        new.reg_max = int(dfl.reg_max)
        new.channels_per_anchor = 4 * (new.reg_max + 1)
        new.bbox_reg = nn.Conv2d(
            old.in_channels,
            num_anchors * new.channels_per_anchor,
            kernel_size=3,
            stride=1,
            padding=1,
        ).to(old.weight.device)
        nn.init.normal_(new.bbox_reg.weight, std=0.01)
        nn.init.zeros_(new.bbox_reg.bias)
        new.dfl = dfl
        new.score_weighted = bool(score_weighted)
        return new

    def forward(self, x: List[Tensor]) -> Tensor:
        """`[N, HWA, 4 (reg_max + 1)]` side-distribution logits over all levels."""
        all_bbox_regression = []
        for features in x:
            bbox_regression = self.bbox_reg(self.conv(features))
            n, _, h, w = bbox_regression.shape
            bbox_regression = bbox_regression.view(n, -1, self.channels_per_anchor, h, w)
            bbox_regression = bbox_regression.permute(0, 3, 4, 1, 2)
            all_bbox_regression.append(bbox_regression.reshape(n, -1, self.channels_per_anchor))
        return torch.cat(all_bbox_regression, dim=1)

    @torch.jit.unused
    def compute_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        matched_idxs: List[Tensor],
    ) -> Tensor:
        """DFL + box loss of a batch over its foreground anchors: a scalar."""
        bbox_regression = head_outputs["bbox_regression"]  # [B, A, 4 (n+1)]
        matched = torch.stack(matched_idxs)
        fg_weight = _foreground_weights(matched, len(targets))
        image, anchor, pred, anchors_fg, gt_boxes = foreground_anchors(
            targets, bbox_regression, anchors, matched
        )
        anchors_fg = anchors_fg.to(pred.dtype)
        gt_boxes = gt_boxes.to(pred.dtype)
        if self.score_weighted:
            # GFL: the best class score of the anchor, detached (columns 1..C: foreground)
            logits = head_outputs["cls_logits"][image, anchor, 1:].detach()
            score = (
                logits.float().sigmoid().max(dim=1).values
                if logits.shape[1]
                else logits.new_ones(image.shape[0], dtype=torch.float32)
            )
            # GFocal's avg_factor: the score sum averaged over ranks (one normaliser per step)
            weight = score / rank_mean(score.sum()).clamp_min(torch.finfo(score.dtype).eps)
        else:
            weight = fg_weight[image, anchor]
        boxes = decode_distribution(pred, anchors_fg)
        centres, unit = _centres_and_units(anchors_fg)
        distance = torch.cat([centres - gt_boxes[:, :2], gt_boxes[:, 2:] - centres], dim=1)
        distance = (distance / unit).clamp(0, self.reg_max - _DISTANCE_EPS)
        box_loss = self.loss(boxes, gt_boxes, weight=weight, reduction="sum")
        dfl = self.dfl(
            pred.reshape(-1, 4, self.reg_max + 1), distance, weight=weight, reduction="sum"
        )
        return box_loss + dfl
