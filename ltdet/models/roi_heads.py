"""`LTRoIHeads`: torchvision's `RoIHeads` with pluggable losses, RoI sampler and imbalance hooks.

Label convention (torchvision's): the box predictor emits `class_logits [N, C+1]` (column 0 =
background; `[N, cls_loss.cls_channels]` when the loss trains another width - seesaw's `C+2`, C
classes and a 2-way objectness, `ltdet.losses.seesaw`) and `box_regression [N, (C+1)*4]`
class-specific deltas; RoI labels are in `[0, C]` (0 = background, -1 = ignored before sampling).
`from_roi_heads` (hence `ltdet.patch`) re-creates only a linear / cosine `cls_score` of another
width than the loss's, fresh, with a warning in the log (`classifiers.resize_cls_score`).

Training (per step, N = sampled RoIs over the batch, P = positives among them):
- `loss_classifier = cls_loss(class_logits [N, C+1], labels [N], weight, avg_factor=N)` - the mean
  over sampled RoIs, as torchvision's cross entropy;
- `loss_box_reg = sum_i w_i * box_loss(pred_i, target_i) / N` over positives, torchvision's
  normalisation; `pred`/`target` are box deltas, or decoded xyxy boxes when the box loss has
  `needs_boxes` (GIoU).
The weights are products of: per-gt mixup weights (`targets[i]["weights"]` float [K]: a positive
takes its matched gt's weight in both losses, a negative 1), the sampler's weights (PISA ISR-N /
ISR-P on classification) and LDS weights on positives' box loss;
- with PISA's CARL, `loss_carl = sum_i c_i w_i * box_loss_i / N` as a separate key, added to the
  unweighted `loss_box_reg` (mmdetection's PISARoIHead), not multiplied into it.

Inference: `postprocess_detections` scores with `cls_loss.activation(class_logits)` (a sigmoid-
trained classifier is scored with its sigmoid, not a softmax) and otherwise keeps torchvision's
`score_thresh` / class-wise NMS / `detections_per_img`. Mask and keypoint branches are torchvision's
and run on the sampled positives as before.

Hooks: `lds` (`weights(ious [P]) -> [P]`, `update(ious [P])`, Yang et al., ICML 2021) and `fds`
(`forward(features [N, D], ious [N]) -> [N, D]`, applied in training to the box regressor's input
only; its optional `update(features, ious)` is called each training step with the features before
re-colouring). Every RoI's IoU with its matched ground truth and the matched index are carried in
`RoICandidates` (before sampling) and `RoISamples` (after), for samplers and hooks.

TorchScript: inference (eval mode) scripts as torchvision's `RoIHeads` does - `forward`,
`postprocess_detections`, `cls_loss.activation` and the mask / keypoint inference. The training
path (`_forward_train`: sampling, losses, hooks) is `@torch.jit.unused`, and the sampler and the
LDS / FDS hooks (training-only modules) are left out of the scripted module
(`__jit_ignored_attributes__`).
"""

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    keypointrcnn_inference,
    keypointrcnn_loss,
    maskrcnn_inference,
    maskrcnn_loss,
)
from torchvision.ops import boxes as box_ops

from ltdet.compat import adopt_module
from ltdet.losses.base import classes_from_stats

from .roi_head_parts import (
    check_classifier_width,
    check_hooks,
    check_loss_contract,
    fit_classifier,
    gt_weights,
    predictor_num_classes,
    product,
    resolve_loss,
)
from .roi_samplers import (
    HeadScorer,
    RoICandidates,
    RoISampler,
    RoISamples,
    box_loss_of_positives,
    build_roi_sampler,
    matched_boxes,
)

#: torchvision's Fast R-CNN box loss: smooth L1 with beta 1/9, sum over positives / sampled RoIs
DEFAULT_BOX_LOSS = {"type": "smooth_l1", "beta": 1.0 / 9.0}
DEFAULT_CLS_LOSS = {"type": "ce"}


