"""RetinaNet heads with pluggable ltdet losses (Lin et al., "Focal Loss for Dense Object
Detection", ICCV 2017), and the RetinaNet whose postprocess scores with the loss's activation.

Label convention (torchvision's RetinaNet): the classification head emits `K` logits per anchor
and column `k` scores label `k`; with ltdet's labels `1..C` the head has `K = C + 1` columns and
column 0 is the background column (torchvision's COCO RetinaNet has 91 = 90 + 1). That is the
library's classification-loss layout, so the dense head feeds ltdet losses directly:

* logits `[M, C+1]` of the non-ignored anchors of the whole batch (anchors whose best IoU falls
  between the matcher's thresholds are dropped, as torchvision drops them);
* labels `[M]`: the matched ground-truth label (1..C) of a foreground anchor, 0 for background.

A sigmoid loss (focal, ghmc, ...) trains columns 1..C only, so `focal` here is exactly
torchvision's `sigmoid_focal_loss` RetinaNet loss over the C foreground columns; EQLv2 trains
column 0 as its objectness column. Normalisation is torchvision's: each image's loss is divided by
its number of foreground anchors (at least 1), then averaged over the batch; it is applied as a
per-anchor weight `1 / (B * max(1, fg_b))` with `reduction="sum"`, so one loss call sees the whole
batch (stateful losses update their statistics once per step). A loss whose authors normalise by
the batch declares `dense_normaliser = "batch"` (EFL, EQFL, QFL: GFocal's
`max(1, N_all_ranks / W)`, EOD's up to steps with fewer foreground anchors than ranks;
`retinanet_parts.dense_foreground_weights`). The exception is a loss that
declares `self_normalising` (GHM-C, GHM-R): its gradient-density weights are themselves the
normaliser (Li et al., AAAI 2019, eq. 8: `sum_i L_i / GD(g_i)`, which ltdet's GHM returns with
`reduction="mean"`), so dividing by the foreground count as well would scale it by anchors per
foreground anchor (~100x); it gets `reduction="mean"` over the batch instead, as in the paper's
(and mmdetection's) RetinaNet.

Regression: `pred [P, 4]` box deltas of the foreground anchors against the encoded matched boxes
(torchvision's `BoxCoder` with unit weights), or decoded `xyxy` boxes against the matched boxes
when the loss has `needs_boxes` (GIoU), normalised like the classification loss.

Quality targets (GFL's QFL, EQFL: a classification loss that declares `needs_quality`): the head
(`LTRetinaNetHead`) computes, for every foreground anchor, the IoU of its regressed box (decoded,
detached, as the authors') with its matched ground truth (`anchor_quality`) and the loss is called
with the target `(labels, quality)`.

Distribution regression (GFL's DFL, `patch_retinanet(..., dfl=...)`): `LTRetinaNetDistributionHead`
(`ltdet.models.gfl_head`, whose docstring describes it); `LTRetinaNet`'s postprocess decodes
either output.

Inference: torchvision's `RetinaNet.postprocess_detections` hard-codes a sigmoid. The patched
classification head carries the activation (`scores`, the loss's `activation`), and the model's
class is switched to `LTRetinaNet`, whose `postprocess_detections` uses it and never emits the
background column. `postprocess_detections` is a method of the model, not of a head, so a model
subclass is the only way to change it without monkey-patching torchvision.

TorchScript: a patched RetinaNet scripts like torchvision's (eval mode; `LTRetinaNet.
postprocess_detections` and the classification head's `scores` compile). The heads'
`compute_loss` (ltdet losses) is `@torch.jit.unused`: a scripted patched model does not train.
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
)
from torchvision.ops import boxes as box_ops

from ltdet.compat import adopt_module, topk_min
from ltdet.losses import build_loss
from ltdet.losses.gfl import DistributionFocalLoss

from .gfl_head import LTRetinaNetDistributionHead, decode_distribution
from .retinanet_parts import (
    DENSE_NORMALISERS,
    LTRetinaNetRegressionHead,
    _adopt_head,
    dense_foreground_weights,
)

__all__ = [
    "LTRetinaNetClassificationHead",
    "LTRetinaNetDistributionHead",
    "LTRetinaNetHead",
    "LTRetinaNetRegressionHead",
    "LTRetinaNet",
    "anchor_quality",
    "decode_distribution",
    "patch_retinanet",
]


class LTRetinaNetClassificationHead(RetinaNetClassificationHead):
    """torchvision's classification head (same modules, same weights) trained with an ltdet
    classification loss and scored with that loss's activation.

    Build it with `from_head(head, loss=...)`; the head's convolutions are shared, not copied
    or re-initialised. `loss` becomes a submodule, so its state (EQLv2 gradient sums, GHM
    statistics) is in the model's state_dict and survives checkpoint / resume.
    """

    @classmethod
    def from_head(cls, head, *, loss):
        return _adopt_head(cls, head, RetinaNetClassificationHead, loss=loss)

    @torch.jit.unused
    def compute_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        matched_idxs: List[Tensor],
    ) -> Tensor:
        """Classification loss of a batch: a scalar, normalised as torchvision does."""
        return self._batch_loss(targets, head_outputs, matched_idxs, None)

    @torch.jit.unused
    def compute_quality_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        matched_idxs: List[Tensor],
        quality: Tensor,
    ) -> Tensor:
        """`compute_loss` of a loss that `needs_quality`: the target is `(labels, quality)`, with
        `quality [B, A]` from `anchor_quality`. (A method of its own: torchvision's scripted
        `RetinaNetHead.compute_loss` calls `compute_loss` with exactly three arguments.)"""
        return self._batch_loss(targets, head_outputs, matched_idxs, quality)

    def _batch_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        matched_idxs: List[Tensor],
        quality: Optional[Tensor],
    ) -> Tensor:
        cls_logits = head_outputs["cls_logits"]  # [B, A, K]
        num_images, _, num_columns = cls_logits.shape
        matched = torch.stack(matched_idxs)  # [B, A]; batched images share one anchor set
        _check_labels(targets, num_columns)
        labels = torch.stack([_anchor_labels(t["labels"], m) for t, m in zip(targets, matched)])
        valid = matched != self.BETWEEN_THRESHOLDS
        target = labels[valid] if quality is None else (labels[valid], quality[valid])
        if self.loss.self_normalising:
            return self.loss(cls_logits[valid], target, reduction="mean")
        weight = dense_foreground_weights(matched, num_images, self.loss.dense_normaliser)
        return self.loss(cls_logits[valid], target, weight=weight[valid], reduction="sum")

    def scores(self, logits: Tensor) -> Tensor:
        """Scores `[..., K]` from logits `[..., K]` with the loss's activation (column 0 =
        background)."""
        return self.loss.activation(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape)


def _aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of the box pairs `(a[i], b[i])` `[P]`."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp_min(1e-7)


@torch.no_grad()
def anchor_quality(
    targets: List[Dict[str, Tensor]],
    bbox_regression: Tensor,
    anchors: List[Tensor],
    matched_idxs: List[Tensor],
    box_coder: Any,
) -> Tensor:
    """QFL's soft targets `[B, A]`: the IoU of each foreground anchor's regressed box (detached)
    with its matched ground truth, 0 elsewhere. `bbox_regression [B, A, 4]` deltas (decoded by
    `box_coder`) or `[B, A, 4 (n+1)]` side distributions (`decode_distribution`)."""
    quality = torch.zeros(
        bbox_regression.shape[:2], dtype=torch.float32, device=bbox_regression.device
    )
    for b, (target, pred, anchor, match) in enumerate(
        zip(targets, bbox_regression, anchors, matched_idxs)
    ):
        fg = torch.where(match >= 0)[0]
        if fg.numel() == 0:
            continue
        pred_fg, anchor_fg = pred[fg].detach().float(), anchor[fg].float()
        if pred.shape[-1] == 4:
            boxes = box_coder.decode_single(pred_fg, anchor_fg)
        else:
            boxes = decode_distribution(pred_fg, anchor_fg)
        quality[b, fg] = _aligned_iou(boxes, target["boxes"][match[fg]].float())
    return quality


class LTRetinaNetHead(RetinaNetHead):
    """torchvision's RetinaNetHead (same submodules, same forward) whose loss passes a
    classification loss that `needs_quality` (QFL, EQFL) its quality targets
    (`anchor_quality`)."""

    @classmethod
    def from_head(cls, head):
        if not isinstance(head, RetinaNetHead):
            raise TypeError(f"expected a torchvision RetinaNetHead, got {type(head).__name__}")
        return adopt_module(cls, head)

    @torch.jit.unused
    def compute_loss(
        self,
        targets: List[Dict[str, Tensor]],
        head_outputs: Dict[str, Tensor],
        anchors: List[Tensor],
        matched_idxs: List[Tensor],
    ) -> Dict[str, Tensor]:
        cls_head = self.classification_head
        if getattr(getattr(cls_head, "loss", None), "needs_quality", False):
            quality = anchor_quality(
                targets,
                head_outputs["bbox_regression"],
                anchors,
                matched_idxs,
                self.regression_head.box_coder,
            )
            classification = cls_head.compute_quality_loss(
                targets, head_outputs, matched_idxs, quality
            )
        else:
            classification = cls_head.compute_loss(targets, head_outputs, matched_idxs)
        return {
            "classification": classification,
            "bbox_regression": self.regression_head.compute_loss(
                targets, head_outputs, anchors, matched_idxs
            ),
        }


def _anchor_labels(gt_labels, matched):
    """Label per anchor `[A]`: the matched box's label, 0 for background and ignored anchors."""
    if gt_labels.numel() == 0:
        return torch.zeros_like(matched)
    return torch.where(matched >= 0, gt_labels[matched.clamp_min(0)], torch.zeros_like(matched))


