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
batch (stateful losses update their statistics once per step). The exception is GHM (GHM-C,
GHM-R): its gradient-density weights are themselves the normaliser (Li et al., AAAI 2019, eq. 8:
`sum_i L_i / GD(g_i)`, which ltdet's GHM returns with `reduction="mean"`), so dividing by the
foreground count as well would scale it by anchors per foreground anchor (~100x); GHM gets
`reduction="mean"` over the batch instead, as in the paper's (and mmdetection's) RetinaNet.

Regression: `pred [P, 4]` box deltas of the foreground anchors against the encoded matched boxes
(torchvision's `BoxCoder` with unit weights), or decoded `xyxy` boxes against the matched boxes
when the loss has `needs_boxes` (GIoU), normalised like the classification loss.

Inference: torchvision's `RetinaNet.postprocess_detections` hard-codes a sigmoid. The patched
classification head carries the activation (`scores`, the loss's `activation`), and the model's
class is switched to `LTRetinaNet`, whose `postprocess_detections` uses it and never emits the
background column. `postprocess_detections` is a method of the model, not of a head, so a model
subclass is the only way to change it without monkey-patching torchvision.

TorchScript: a patched RetinaNet scripts like torchvision's (eval mode; `LTRetinaNet.
postprocess_detections` and the classification head's `scores` compile). The heads'
`compute_loss` (ltdet losses) is `@torch.jit.unused`: a scripted patched model does not train.
"""
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import (RetinaNetClassificationHead,
                                                    RetinaNetRegressionHead)
from torchvision.ops import boxes as box_ops

from ltdet.losses.ghm import GradientDensity

__all__ = ["LTRetinaNetClassificationHead", "LTRetinaNetRegressionHead", "LTRetinaNet",
           "patch_retinanet"]


def _foreground_weights(matched, num_images):
    """Per-anchor weight `1 / (B * max(1, fg_b))` `[B, A]`: torchvision's per-image
    normalisation by the number of foreground anchors, averaged over the batch."""
    num_fg = (matched >= 0).sum(dim=1, keepdim=True).clamp_min(1)
    return (1.0 / (num_fg * num_images)).to(torch.float32).expand_as(matched)


def _adopt_head(cls, head, expected_type, *, loss, attributes):
    """A `cls` instance that shares `head`'s submodules (not copied, not re-initialised) and the
    named plain attributes, with `loss` as a submodule (its state joins the state_dict)."""
    if not isinstance(head, expected_type):
        raise TypeError(f"expected a torchvision {expected_type.__name__}, got "
                        f"{type(head).__name__}")
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in head.named_children():
        new.add_module(name, child)
    for name in attributes:
        setattr(new, name, getattr(head, name))
    new.loss = loss
    new.train(head.training)
    return new


class LTRetinaNetClassificationHead(RetinaNetClassificationHead):
    """torchvision's classification head (same modules, same weights) trained with an ltdet
    classification loss and scored with that loss's activation.

    Build it with `from_head(head, loss=...)`; the head's convolutions are shared, not copied
    or re-initialised. `loss` becomes a submodule, so its state (EQLv2 gradient sums, GHM
    statistics) is in the model's state_dict and survives checkpoint / resume.
    """

    @classmethod
    def from_head(cls, head, *, loss):
        return _adopt_head(cls, head, RetinaNetClassificationHead, loss=loss,
                           attributes=("num_classes", "num_anchors", "BETWEEN_THRESHOLDS"))

    @torch.jit.unused
    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor],
                     matched_idxs: List[Tensor]) -> Tensor:
        """Classification loss of a batch: a scalar, normalised as torchvision does."""
        cls_logits = head_outputs["cls_logits"]  # [B, A, K]
        num_images, _, num_columns = cls_logits.shape
        matched = torch.stack(matched_idxs)  # [B, A]; batched images share one anchor set
        _check_labels(targets, num_columns)
        labels = torch.stack([_anchor_labels(t["labels"], m) for t, m in zip(targets, matched)])
        valid = matched != self.BETWEEN_THRESHOLDS
        if _density_normalised(self.loss):
            return self.loss(cls_logits[valid], labels[valid], reduction="mean")
        weight = _foreground_weights(matched, num_images)
        return self.loss(cls_logits[valid], labels[valid], weight=weight[valid], reduction="sum")

    def scores(self, logits: Tensor) -> Tensor:
        """Scores `[..., K]` from logits `[..., K]` with the loss's activation (column 0 =
        background)."""
        return self.loss.activation(logits.reshape(-1, logits.shape[-1])).reshape(logits.shape)


class LTRetinaNetRegressionHead(RetinaNetRegressionHead):
    """torchvision's regression head (same modules, same weights) trained with an ltdet
    regression loss; build it with `from_head(head, loss=...)`."""

    @classmethod
    def from_head(cls, head, *, loss):
        return _adopt_head(cls, head, RetinaNetRegressionHead, loss=loss,
                           attributes=("box_coder", "_loss_type"))

    @torch.jit.unused
    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor],
                     anchors: List[Tensor], matched_idxs: List[Tensor]) -> Tensor:
        """Box loss of a batch over its foreground anchors: a scalar, normalised as torchvision
        does."""
        bbox_regression = head_outputs["bbox_regression"]  # [B, A, 4]
        matched = torch.stack(matched_idxs)
        weight = _foreground_weights(matched, len(targets))
        preds, anchors_fg, gt_boxes, weights = [], [], [], []
        for target, pred, anchor, match, w in zip(targets, bbox_regression, anchors, matched,
                                                  weight):
            fg = torch.where(match >= 0)[0]
            preds.append(pred[fg])
            anchors_fg.append(anchor[fg])
            gt_boxes.append(target["boxes"][match[fg]])
            weights.append(w[fg])
        pred = torch.cat(preds)
        anchors_fg = torch.cat(anchors_fg)
        gt_boxes = torch.cat(gt_boxes).to(pred.dtype)
        if self.loss.needs_boxes:
            pred = self.box_coder.decode_single(pred, anchors_fg)
            target = gt_boxes
        else:
            target = self.box_coder.encode_single(gt_boxes, anchors_fg)
        if _density_normalised(self.loss):
            return self.loss(pred, target, reduction="mean")
        return self.loss(pred, target, weight=torch.cat(weights), reduction="sum")


def _density_normalised(loss):
    """True for GHM losses, whose gradient-density weights already normalise the loss."""
    return any(isinstance(m, GradientDensity) for m in loss.modules())


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
            raise ValueError(f"RetinaNet target labels must lie in [1, {num_columns - 1}] (the "
                             f"head has {num_columns} columns, column 0 = background) but range "
                             f"over [{low}, {high}]; build the model with num_classes = C + 1")


class LTRetinaNet(RetinaNet):
    """torchvision's RetinaNet scored with the classification loss's activation.

    Only `postprocess_detections` differs: scores are `head.classification_head.scores(logits)`
    (e.g. `sigmoid(z_j) * (1 - sigmoid(z_0))` for EQLv2, a softmax for CE) instead of a sigmoid,
    and the background column 0 is never a detection. `patch_retinanet` switches a model's class
    to this one in place (weights untouched), because torchvision offers no hook for it.
    """

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]],
                               anchors: List[List[Tensor]], image_shapes: List[Tuple[int, int]]
                               ) -> List[Dict[str, Tensor]]:
        class_logits = head_outputs["cls_logits"]
        box_regression = head_outputs["bbox_regression"]
        detections: List[Dict[str, Tensor]] = []
        for index, image_shape in enumerate(image_shapes):
            image_boxes: List[Tensor] = []
            image_scores: List[Tensor] = []
            image_labels: List[Tensor] = []
            for logits, deltas, level_anchors in zip(class_logits, box_regression,
                                                     anchors[index]):
                # Foreground scores [A_l, C]; column j scores label j + 1.
                scores = self.head.classification_head.scores(logits[index])[:, 1:]
                num_fg_classes = scores.shape[1]
                scores = scores.flatten()
                keep = torch.where(scores > self.score_thresh)[0]
                num_topk = det_utils._topk_min(keep, self.topk_candidates, 0)
                top_scores, order = scores[keep].topk(num_topk)
                top_idxs = keep[order]
                anchor_idxs = torch.div(top_idxs, num_fg_classes, rounding_mode="floor")
                boxes = self.box_coder.decode_single(deltas[index][anchor_idxs],
                                                     level_anchors[anchor_idxs])
                image_boxes.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                image_scores.append(top_scores)
                image_labels.append(top_idxs % num_fg_classes + 1)
            boxes = torch.cat(image_boxes)
            scores = torch.cat(image_scores)
            labels = torch.cat(image_labels)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)
            keep = keep[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep],
                               "labels": labels[keep]})
        return detections


def _as_loss(loss, kind, num_classes, stats):
    if loss is None or isinstance(loss, nn.Module):
        return loss
    from ltdet.losses import build_loss

    return build_loss(loss, num_classes=num_classes if kind == "cls" else None, stats=stats)


def patch_retinanet(model, cls_loss=None, box_loss=None, stats=None):
    """Install ltdet losses in a torchvision RetinaNet, in place; returns the model.

    Args:
        model: `torchvision.models.detection.RetinaNet` (any builder, v1 or v2) whose head has
            `C + 1` classification columns, labels `1..C`.
        cls_loss: config dict (`{"type": "eqlv2"}`) or built classification loss module; None
            keeps torchvision's focal loss and sigmoid scores. A loss whose classifier is not
            `C + 1` wide (`cls_channels`: seesaw's `C + 2`, a RoI-head design) raises ValueError.
        box_loss: config dict or built regression loss module; None keeps torchvision's.
        stats: `ltdet.data.ClassStats` for losses that need class frequencies.

    Weights are untouched: the new heads share the old heads' modules. With a classification
    loss the model's class becomes `LTRetinaNet` so that inference uses the loss's activation.
    """
    if not isinstance(model, RetinaNet):
        raise TypeError(f"patch_retinanet needs a torchvision RetinaNet, got {type(model).__name__}")
    if type(model) not in (RetinaNet, LTRetinaNet):
        raise TypeError(f"patch_retinanet: {type(model).__name__} subclasses RetinaNet; only "
                        f"torchvision's RetinaNet class is supported (its postprocess is replaced)")
    head = model.head
    num_classes = head.classification_head.num_classes - 1
    cls_module = _as_loss(cls_loss, "cls", num_classes, stats)
    box_module = _as_loss(box_loss, "box", num_classes, stats)
    if cls_module is not None:
        if not hasattr(cls_module, "activation"):
            raise TypeError(f"cls_loss {type(cls_module).__name__} is not a classification loss "
                            f"(it has no activation)")
        built_for = getattr(cls_module, "num_classes", None)
        if built_for is not None and built_for != num_classes:
            raise ValueError(f"cls_loss was built for num_classes={built_for} but the RetinaNet "
                             f"head has {num_classes + 1} columns (C = {num_classes}, column 0 = "
                             f"background)")
        get_channels = getattr(cls_module, "get_cls_channels", None)
        channels = get_channels(num_classes) if callable(get_channels) else num_classes + 1
        if channels != num_classes + 1:
            # seesaw's C + 2 (C classes + a 2-way objectness over the sampled RoIs) is the
            # authors' design for a two-stage bbox head (mmdetection has no dense-head seesaw)
            raise ValueError(f"{type(cls_module).__name__} trains a classifier of {channels} "
                             f"outputs (cls_channels) but a RetinaNet head has C + 1 = "
                             f"{num_classes + 1} per anchor; it is a RoI-head loss: use a "
                             f"FasterRCNN model, or on RetinaNet a C + 1 loss (e.g. seesaw_softmax, "
                             f"focal, eqlv2)")
        old = head.classification_head
        if isinstance(old, LTRetinaNetClassificationHead):
            old.loss = cls_module
        else:
            head.classification_head = LTRetinaNetClassificationHead.from_head(old, loss=cls_module)
        model.__class__ = LTRetinaNet
    if box_module is not None:
        if not hasattr(box_module, "needs_boxes"):
            raise TypeError(f"box_loss {type(box_module).__name__} is not a regression loss "
                            f"(it has no needs_boxes)")
        old = head.regression_head
        if isinstance(old, LTRetinaNetRegressionHead):
            old.loss = box_module
        else:
            head.regression_head = LTRetinaNetRegressionHead.from_head(old, loss=box_module)
    return model
