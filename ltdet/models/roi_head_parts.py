"""The parts an `LTRoIHeads` is installed with, checked against its box predictor.

`predictor_num_classes` reads C from a FastRCNNPredictor-layout predictor; `resolve_loss` turns
a loss spec into a module; `check_loss_contract`, `check_classifier_width` and `check_hooks`
refuse parts that do not declare what the head uses or do not fit the predictor;
`fit_classifier` gives the predictor's `cls_score` the width the
classification loss trains (`get_cls_channels`: seesaw's C + 2). `gt_weights` / `product` make
the per-RoI weights the head's losses take.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ltdet.losses import build_loss

from .classifiers import resize_cls_score

__all__ = [
    "BOX_LOSS_ATTRIBUTES",
    "CLS_LOSS_ATTRIBUTES",
    "check_classifier_width",
    "check_hooks",
    "check_loss_contract",
    "fit_classifier",
    "gt_weights",
    "predictor_num_classes",
    "product",
    "resolve_loss",
]

#: what the head reads of its losses (declared by `ltdet.losses.base`'s loss classes)
CLS_LOSS_ATTRIBUTES = ("activation", "use_sigmoid", "get_cls_channels", "num_classes")
BOX_LOSS_ATTRIBUTES = ("needs_boxes",)


def predictor_num_classes(box_predictor: nn.Module) -> int:
    """C, the number of foreground classes of a FastRCNNPredictor-layout box predictor: from its
    class-specific regressor (`bbox_pred`, `4 * (C + 1)` outputs, whatever the classifier's width:
    seesaw's has `C + 2`), else from `cls_score` (`C + 1` outputs)."""
    bbox_pred = getattr(box_predictor, "bbox_pred", None)
    reg_out = getattr(bbox_pred, "out_features", None)
    if reg_out is not None and reg_out > 4 and reg_out % 4 == 0:
        return int(reg_out) // 4 - 1
    cls_score = getattr(box_predictor, "cls_score", None)
    out = getattr(cls_score, "out_features", None)
    if out is None:
        raise TypeError(
            f"box predictor {type(box_predictor).__name__} does not follow torchvision "
            "FastRCNNPredictor's layout (a cls_score layer with out_features = C+1)"
        )
    return int(out) - 1


def resolve_loss(
    spec: Any,
    previous: nn.Module | None,
    default: Mapping[str, Any],
    num_classes: int,
    stats: Any,
    name: str,
) -> nn.Module:
    """The loss module of `spec` (a built module, a `build_loss` config, or None: `previous`,
    else `default`)."""
    if spec is None:
        spec = previous if previous is not None else default
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"{name} must be a config dict like {{'type': ...}} or a loss module, "
            f"got {type(spec).__name__}"
        )
    return build_loss(spec, num_classes=num_classes, stats=stats)


def check_loss_contract(cls_loss: Any, box_loss: Any) -> None:
    """TypeError unless both losses are modules declaring what the head reads of them."""
    for name, module, attrs in (
        ("cls_loss", cls_loss, CLS_LOSS_ATTRIBUTES),
        ("box_loss", box_loss, BOX_LOSS_ATTRIBUTES),
    ):
        missing = [a for a in attrs if not hasattr(module, a)]
        if not isinstance(module, nn.Module) or missing:
            raise TypeError(
                f"{name} must be an nn.Module from ltdet.losses.build_loss (with "
                f"{', '.join(attrs)}); {type(module).__name__} lacks "
                f"{missing or 'nn.Module'}"
            )


def check_classifier_width(box_predictor: nn.Module, cls_loss: Any) -> None:
    """ValueError when the loss was built for other classes than the predictor's, or trains a
    classifier of another width than its `cls_score`."""
    num_classes = predictor_num_classes(box_predictor)
    if cls_loss.num_classes is not None and int(cls_loss.num_classes) != num_classes:
        raise ValueError(
            f"cls_loss was built for num_classes={cls_loss.num_classes} but the box "
            f"predictor has {num_classes} classes (bbox_pred.out_features = "
            f"4 * (C+1) = {4 * (num_classes + 1)}); build it with "
            f"num_classes={num_classes}"
        )
    channels = int(cls_loss.get_cls_channels(num_classes))
    have = getattr(getattr(box_predictor, "cls_score", None), "out_features", None)
    if have is not None and int(have) != channels:
        raise ValueError(
            f"{type(cls_loss).__name__} trains a classifier of {channels} outputs "
            f"(cls_channels, C = {num_classes}) but the box predictor's "
            f"cls_score has {have}; ltdet.patch / LTRoIHeads.from_roi_heads "
            f"re-create a linear or cosine cls_score of the right width"
        )


def check_hooks(box_predictor: nn.Module, lds: Any, fds: Any) -> None:
    """TypeError unless `lds` has weights / update and `fds` is callable on a predictor with
    torchvision's FastRCNNPredictor layout (None: no hook)."""
    if lds is not None and not (
        callable(getattr(lds, "weights", None)) and callable(getattr(lds, "update", None))
    ):
        raise TypeError(f"lds must have weights(ious) and update(ious); got {type(lds).__name__}")
    if fds is not None:
        if not callable(fds):
            raise TypeError(
                f"fds must be callable as fds(features, ious); got {type(fds).__name__}"
            )
        if not all(hasattr(box_predictor, a) for a in ("cls_score", "bbox_pred")):
            raise TypeError(
                "fds needs a box predictor with torchvision FastRCNNPredictor's layout "
                f"(cls_score, bbox_pred); got {type(box_predictor).__name__}"
            )


def fit_classifier(box_predictor: nn.Module, cls_loss: Any, num_classes: int) -> None:
    """Re-create only the predictor's `cls_score` when the loss trains another width (a
    torchvision C+1 predictor patched with seesaw, C+2), logged; see `resize_cls_score`.
    Nothing happens for a loss built for other classes (`check_classifier_width` says so) or
    for a module that is not a loss (`check_loss_contract` says so)."""
    if not all(hasattr(cls_loss, a) for a in CLS_LOSS_ATTRIBUTES):
        return
    if cls_loss.num_classes is not None and int(cls_loss.num_classes) != num_classes:
        return
    channels = int(cls_loss.get_cls_channels(num_classes))
    if getattr(getattr(box_predictor, "cls_score", None), "out_features", channels) == channels:
        return
    resize_cls_score(
        box_predictor,
        channels,
        reason=f"{type(cls_loss).__name__} (cls_channels = {channels} for C = {num_classes})",
    )


def gt_weights(targets: list[dict[str, Tensor]], dtype: torch.dtype) -> list[Tensor] | None:
    """Per-gt mixup weights of each image (`targets[i]["weights"]` float [K_i]; 1 where an image
    has none), or None when no target has weights."""
    if not any("weights" in t for t in targets):
        return None
    weights = []
    for i, t in enumerate(targets):
        num = t["boxes"].shape[0]
        w = t.get("weights")
        if w is None:
            w = t["boxes"].new_ones(num)
        if w.shape != (num,) or not w.is_floating_point():
            raise ValueError(
                f"targets[{i}]['weights'] must be a float tensor of shape [{num}] "
                f"(one weight per box), got {tuple(w.shape)} {w.dtype}"
            )
        weights.append(w.to(dtype))
    return weights


def product(*weights: Tensor | None) -> Tensor | None:
    """The product of the weights given (None ones left out), or None if all are None."""
    present = [w for w in weights if w is not None]
    if not present:
        return None
    out = present[0]
    for w in present[1:]:
        out = out * w
    return out
