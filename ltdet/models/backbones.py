"""Backbones: a torchvision classification network with its FPN, as torchvision's detection
builders make them (`_resnet_fpn_extractor`, `_mobilenet_extractor`, via `ltdet.compat`), so
that torchvision's detection weights load into them key for key.

The normalisation layer is a choice (`NORMS`): `frozen_bn` (torchvision's, for pretrained
weights), `bn` or `gn` (GroupNorm, 32 groups, to train from scratch). Backbone weights are a
torchvision weights name or a local checkpoint path (`ltdet.models.weights`).
"""

from __future__ import annotations

import math
from typing import Callable

import torchvision
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from ltdet.compat import mobilenet_extractor, resnet_fpn_extractor

from .weights import is_checkpoint_path, load_checkpoint_state_dict, resolve_weights

__all__ = [
    "BACKBONES",
    "BACKBONE_WEIGHTS",
    "NORMS",
    "NORM_LAYERS",
    "build_backbone",
    "max_trainable_layers",
]

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
NORMS = ("frozen_bn", "bn", "gn")

BACKBONE_WEIGHTS = {
    "resnet18": ResNet18_Weights,
    "resnet34": ResNet34_Weights,
    "resnet50": ResNet50_Weights,
    "resnet101": ResNet101_Weights,
    "mobilenet_v3_large": MobileNet_V3_Large_Weights,
}


def _group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He, ECCV 2018) or the largest divisor of 32 that fits
    (MobileNetV3 has 16-, 24-, 40-channel layers)."""
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels)


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "gn": _group_norm,
}


def max_trainable_layers(backbone: str) -> int:
    """How many stages of `backbone` torchvision's builders can leave trainable."""
    return 6 if backbone == "mobilenet_v3_large" else 5


def _load_backbone_checkpoint(body: nn.Module, backbone: str, path: str) -> None:
    # The classification layer (`fc` / `classifier`) is not part of the detection backbone.
    classifier = ("fc.", "classifier.")
    state = {
        k: v
        for k, v in load_checkpoint_state_dict(path, "model.weights_backbone").items()
        if not k.startswith(classifier)
    }
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(
            f"model.weights_backbone={path!r} is not a {backbone} state_dict: {e}"
        ) from e
    missing = [
        k for k in missing if not k.startswith(classifier) and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected:
        raise ValueError(
            f"model.weights_backbone={path!r} is not a {backbone} "
            f"state_dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def build_backbone(
    arch: str, backbone: str, norm: str, weights_backbone: str | None, trainable_layers: int
) -> tuple[nn.Module, AnchorGenerator | None]:
    """Backbone + FPN of `arch` as torchvision's builders make them; returns (module, anchor
    generator, or None where the detector's default anchors apply)."""
    norm_layer = NORM_LAYERS[norm]
    backbone_enum = None
    backbone_path = None
    if weights_backbone is not None:
        if is_checkpoint_path(weights_backbone):
            backbone_path = weights_backbone
        else:
            backbone_enum = resolve_weights(
                weights_backbone, BACKBONE_WEIGHTS[backbone], "model.weights_backbone"
            )
    body = getattr(torchvision.models, backbone)(weights=backbone_enum, norm_layer=norm_layer)
    if backbone_path is not None:
        _load_backbone_checkpoint(body, backbone, backbone_path)

    dense = arch.startswith("retinanet")
    if backbone.startswith("resnet"):
        if not dense:
            # the v2 archs put BatchNorm in the FPN (torchvision's fasterrcnn_resnet50_fpn_v2 and
            # maskrcnn_resnet50_fpn_v2).
            fpn_norm = nn.BatchNorm2d if arch in ("faster_rcnn_v2", "mask_rcnn_v2") else None
            return resnet_fpn_extractor(body, trainable_layers, norm_layer=fpn_norm), None
        # RetinaNet skips P2 (too many anchors) and adds P6/P7: from P5 in v1, from C5 in v2.
        p6_in = 256 if arch == "retinanet" else body.inplanes
        return resnet_fpn_extractor(
            body,
            trainable_layers,
            returned_layers=[2, 3, 4],
            extra_blocks=LastLevelP6P7(p6_in, 256),
        ), None
    if not dense:
        # torchvision's fasterrcnn_mobilenet_v3_large_fpn: the last two stages + max-pool level,
        # every anchor size on every level.
        anchor_sizes = ((32, 64, 128, 256, 512),) * 3
        anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        return mobilenet_extractor(body, True, trainable_layers), anchors
    # RetinaNet on MobileNetV3: the stride 8, 16 and 32 stages + P6/P7 give the same P3-P7
    # strides as on ResNet, so torchvision's default RetinaNet anchors apply.
    return mobilenet_extractor(
        body,
        True,
        trainable_layers,
        returned_layers=[2, 3, 5],
        extra_blocks=LastLevelP6P7(256, 256),
    ), None