def _check_labels(targets, num_columns):
    labels = torch.cat([t["labels"] for t in targets])
    if labels.numel():
        low, high = torch.stack(torch.aminmax(labels)).tolist()  # one host sync per step
        if low < 1 or high >= num_columns:
            raise ValueError(
                f"RetinaNet target labels must lie in [1, {num_columns - 1}] (the "
                f"head has {num_columns} columns, column 0 = background) but range "
                f"over [{low}, {high}]; build the model with num_classes = C + 1"
            )


class LTRetinaNet(RetinaNet):
    """torchvision's RetinaNet scored with the classification loss's activation.

    Only `postprocess_detections` differs: scores are `head.classification_head.scores(logits)`
    (e.g. `sigmoid(z_j) * (1 - sigmoid(z_0))` for EQLv2, a softmax for CE) instead of a sigmoid,
    and the background column 0 is never a detection. `patch_retinanet` switches a model's class
    to this one in place (weights untouched), because torchvision offers no hook for it.
    """

    def postprocess_detections(
        self,
        head_outputs: Dict[str, List[Tensor]],
        anchors: List[List[Tensor]],
        image_shapes: List[Tuple[int, int]],
    ) -> List[Dict[str, Tensor]]:
        class_logits = head_outputs["cls_logits"]
        box_regression = head_outputs["bbox_regression"]
        detections: List[Dict[str, Tensor]] = []
        for index, image_shape in enumerate(image_shapes):
            image_boxes: List[Tensor] = []
            image_scores: List[Tensor] = []
            image_labels: List[Tensor] = []
            for logits, deltas, level_anchors in zip(class_logits, box_regression, anchors[index]):
                # Foreground scores [A_l, C]; column j scores label j + 1.
                scores = self.head.classification_head.scores(logits[index])[:, 1:]
                num_fg_classes = scores.shape[1]
                scores = scores.flatten()
                keep = torch.where(scores > self.score_thresh)[0]
                num_topk = topk_min(keep, self.topk_candidates, 0)
                top_scores, order = scores[keep].topk(num_topk)
                top_idxs = keep[order]
                anchor_idxs = torch.div(top_idxs, num_fg_classes, rounding_mode="floor")
                level_deltas = deltas[index][anchor_idxs]
                if level_deltas.shape[-1] == 4:
                    boxes = self.box_coder.decode_single(level_deltas, level_anchors[anchor_idxs])
                else:  # a distribution regression head (dfl): integral decoding
                    boxes = decode_distribution(level_deltas, level_anchors[anchor_idxs])
                image_boxes.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                image_scores.append(top_scores)
                image_labels.append(top_idxs % num_fg_classes + 1)
            boxes = torch.cat(image_boxes)
            scores = torch.cat(image_scores)
            labels = torch.cat(image_labels)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            detections.append(
                {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            )
        return detections


#: what the heads read of their losses (declared by `ltdet.losses.base`'s loss classes)
_CLS_LOSS_ATTRIBUTES = (
    "activation",
    "num_classes",
    "get_cls_channels",
    "self_normalising",
    "dense_normaliser",
)
_BOX_LOSS_ATTRIBUTES = ("needs_boxes", "self_normalising")


def _as_loss(loss, kind, num_classes, stats):
    if loss is None or isinstance(loss, nn.Module):
        return loss
    return build_loss(loss, num_classes=num_classes if kind == "cls" else None, stats=stats)


#: GFL's distribution head settings (implus/GFocal configs/gfl_r50_1x.py: reg_max=16,
#: loss_dfl loss_weight=0.25; box losses weighted by the detached best class score).
DFL_DEFAULTS = {"reg_max": 16, "loss_weight": 0.25, "score_weighted": True}


def _dfl_options(dfl: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """`dfl` (the config section `model.dfl`, `enabled` included, or its keys) -> the settings,
    None when disabled."""
    if dfl is None:
        return None
    if not isinstance(dfl, Mapping):
        raise TypeError(f"dfl must be a mapping {DFL_DEFAULTS}, got {type(dfl).__name__}")
    options = dict(dfl)
    if not options.pop("enabled", True):
        return None
    unknown = sorted(set(options) - set(DFL_DEFAULTS))
    if unknown:
        raise ValueError(
            f"dfl: unknown key(s) {unknown}; valid ones: {sorted(DFL_DEFAULTS)} and enabled"
        )
    return {**DFL_DEFAULTS, **options}


def patch_retinanet(model, cls_loss=None, box_loss=None, stats=None, dfl=None):
    """Install ltdet losses in a torchvision RetinaNet, in place; returns the model.

    Args:
        model: `torchvision.models.detection.RetinaNet` (any builder, v1 or v2) whose head has
            `C + 1` classification columns, labels `1..C`.
        cls_loss: config dict (`{"type": "eqlv2"}`) or built classification loss module; None
            keeps torchvision's focal loss and sigmoid scores. A loss whose classifier is not
            `C + 1` wide (`cls_channels`: seesaw's `C + 2`, a RoI-head design) raises ValueError.
        box_loss: config dict or built regression loss module; None keeps torchvision's.
        stats: `ltdet.data.ClassStats` for losses that need class frequencies.
        dfl: GFL's distribution regression head (module docstring), `{"reg_max": 16,
            "loss_weight": 0.25, "score_weighted": True}` (`model.dfl`; `enabled: false` or
            None = the delta head); its box loss is `box_loss`, which must be `needs_boxes`
            (GIoU). A classification loss that `needs_quality` (qfl, eqfl) makes the head
            an `LTRetinaNetHead`, which computes the IoU targets.

    Weights are untouched: the new heads share the old heads' modules. With a classification
    loss the model's class becomes `LTRetinaNet` so that inference uses the loss's activation.
    """
    if not isinstance(model, RetinaNet):
        raise TypeError(
            f"patch_retinanet needs a torchvision RetinaNet, got {type(model).__name__}"
        )
    if type(model) not in (RetinaNet, LTRetinaNet):
        raise TypeError(
            f"patch_retinanet: {type(model).__name__} subclasses RetinaNet; only "
            f"torchvision's RetinaNet class is supported (its postprocess is replaced)"
        )
    head = model.head
    num_classes = head.classification_head.num_classes - 1
    cls_module = _as_loss(cls_loss, "cls", num_classes, stats)
    box_module = _as_loss(box_loss, "box", num_classes, stats)
    dfl_options = _dfl_options(dfl)
    if isinstance(box_module, DistributionFocalLoss):
        raise ValueError(
            "dfl trains the distribution regression head, not box deltas: pass "
            "dfl={'reg_max': 16, ...} (config: model.dfl.enabled: true) with a "
            "box_loss on decoded boxes (giou)"
        )
    if dfl_options is not None and (box_module is None or not box_module.needs_boxes):
        raise ValueError(
            "dfl: the distribution regression head also trains its decoded boxes; "
            "it needs a box_loss on xyxy boxes (needs_boxes: giou), got "
            f"{'none' if box_module is None else type(box_module).__name__}"
        )
    if cls_module is not None:
        missing = [a for a in _CLS_LOSS_ATTRIBUTES if not hasattr(cls_module, a)]
        if missing:
            raise TypeError(
                f"cls_loss {type(cls_module).__name__} is not a classification loss "
                f"(it has no {', '.join(missing)})"
            )
        if cls_module.dense_normaliser not in DENSE_NORMALISERS:
            raise ValueError(
                f"cls_loss {type(cls_module).__name__}: dense_normaliser must be one of "
                f"{DENSE_NORMALISERS}, got {cls_module.dense_normaliser!r}"
            )
        built_for = cls_module.num_classes
        if built_for is not None and built_for != num_classes:
            raise ValueError(
                f"cls_loss was built for num_classes={built_for} but the RetinaNet "
                f"head has {num_classes + 1} columns (C = {num_classes}, column 0 = "
                f"background)"
            )
        channels = cls_module.get_cls_channels(num_classes)
        if channels != num_classes + 1:
            # seesaw's C + 2 (C classes + a 2-way objectness over the sampled RoIs) is the
            # authors' design for a two-stage bbox head (mmdetection has no dense-head seesaw)
            raise ValueError(
                f"{type(cls_module).__name__} trains a classifier of {channels} "
                f"outputs (cls_channels) but a RetinaNet head has C + 1 = "
                f"{num_classes + 1} per anchor; it is a RoI-head loss: use a "
                f"FasterRCNN model, or on RetinaNet a C + 1 loss (e.g. seesaw_softmax, "
                f"focal, eqlv2)"
            )
        old = head.classification_head
        if isinstance(old, LTRetinaNetClassificationHead):
            old.loss = cls_module
        else:
            head.classification_head = LTRetinaNetClassificationHead.from_head(old, loss=cls_module)
        model.__class__ = LTRetinaNet
        if getattr(cls_module, "needs_quality", False) and not isinstance(head, LTRetinaNetHead):
            head = model.head = LTRetinaNetHead.from_head(head)
    if box_module is not None:
        missing = [a for a in _BOX_LOSS_ATTRIBUTES if not hasattr(box_module, a)]
        if missing:
            raise TypeError(
                f"box_loss {type(box_module).__name__} is not a regression loss "
                f"(it has no {', '.join(missing)})"
            )
        old = head.regression_head
        if dfl_options is not None:
            dfl_module = build_loss(
                {
                    "type": "dfl",
                    "reg_max": dfl_options["reg_max"],
                    "loss_weight": dfl_options["loss_weight"],
                }
            )
            if isinstance(old, LTRetinaNetDistributionHead) and old.reg_max == dfl_module.reg_max:
                old.loss, old.dfl = box_module, dfl_module
                old.score_weighted = bool(dfl_options["score_weighted"])
            else:
                head.regression_head = LTRetinaNetDistributionHead.from_head(
                    old,
                    loss=box_module,
                    dfl=dfl_module,
                    score_weighted=dfl_options["score_weighted"],
                )
            model.__class__ = LTRetinaNet  # its postprocess decodes the distributions
        elif isinstance(old, LTRetinaNetRegressionHead):
            old.loss = box_module
        else:
            head.regression_head = LTRetinaNetRegressionHead.from_head(old, loss=box_module)
    return model
