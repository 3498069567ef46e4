"""Base modules shared by the loss families: input checks and the default score activations.

Classification losses take `logits [N, C+1]` (column 0 = background, torchvision's layout; a loss
may declare another width, `cls_channels`: seesaw's `C+2`) and `labels int64 [N]` in `[0, C]`
(0 = background); `activation` always returns `[N, C+1]` scores. Regression losses take `pred [P, 4]` and
`target [P, 4]` (box deltas, or decoded xyxy boxes when `needs_boxes` is True).

`LossModule`, the base of both, makes every loss TorchScript-friendly (its training-only `forward`
is `@torch.jit.unused`; a classification loss's `activation` is scriptable, it scores the detections
of a scripted model) and treats its state as training state when loading checkpoints (absent
entries keep their fresh values, so torchvision weights load with `strict=True`).
"""
import logging

import torch
import torch.nn as nn
from torch import Tensor

logger = logging.getLogger(__name__)


def classes_from_stats(stats, num_classes=None) -> int:
    """C, the number of foreground classes, of losses built from class statistics; a given
    `num_classes` must agree. The base class's `check_inputs` then checks the logits' width, so
    stats-based losses need no check of their own."""
    stats_c = int(stats.instance_count.numel())
    if num_classes is not None and int(num_classes) != stats_c:
        raise ValueError(f"num_classes={num_classes} but the class statistics have {stats_c} "
                         f"classes; build both from the same training json")
    return stats_c


class LossModule(nn.Module):
    """Base of every ltdet loss (`ClassificationLoss`, `RegressionLoss`).

    TorchScript: the `forward` of every subclass is marked `@torch.jit.unused` when the class is
    defined (losses run in training only, where torchvision's detectors are not scriptable
    either), so a scripted detector compiles only what inference calls: the classification
    loss's `activation`.

    Checkpoints: the loss's persistent state (buffers, parameters, extra state, including those of
    its submodules such as GHM's `density.acc_sum`) is training state. An entry a state dict
    lacks keeps its current value (fresh for a new model) instead of being reported missing, with
    one INFO log record per loss, so a torchvision state dict loads into a patched model with
    `strict=True`. Entries that are present load as usual (a checkpoint's loss state is
    restored exactly)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None:
            torch.jit.unused(forward)  # sets a marker on the function; eager calls are unchanged

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # nn.Module.load_state_dict calls this before loading the submodules, with the same
        # `state_dict` object it then filters for each child: absent entries of the whole subtree
        # are filled with their current values here, so neither this module nor a submodule
        # records them as missing.
        absent = {key: value for key, value in self.state_dict(prefix=prefix, keep_vars=True).items()
                  if key not in state_dict}
        if absent:
            state_dict.update(absent)
            logger.info("%s (%s): the state dict has no %s; this loss state keeps its current "
                        "values (fresh in a new model: loss state is training state, e.g. when "
                        "loading torchvision weights)",
                        prefix[:-1] or "loss", type(self).__name__,
                        ", ".join(key[len(prefix):] for key in absent))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


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

    Channels: the classifier a loss trains has `cls_channels = get_cls_channels(C)` outputs,
    `C + 1` (torchvision's layout, column 0 = background) for every loss but one: seesaw's
    `C + 2` (C classes and a 2-way objectness, `ltdet.losses.seesaw`), the way mmdetection's
    losses declare `get_cls_channels` with `custom_cls_channels`. `build_detector` and
    `ltdet.patch` size the box predictor's `cls_score` with it; scores are always `[N, C+1]`."""

    use_sigmoid = False
    # a property: TorchScript would compile it with the module (it is never needed there)
    __jit_unused_properties__ = ["cls_channels"]

    def __init__(self, *, num_classes=None, loss_weight=1.0):
        super().__init__()
        self.num_classes = num_classes
        self.loss_weight = float(loss_weight)

    def get_cls_channels(self, num_classes: int) -> int:
        """Outputs of the classifier this loss trains for `num_classes` foreground classes:
        `C + 1` (column 0 = background)."""
        return int(num_classes) + 1

    @property
    def cls_channels(self):
        """`get_cls_channels(num_classes)`; None when the loss was built without num_classes."""
        return None if self.num_classes is None else self.get_cls_channels(self.num_classes)

    def _layout(self) -> str:
        """The logit columns, in words, for error messages."""
        return f"C+1 = {self.cls_channels} logit columns, column 0 = background"

    def check_inputs(self, logits, labels):
        """Shape and label-range checks; one cheap min/max per step."""
        if logits.dim() != 2:
            raise ValueError(f"{type(self).__name__}: logits must be [N, C+1], got shape "
                             f"{list(logits.shape)}")
        if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(f"{type(self).__name__}: labels must be [N] = [{logits.shape[0]}], "
                             f"got shape {list(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{type(self).__name__}: labels must be an integer tensor, got {labels.dtype}")
        num_columns = logits.shape[1]
        if self.num_classes is not None and num_columns != self.cls_channels:
            raise ValueError(
                f"{type(self).__name__} was built for num_classes={self.num_classes} "
                f"({self._layout()}) but got {num_columns} columns; the box predictor and the "
                f"loss must agree on num_classes")
        top = self.num_classes if self.num_classes is not None else num_columns - 1
        if labels.numel():
            low, high = torch.stack(torch.aminmax(labels)).tolist()  # one host sync per step
            if low < 0 or high > top:
                raise ValueError(
                    f"{type(self).__name__}: labels must lie in [0, {top}] (0 = "
                    f"background, 1..C = classes) but range over [{low}, {high}]")

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


def one_hot_targets(labels, num_columns, dtype):
    """One-hot targets `[N, C+1]` over all columns; column 0 is 1 for background RoIs."""
    target = torch.zeros(labels.shape[0], num_columns, dtype=dtype, device=labels.device)
    target.scatter_(1, labels.view(-1, 1), 1.0)
    return target


def foreground_targets(labels, num_classes, dtype):
    """Sigmoid targets `[N, C]` of the foreground columns 1..C; all zero for background RoIs."""
    target = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    is_fg = (labels > 0).to(dtype).unsqueeze(1)
    # Background rows scatter a 0 into column 0, leaving them all-negative.
    target.scatter_(1, (labels - 1).clamp_min(0).unsqueeze(1), is_fg)
    return target


def pad_background(loss_fg):
    """`[N, C]` foreground-column loss -> `[N, C+1]` with an exact zero in column 0."""
    return torch.nn.functional.pad(loss_fg, (1, 0))


class RegressionLoss(LossModule):
    """Box regression base: `pred` and `target` are `[P, 4]`."""

    needs_boxes = False

    def __init__(self, *, loss_weight=1.0):
        super().__init__()
        self.loss_weight = float(loss_weight)

    def check_inputs(self, pred, target):
        if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] != 4:
            raise ValueError(f"{type(self).__name__}: pred and target must both be [P, 4], got "
                             f"{list(pred.shape)} and {list(target.shape)}")
