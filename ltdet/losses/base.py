"""The loss contract: base classes that own `forward`, and the shared helpers of the families.

Classification losses take `logits [N, C+1]` (column 0 = background, torchvision's layout; a loss
may declare another width, `cls_channels`: seesaw's `C+2`) and `labels int64 [N]` in `[0, C]`
(0 = background); `activation` always returns `[N, C+1]` scores. Regression losses take
`pred [P, 4]` and `target [P, 4]` (box deltas, or decoded xyxy boxes when `needs_boxes` is True).

`LossModule.forward(input, target, weight=None, reduction="mean", avg_factor=None)` is the one
template of every loss: `check_inputs`, then the per-element loss (`loss_elements`, which calls
the subclass's `elementwise`), then the shared reducer (`ltdet.losses.reduction.reduce_loss`:
weight, reduction, avg_factor), then `loss_weight`. A new loss subclasses `ClassificationLoss`,
`SigmoidClassificationLoss` or `RegressionLoss` and writes `elementwise` (plus its constructor);
a loss that needs the caller's weight before the reduction, or keeps state, overrides the narrow
hook `loss_elements` instead (seesaw counts the labels, EQLv2 collects its gradient statistics,
GHM's gradient density counts the valid elements), never `forward`.

`LossModule`, the base of both, makes every loss TorchScript-friendly (its training-only `forward`
is `@torch.jit.unused`; a classification loss's `activation` is scriptable, it scores the detections
of a scripted model) and treats its state as training state when loading checkpoints (absent
entries keep their fresh values, so torchvision weights load with `strict=True`).
"""

import logging
from typing import Any, Optional, Protocol

import torch
import torch.nn as nn
from torch import Tensor

from .reduction import reduce_loss

__all__ = [
    "ClassStatsLike",
    "ClassificationLoss",
    "LossModule",
    "RegressionLoss",
    "SigmoidClassificationLoss",
    "classes_from_stats",
    "foreground_targets",
    "one_hot_targets",
    "pad_background",
    "sigmoid_scores",
    "softmax_scores",
]

logger = logging.getLogger(__name__)


class ClassStatsLike(Protocol):
    """What a loss reads of `ltdet.data.ClassStats` (float tensors `[C]`, index i = label i+1)."""

    image_count: Tensor
    instance_count: Tensor
    num_images: int


def classes_from_stats(stats: ClassStatsLike, num_classes: Optional[int] = None) -> int:
    """C, the number of foreground classes, of class statistics; a given `num_classes` must
    agree. The one owner of this check: `build_loss` and the losses built from statistics call
    it, and the base class's `check_inputs` then checks the logits' width, so stats-based losses
    need no check of their own. TypeError when `stats` is not a ClassStats."""
    try:
        stats_c = int(stats.instance_count.numel())
    except AttributeError as e:
        raise TypeError(
            f"stats must be a ltdet.data.ClassStats (with .image_count / .instance_count tensors "
            f"[C], .num_images), got {type(stats).__name__}"
        ) from e
    if num_classes is not None and int(num_classes) != stats_c:
        raise ValueError(
            f"num_classes={num_classes} but the class statistics have {stats_c} "
            f"classes; build both from the same training json"
        )
    return stats_c