class LTRoIHeads(RoIHeads):
    """torchvision `RoIHeads` whose box losses, RoI sampler and scoring are pluggable.

    Build it from an existing head with `LTRoIHeads.from_roi_heads(model.roi_heads, cls_loss=...,
    box_loss=..., sampler=...)`: every submodule (box/mask/keypoint branches) and setting of the
    original is kept, parameters are shared, not copied.

    Attributes: `cls_loss` (classification loss, also the scorer: `activation`), `box_loss`,
    `sampler` (`RoISampler`), `lds` / `fds` (optional hooks). They are not class annotations:
    TorchScript would read them as the module's attribute types (torchvision's `RoIHeads`
    declares its own in `__annotations__`)."""

    # training-only modules that inference never calls: not compiled by torch.jit.script
    __jit_ignored_attributes__ = ["sampler", "lds", "fds"]
    # what `_install` sets (and `from_roi_heads` keeps from an LTRoIHeads given in)
    _PARTS = ("cls_loss", "box_loss", "sampler", "lds", "fds")

    def __init__(
        self,
        *args,
        cls_loss: nn.Module,
        box_loss: nn.Module,
        sampler: Optional[RoISampler] = None,
        lds: Optional[nn.Module] = None,
        fds: Optional[nn.Module] = None,
        **kwargs,
    ):
        """Same arguments as torchvision's `RoIHeads`, plus the built keyword-only parts."""
        super().__init__(*args, **kwargs)
        self._install(cls_loss, box_loss, build_roi_sampler(sampler), lds, fds)

    @classmethod
    def from_roi_heads(
        cls,
        roi_heads: RoIHeads,
        *,
        cls_loss=None,
        box_loss=None,
        sampler=None,
        lds=None,
        fds=None,
        stats=None,
    ) -> "LTRoIHeads":
        """A new `LTRoIHeads` sharing every submodule and setting of `roi_heads`.

        cls_loss / box_loss: built modules or `build_loss` configs (built with the predictor's C
        and `stats`); sampler: a `RoISampler` or `build_roi_sampler` config. None keeps the part
        of an `LTRoIHeads` given in, else torchvision's defaults (cross entropy, smooth L1 with
        beta 1/9, random sampling). Raises ValueError / TypeError on inconsistent parts."""
        if not isinstance(roi_heads, RoIHeads):
            raise TypeError(
                f"from_roi_heads needs a torchvision RoIHeads, got {type(roi_heads).__name__}"
            )
        num_classes = predictor_num_classes(roi_heads.box_predictor)
        if stats is not None:
            classes_from_stats(stats, num_classes)
        # the parts of an LTRoIHeads given in, kept where no new one is given
        previous = (
            {name: getattr(roi_heads, name) for name in cls._PARTS}
            if isinstance(roi_heads, LTRoIHeads)
            else {}
        )
        # same submodules and parameters, own registries
        head = adopt_module(cls, roi_heads)
        cls_loss = resolve_loss(
            cls_loss, previous.get("cls_loss"), DEFAULT_CLS_LOSS, num_classes, stats, "cls_loss"
        )
        box_loss = resolve_loss(
            box_loss, previous.get("box_loss"), DEFAULT_BOX_LOSS, num_classes, stats, "box_loss"
        )
        sampler = build_roi_sampler(sampler if sampler is not None else previous.get("sampler"))
        # the classifier's width follows the loss (seesaw: C + 2); a failed install undoes it
        old_cls_score = getattr(head.box_predictor, "cls_score", None)
        fit_classifier(head.box_predictor, cls_loss, num_classes)
        try:
            head._install(
                cls_loss,
                box_loss,
                sampler,
                lds if lds is not None else previous.get("lds"),
                fds if fds is not None else previous.get("fds"),
            )
        except Exception:
            if old_cls_score is not None:
                head.box_predictor.cls_score = old_cls_score
            raise
        return head

    def _install(
        self,
        cls_loss: nn.Module,
        box_loss: nn.Module,
        sampler: RoISampler,
        lds: Optional[nn.Module],
        fds: Optional[nn.Module],
    ) -> None:
        check_loss_contract(cls_loss, box_loss)
        check_classifier_width(self.box_predictor, cls_loss)
        check_hooks(self.box_predictor, lds, fds)
        # Duck-typed parts (the checks above say what they must have), hence Any: typed as
        # nn.Module their methods would read as `Tensor | Module`. Annotated here, not on the
        # class, where TorchScript would take them for the attributes' types (docstring).
        self.cls_loss: Any = cls_loss
        self.box_loss = box_loss
        self.sampler = sampler
        self.lds: Any = lds
        self.fds: Any = fds
        sampler.validate(self.roi_scorer())

    def roi_scorer(
        self,
        features: Optional[Dict[str, Tensor]] = None,
        image_shapes: Optional[List[Tuple[int, int]]] = None,
    ) -> HeadScorer:
        """The narrow view of this head its sampler gets (`RoIScorer`), for one training step's
        `features` / `image_shapes` (None: no box-head scoring, e.g. for `loss_weights`)."""
        return HeadScorer(
            box_roi_pool=self.box_roi_pool,
            box_head=self.box_head,
            box_predictor=self.box_predictor,
            cls_loss=self.cls_loss,
            box_loss=self.box_loss,
            box_coder=self.box_coder,
            batch_size_per_image=self.fg_bg_sampler.batch_size_per_image,
            positive_fraction=self.fg_bg_sampler.positive_fraction,
            bg_iou_thresh=self.proposal_matcher.low_threshold,
            features=features,
            image_shapes=image_shapes,
        )

    # ---------------------------------------------------------------- assignment and sampling
    def assign_candidates(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> list[RoICandidates]:
        """Matches every proposal to a ground truth (torchvision's matcher) and records its IoU."""
        candidates = []
        for boxes, gt, gt_cls in zip(proposals, gt_boxes, gt_labels):
            if gt.shape[0] == 0:
                zeros = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
                candidates.append(
                    RoICandidates(boxes, zeros, zeros.clone(), boxes.new_zeros(boxes.shape[0]), gt)
                )
                continue
            quality = box_ops.box_iou(gt, boxes)
            matched = self.proposal_matcher(quality)
            clamped = matched.clamp(min=0)
            labels = gt_cls[clamped].to(torch.int64)
            labels[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
            labels[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            candidates.append(RoICandidates(boxes, labels, clamped, quality.max(0).values, gt))
        return candidates

    def select_training_samples(self, proposals, targets, features=None, image_shapes=None):
        """Assigns, samples (with `self.sampler`) and encodes; returns a `RoISamples`.

        Extends torchvision's signature: OHEM / PISA need `features` and `image_shapes` to score
        the candidates."""
        self.check_targets(targets)
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        image_gt_weights = gt_weights(targets, dtype)
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        candidates = self.assign_candidates(proposals, gt_boxes, gt_labels)
        if self.sampler.needs_features and features is None:
            raise ValueError(
                f"the {type(self.sampler).__name__} scores candidates with the box head: "
                "call select_training_samples(proposals, targets, features, image_shapes)"
            )
        selections = self.sampler(self.roi_scorer(features, image_shapes), candidates)
        fields = {
            k: [] for k in ("proposals", "labels", "matched_idxs", "ious", "matched_gt_boxes")
        }
        for cand, sel in zip(candidates, selections):
            idx = sel.indices
            fields["proposals"].append(cand.boxes[idx])
            fields["labels"].append(cand.labels[idx])
            fields["matched_idxs"].append(cand.matched_idxs[idx])
            fields["ious"].append(cand.ious[idx])
            fields["matched_gt_boxes"].append(matched_boxes(cand.gt_boxes, cand.matched_idxs[idx]))
        roi_gt_weights = None
        if image_gt_weights is not None:
            roi_gt_weights = [
                torch.where(labels > 0, w[m], 1.0)
                if w.numel()
                else torch.ones(labels.shape, dtype=dtype, device=labels.device)
                for w, m, labels in zip(image_gt_weights, fields["matched_idxs"], fields["labels"])
            ]
        cls_weights = None
        if any(sel.cls_weight is not None for sel in selections):
            cls_weights = [
                sel.cls_weight
                if sel.cls_weight is not None
                else torch.ones(sel.indices.shape[0], dtype=dtype, device=sel.indices.device)
                for sel in selections
            ]
        regression_targets = self.box_coder.encode(fields["matched_gt_boxes"], fields["proposals"])
        return RoISamples(
            regression_targets=regression_targets,
            gt_boxes=gt_boxes,
            gt_weights=roi_gt_weights,
            cls_weights=cls_weights,
            **fields,
        )

    # ---------------------------------------------------------------- box head
    def predict_boxes(self, box_features: Tensor, ious: Optional[Tensor] = None):
        """(class_logits [N, C+1], box_regression [N, (C+1)*4]); with FDS (training, `ious` given)
        only the regressor's input is re-coloured."""
        if self.fds is None or ious is None:
            return self.box_predictor(box_features)
        x = box_features.flatten(start_dim=1)
        regressor_input = self.fds(x, ious)
        if self.training and callable(getattr(self.fds, "update", None)):
            # statistics from the features before re-colouring (FDS, Yang et al. 2021, Sec. 3.2)
            self.fds.update(x.detach(), ious)
        return self.box_predictor.cls_score(x), self.box_predictor.bbox_pred(regressor_input)

    def _box_loss(
        self,
        box_regression: Tensor,
        labels: Tensor,
        proposals: Tensor,
        gt_boxes: Tensor,
        targets: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Box loss of positives: box_regression [P, (C+1)*4], labels [P] in [1, C]."""
        return box_loss_of_positives(
            self.box_loss,
            self.box_coder,
            box_regression,
            labels,
            proposals,
            gt_boxes,
            targets,
            **kwargs,
        )

    def box_losses(self, class_logits: Tensor, box_regression: Tensor, samples: RoISamples) -> dict:
        """{"loss_classifier", "loss_box_reg"} of the sampled RoIs (see the module docstring),
        plus the sampler's `extra_box_loss_key` term (PISA's "loss_carl") when it has one."""
        labels = torch.cat(samples.labels)
        num = labels.shape[0]
        # PISA's CARL: the sampler's box weights define an extra term (mmdetection's PISARoIHead
        # adds `loss_carl` to the unweighted `loss_bbox`); the key is always present when enabled
        extra_key = self.sampler.extra_box_loss_key
        extra = {extra_key: box_regression.sum() * 0} if extra_key else {}
        if num == 0:
            zero = class_logits.sum() * 0 + box_regression.sum() * 0
            return {"loss_classifier": zero, "loss_box_reg": zero.clone(), **extra}
        sampler_cls_weight, sampler_box_weight = self.sampler.loss_weights(
            self.roi_scorer(), class_logits, box_regression, samples
        )
        extra_weight = None
        if extra_key:
            extra_weight, sampler_box_weight = sampler_box_weight, None
        base = torch.cat(samples.gt_weights) if samples.gt_weights is not None else None
        cls_weight = product(base, sampler_cls_weight)
        loss_cls = self.cls_loss(
            class_logits, labels, weight=cls_weight, reduction="mean", avg_factor=float(num)
        )
        positive = torch.where(labels > 0)[0]
        if positive.numel() == 0:
            return {"loss_classifier": loss_cls, "loss_box_reg": box_regression.sum() * 0, **extra}
        lds_weight = None
        if self.lds is not None:
            # LDS bins a continuous target of each positive: its IoU with its gt (default) or the
            # L2 norm of its regression-target deltas (`model.lds.target: delta`).
            if getattr(self.lds, "target", "iou") == "delta":
                values = torch.cat(samples.regression_targets)[positive].norm(dim=1)
            else:
                values = torch.cat(samples.ious)[positive]
            values = values.detach()
            if self.training:
                self.lds.update(values)
            lds_weight = self.lds.weights(values)
        box_weight = product(
            base[positive] if base is not None else None, lds_weight, sampler_box_weight
        )
        box_args = (
            box_regression[positive],
            labels[positive],
            torch.cat(samples.proposals)[positive],
            torch.cat(samples.matched_gt_boxes)[positive],
            torch.cat(samples.regression_targets)[positive],
        )
        if extra_weight is None:
            loss_box = self._box_loss(
                *box_args, weight=box_weight, reduction="mean", avg_factor=float(num)
            )
            return {"loss_classifier": loss_cls, "loss_box_reg": loss_box, **extra}
        # one box-loss call (stateful box losses update once), two reductions over the N RoIs
        per_box = self._box_loss(*box_args, weight=box_weight, reduction="none")
        per_box = per_box.reshape(positive.numel(), -1)
        return {
            "loss_classifier": loss_cls,
            "loss_box_reg": per_box.sum() / num,
            extra_key: (per_box * extra_weight[:, None].to(per_box.dtype)).sum() / num,
        }

    def postprocess_detections(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """torchvision's post-processing, scored with `cls_loss.activation` instead of softmax
        (scores `[N, C+1]`, column 0 = background, whatever the classifier's width)."""
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = self.cls_loss.activation(class_logits)
        num_classes = pred_scores.shape[-1]
        all_boxes: List[Tensor] = []
        all_scores: List[Tensor] = []
        all_labels: List[Tensor] = []
        for boxes, scores, image_shape in zip(
            pred_boxes.split(boxes_per_image, 0),
            pred_scores.split(boxes_per_image, 0),
            image_shapes,
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = (
                torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
            )
            # drop the background column, then every (RoI, class) pair is a candidate detection
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[
                : self.detections_per_img
            ]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        """Same inputs and outputs as torchvision's `RoIHeads.forward`: (detections, {}) in eval
        mode, ([], losses) in training mode (training is not scriptable: `_forward_train`)."""
        if targets is not None:
            _check_target_types(targets, self.has_keypoint())
        if self.training:
            return self._forward_train(features, proposals, image_shapes, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        if torch.jit.is_scripting():
            class_logits, box_regression = self.box_predictor(box_features)
        else:  # the same call (no FDS at inference), through the overridable method
            class_logits, box_regression = self.predict_boxes(box_features)
        boxes, scores, labels = self.postprocess_detections(
            class_logits, box_regression, proposals, image_shapes
        )
        result: List[Dict[str, Tensor]] = []
        for b, s, lab in zip(boxes, scores, labels):
            result.append({"boxes": b, "labels": lab, "scores": s})
        if self.has_mask():
            self._mask_inference(features, image_shapes, result)
        if self.has_keypoint():
            self._keypoint_inference(features, image_shapes, result)
        losses: Dict[str, Tensor] = {}
        return result, losses

    @torch.jit.unused
    def _forward_train(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]],
    ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        """Training step of `forward`: sample, run the box head (FDS on the sampled RoIs' IoUs),
        compute the losses (and the mask / keypoint losses). Returns ([], losses)."""
        samples = self.select_training_samples(proposals, targets, features, image_shapes)
        box_features = self.box_head(self.box_roi_pool(features, samples.proposals, image_shapes))
        fds_ious = torch.cat(samples.ious) if self.fds is not None else None
        class_logits, box_regression = self.predict_boxes(box_features, fds_ious)
        losses = self.box_losses(class_logits, box_regression, samples)
        if self.has_mask():
            losses.update(self._mask_forward(features, image_shapes, targets, samples))
        if self.has_keypoint():
            losses.update(self._keypoint_forward(features, image_shapes, targets, samples))
        return [], losses

    def _positive_rois(self, samples: RoISamples):
        """Per image: (positive proposals, their matched gt index), torchvision's mask/keypoint
        training inputs."""
        positives = [torch.where(labels > 0)[0] for labels in samples.labels]
        return (
            [p[i] for p, i in zip(samples.proposals, positives)],
            [m[i] for m, i in zip(samples.matched_idxs, positives)],
        )

    def _mask_forward(self, features, image_shapes, targets, samples) -> dict:
        """Mask loss of the sampled positives (training)."""
        mask_proposals, pos_matched_idxs = self._positive_rois(samples)
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
        )
        return {
            "loss_mask": maskrcnn_loss(
                mask_logits,
                mask_proposals,
                [t["masks"] for t in targets],
                [t["labels"] for t in targets],
                pos_matched_idxs,
            )
        }

    def _mask_inference(
        self,
        features: Dict[str, Tensor],
        image_shapes: List[Tuple[int, int]],
        result: List[Dict[str, Tensor]],
    ) -> None:
        """Adds "masks" to each image's detections (torchvision's Mask R-CNN inference)."""
        mask_proposals = [r["boxes"] for r in result]
        # explicit None checks: TorchScript refines the Optional submodules (as torchvision does)
        if (
            self.mask_roi_pool is not None
            and self.mask_head is not None
            and self.mask_predictor is not None
        ):
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            )
            mask_probs = maskrcnn_inference(mask_logits, [r["labels"] for r in result])
            for mask_prob, r in zip(mask_probs, result):
                r["masks"] = mask_prob

    def _keypoint_forward(self, features, image_shapes, targets, samples) -> dict:
        """Keypoint loss of the sampled positives (training)."""
        keypoint_proposals, pos_matched_idxs = self._positive_rois(samples)
        keypoint_logits = self.keypoint_predictor(
            self.keypoint_head(self.keypoint_roi_pool(features, keypoint_proposals, image_shapes))
        )
        return {
            "loss_keypoint": keypointrcnn_loss(
                keypoint_logits,
                keypoint_proposals,
                [t["keypoints"] for t in targets],
                pos_matched_idxs,
            )
        }

    def _keypoint_inference(
        self,
        features: Dict[str, Tensor],
        image_shapes: List[Tuple[int, int]],
        result: List[Dict[str, Tensor]],
    ) -> None:
        """Adds "keypoints" / "keypoints_scores" to each image's detections (torchvision's)."""
        keypoint_proposals = [r["boxes"] for r in result]
        if (
            self.keypoint_roi_pool is not None
            and self.keypoint_head is not None
            and self.keypoint_predictor is not None
        ):
            keypoint_logits = self.keypoint_predictor(
                self.keypoint_head(
                    self.keypoint_roi_pool(features, keypoint_proposals, image_shapes)
                )
            )
            keypoints_probs, kp_scores = keypointrcnn_inference(keypoint_logits, keypoint_proposals)
            for keypoint_prob, kps, r in zip(keypoints_probs, kp_scores, result):
                r["keypoints"] = keypoint_prob
                r["keypoints_scores"] = kps


def _check_target_types(targets: List[Dict[str, Tensor]], has_keypoint: bool) -> None:
    for i, t in enumerate(targets):
        if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
            raise TypeError(f"targets[{i}]['boxes'] must be float, got {t['boxes'].dtype}")
        if t["labels"].dtype != torch.int64:
            raise TypeError(f"targets[{i}]['labels'] must be int64, got {t['labels'].dtype}")
        if has_keypoint and t["keypoints"].dtype != torch.float32:
            raise TypeError(
                f"targets[{i}]['keypoints'] must be float32, got {t['keypoints'].dtype}"
            )