class LossModule(nn.Module):
    """Base of every ltdet loss (`ClassificationLoss`, `RegressionLoss`): owns `forward`.

    Subclasses write `elementwise(input, target) -> per-element loss` (the shapes
    `ltdet.losses.reduction` describes: `[N]` or `[N, K]`, first dimension = samples); `forward`
    checks the inputs, reduces and scales (module docstring). Attributes every loss declares
    (class attributes with these defaults; a subclass overrides the ones that differ):

    * `loss_weight` (float, 1.0): multiplies the reduced loss.
    * `self_normalising` (bool, False): the loss computes its own normaliser (GHM's gradient
      density); a caller must not normalise it again (the attribute's comment below).
    * `dense_normaliser` ("image" or "batch", "image"): which foreground normaliser a dense
      head applies (the attribute's comment below).

    TorchScript: `forward` is marked `@torch.jit.unused` (losses run in training only, where
    torchvision's detectors are not scriptable either; a subclass that still defines its own
    `forward` gets the same mark when the class is defined), so a scripted detector compiles only
    what inference calls: the classification loss's `activation`.

    Checkpoints: the loss's persistent state (buffers, parameters, extra state, including those of
    its submodules such as GHM's `density.acc_sum`) is training state. An entry a state dict
    lacks keeps its current value (fresh for a new model) instead of being reported missing, with
    one INFO log record per loss, so a torchvision state dict loads into a patched model with
    `strict=True`. Entries that are present load as usual (a checkpoint's loss state is
    restored exactly)."""

    #: The loss computes its own normaliser (GHM's gradient density, `N / GD(g)` per element):
    #: a caller must not normalise it again (RetinaNet's per-image foreground weights); it
    #: calls it with `reduction="mean"` and no weight.
    self_normalising: bool = False
    #: How a dense head (RetinaNet) normalises the loss by its foreground anchors: "image"
    #: (torchvision's RetinaNet: each image's sum over its own foreground count, averaged over
    #: the images) or "batch" (GFocal's QFL, EOD's EFL, mmdetection's dense heads: the step's sum
    #: over its foreground count averaged over ranks, `max(1, N_all_ranks / world_size)`; EOD's
    #: `max(N, 1) / W` differs only when a step has fewer foreground anchors than ranks). A
    #: loss whose authors trained it one way declares it: EFL's statistics are the gradients
    #: under that normaliser, so per-image weights would let images with few foreground anchors
    #: dominate `g_j`.
    dense_normaliser: str = "image"
    #: Multiplies the reduced loss (set by the constructor's `loss_weight`).
    loss_weight: float = 1.0

    def __init__(self, *, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = float(loss_weight)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None:
            torch.jit.unused(forward)  # sets a marker on the function; eager calls are unchanged

    def check_inputs(self, input: Tensor, target: Tensor) -> None:
        """Shape (and label) checks of one call; `ClassificationLoss` / `RegressionLoss`."""
        raise NotImplementedError

    def elementwise(self, input: Tensor, target: Tensor) -> Tensor:
        """The per-element loss, unweighted and unreduced: what a new loss writes."""
        raise NotImplementedError(f"{type(self).__name__} must define elementwise(input, target)")

    def loss_elements(self, input: Tensor, target: Tensor, weight: Optional[Tensor]) -> Tensor:
        """The per-element loss of one call, between the checks and the reduction.

        The default is `elementwise(input, target)`. The narrow hook for losses that genuinely
        differ: ones that read the caller's `weight` before the reduction (GHM's density counts
        only elements of positive weight; EQLv2's gradient statistics include the weights) or
        update state around the loss (seesaw's label counts, before it)."""
        return self.elementwise(input, target)

    @torch.jit.unused
    def forward(
        self,
        input: Tensor,
        target: Tensor,
        weight: Optional[Tensor] = None,
        reduction: str = "mean",
        avg_factor: Any = None,
    ) -> Tensor:
        """The loss of a batch.

        Args:
            input: logits `[N, cls_channels]` or box predictions `[P, 4]`.
            target: labels `[N]` in `[0, C]` or box targets `[P, 4]`.
            weight: None, per sample `[N]`, or per element (the per-element loss's shape).
            reduction: "none" | "sum" | "mean" (`ltdet.losses.reduction.reduce_loss`).
            avg_factor: the divisor of "mean" (number or 0-dim tensor); default the sample count.
        """
        self.check_inputs(input, target)
        loss = self.loss_elements(input, target, weight)
        return self.loss_weight * reduce_loss(loss, weight, reduction, avg_factor)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # nn.Module.load_state_dict calls this before loading the submodules, with the same
        # `state_dict` object it then filters for each child: absent entries of the whole subtree
        # are filled with their current values here, so neither this module nor a submodule
        # records them as missing.
        current = self.state_dict(prefix=prefix, keep_vars=True)
        absent = {key: value for key, value in current.items() if key not in state_dict}
        if absent:
            state_dict.update(absent)
            logger.info(
                "%s (%s): the state dict has no %s; this loss state keeps its current "
                "values (fresh in a new model: loss state is training state, e.g. when "
                "loading torchvision weights)",
                prefix[:-1] or "loss",
                type(self).__name__,
                ", ".join(key[len(prefix) :] for key in absent),
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def softmax_scores(logits: Tensor) -> Tensor:
    """Scores `[N, C+1]` of a softmax classifier: softmax over background and classes."""
    return logits.softmax(dim=-1)


def sigmoid_scores(logits: Tensor) -> Tensor:
    """Scores `[N, C+1]` of a sigmoid classifier: `sigmoid(z_j)` in columns 1..C and
    `1 - max_j sigmoid(z_j)` in column 0 (see `SigmoidClassificationLoss`)."""
    fg = logits[:, 1:].sigmoid()
    if fg.shape[1] == 0:
        return torch.ones_like(logits)
    return torch.cat([1.0 - fg.max(dim=1, keepdim=True).values, fg], dim=1)


class ClassificationLoss(LossModule):
    """Softmax-family base: `activation` is a softmax over all C+1 columns.

    `activation(logits [N, cls_channels]) -> scores [N, C+1]` is how a detector trained with the
    loss scores its detections; it must stay TorchScript-compatible (annotated, no Python-only
    calls), because a scripted detector compiles it.

    Attributes (besides `LossModule`'s):

    * `use_sigmoid` (bool, False): the loss trains independent sigmoids (EQL, EQLv2, federated,
      focal, GHM-C, cb with a sigmoid base); the detector then initialises the classifier's bias
      to a small prior (`ltdet.models.init`).
    * `num_classes` (int or None): C, when the loss was built for a given class count; the
      logits' width and the labels' range are then checked on every call.
    * `cls_channels` / `get_cls_channels(C)`: the classifier a loss trains has
      `get_cls_channels(C)` outputs, `C + 1` (torchvision's layout, column 0 = background) for
      every loss but one: seesaw's `C + 2` (C classes and a 2-way objectness,
      `ltdet.losses.seesaw`), the way mmdetection's losses declare `get_cls_channels` with
      `custom_cls_channels`. `build_detector` and `ltdet.patch` size the box predictor's
      `cls_score` with it; scores are always `[N, C+1]`."""

    #: Independent sigmoids per foreground class instead of one softmax.
    use_sigmoid: bool = False
    #: C; None when the loss was built without it (the logits' width is then not checked).
    num_classes: Optional[int]
    # a property: TorchScript would compile it with the module (it is never needed there)
    __jit_unused_properties__ = ["cls_channels"]

    def __init__(self, *, num_classes: Optional[int] = None, loss_weight: float = 1.0):
        super().__init__(loss_weight=loss_weight)
        self.num_classes = num_classes

    def get_cls_channels(self, num_classes: int) -> int:
        """Outputs of the classifier this loss trains for `num_classes` foreground classes:
        `C + 1` (column 0 = background)."""
        return int(num_classes) + 1

    @property
    def cls_channels(self) -> Optional[int]:
        """`get_cls_channels(num_classes)`; None when the loss was built without num_classes."""
        return None if self.num_classes is None else self.get_cls_channels(self.num_classes)

    def _layout(self) -> str:
        """The logit columns, in words, for error messages."""
        return f"C+1 = {self.cls_channels} logit columns, column 0 = background"

    def check_inputs(self, logits: Tensor, labels: Tensor) -> None:
        """Shape and label-range checks; one cheap min/max per step."""
        if logits.dim() != 2:
            raise ValueError(
                f"{type(self).__name__}: logits must be [N, C+1], got shape {list(logits.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: labels must be [N] = [{logits.shape[0]}], "
                f"got shape {list(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"{type(self).__name__}: labels must be an integer tensor, got {labels.dtype}"
            )
        num_columns = logits.shape[1]
        if self.num_classes is not None and num_columns != self.cls_channels:
            raise ValueError(
                f"{type(self).__name__} was built for num_classes={self.num_classes} "
                f"({self._layout()}) but got {num_columns} columns; the box predictor and the "
                f"loss must agree on num_classes"
            )
        top = self.num_classes if self.num_classes is not None else num_columns - 1
        if labels.numel():
            low, high = torch.stack(torch.aminmax(labels)).tolist()  # one host sync per step
            if low < 0 or high > top:
                raise ValueError(
                    f"{type(self).__name__}: labels must lie in [0, {top}] (0 = "
                    f"background, 1..C = classes) but range over [{low}, {high}]"
                )

    def activation(self, logits: Tensor) -> Tensor:
        """Scores `[N, C+1]` for postprocessing: softmax over background and classes."""
        return softmax_scores(logits)


class SigmoidClassificationLoss(ClassificationLoss):
    """Base of losses with one independent sigmoid per foreground class (columns 1..C).

    Column 0 receives no gradient. `activation` returns `sigmoid(z_j)` in columns 1..C and, in
    column 0 (which torchvision's postprocess drops), `1 - max_j sigmoid(z_j)`: the probability
    that the most likely class is absent, a background score consistent with the foreground ones.
    """

    use_sigmoid = True

    def activation(self, logits: Tensor) -> Tensor:
        return sigmoid_scores(logits)


def one_hot_targets(labels: Tensor, num_columns: int, dtype: torch.dtype) -> Tensor:
    """One-hot targets `[N, C+1]` over all columns; column 0 is 1 for background RoIs."""
    target = torch.zeros(labels.shape[0], num_columns, dtype=dtype, device=labels.device)
    target.scatter_(1, labels.view(-1, 1), 1.0)
    return target


def foreground_targets(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Sigmoid targets `[N, C]` of the foreground columns 1..C; all zero for background RoIs."""
    target = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    is_fg = (labels > 0).to(dtype).unsqueeze(1)
    # Background rows scatter a 0 into column 0, leaving them all-negative.
    target.scatter_(1, (labels - 1).clamp_min(0).unsqueeze(1), is_fg)
    return target


def pad_background(loss_fg: Tensor) -> Tensor:
    """`[N, C]` foreground-column loss -> `[N, C+1]` with an exact zero in column 0."""
    return torch.nn.functional.pad(loss_fg, (1, 0))


class RegressionLoss(LossModule):
    """Box regression base: `pred` and `target` are `[P, 4]`.

    Attribute (besides `LossModule`'s): `needs_boxes` (bool, False): the loss compares decoded
    `xyxy` boxes (GIoU), not box deltas; the RoI head decodes its deltas against the proposals
    before calling it."""

    #: `pred` / `target` are decoded xyxy boxes instead of box deltas.
    needs_boxes: bool = False

    def check_inputs(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] != 4:
            raise ValueError(
                f"{type(self).__name__}: pred and target must both be [P, 4], got "
                f"{list(pred.shape)} and {list(target.shape)}"
            )
