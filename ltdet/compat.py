"""The private torch / torchvision APIs ltdet relies on, in one place.

Everything here is either a name with a leading underscore in torch / torchvision, or a public
name that lives in a private module, or an internal layout of `nn.Module`. None of them is
covered by those projects' deprecation policy, so a new release may move or drop them without
notice. Each item says what it is and what to do if it moves; all were checked against torch
2.14.1 and torchvision 0.29.1 (the development environment's versions). The rest of ltdet
imports these names from here only, so an upgrade that breaks one is fixed in this file.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import Tensor, nn

# torchvision.models.detection._utils: `_topk_min(input, orig_kval, axis)` is
# `min(orig_kval, input.size(axis))`, written so that it also traces for ONNX export;
# torchvision's RetinaNet.postprocess_detections calls it, and `LTRetinaNet` reproduces that
# method. `overwrite_eps(model, eps)` sets the eps of every FrozenBatchNorm2d (torchvision's
# builders reset it to 0 for the weights trained before pytorch/vision#2933). If either moves:
# `_topk_min` is replaceable by `min(k, int(input.size(axis)))` (ltdet never exports to ONNX),
# `overwrite_eps` by a loop setting `m.eps` on every `FrozenBatchNorm2d`.
from torchvision.models.detection._utils import _topk_min as topk_min
from torchvision.models.detection._utils import overwrite_eps

# torchvision.models.detection.backbone_utils: `_resnet_fpn_extractor(backbone, trainable_layers,
# returned_layers, extra_blocks, norm_layer)` and `_mobilenet_extractor(backbone, fpn,
# trainable_layers, returned_layers, extra_blocks, norm_layer)` wrap a classification backbone
# into the body + FPN that torchvision's detection builders use (the public
# `resnet_fpn_backbone` / `mobilenet_backbone` build the backbone themselves, so they cannot take
# ltdet's norm layer and local weights). If they move, copy them from the torchvision release
# that had them: the detection weights' key names depend on that exact layout.
from torchvision.models.detection.backbone_utils import (
    _mobilenet_extractor as mobilenet_extractor,
)
from torchvision.models.detection.backbone_utils import (
    _resnet_fpn_extractor as resnet_fpn_extractor,
)

# torchvision.models.detection.faster_rcnn / .retinanet: `_default_anchorgen()`, the anchor
# generators of fasterrcnn_resnet50_fpn(_v2) (sizes 32..512, ratios 0.5/1/2) and of
# retinanet_resnet50_fpn(_v2) (3 scales per octave). If they move, build the same
# `AnchorGenerator` here from the sizes in the torchvision source.
from torchvision.models.detection.faster_rcnn import (
    _default_anchorgen as default_rpn_anchorgen,
)
from torchvision.models.detection.retinanet import (
    _default_anchorgen as default_retinanet_anchorgen,
)

__all__ = [
    "BatchNormBase",
    "adopt_module",
    "batchnorm_buffers",
    "default_retinanet_anchorgen",
    "default_rpn_anchorgen",
    "filter_state_dict_metadata",
    "mobilenet_extractor",
    "overwrite_eps",
    "resnet_fpn_extractor",
    "set_retinanet_box_loss_type",
    "topk_min",
]

# torch.nn.modules.batchnorm._BatchNorm: the common base of BatchNorm1d/2d/3d and SyncBatchNorm
# (no public name covers all four). If it moves, use `nn.modules.batchnorm._NormBase` or the
# tuple (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm).
BatchNormBase = nn.modules.batchnorm._BatchNorm


def batchnorm_buffers(bn: nn.Module) -> dict[str, Tensor]:
    """The buffers a BatchNorm layer registers itself (running_mean, running_var,
    num_batches_tracked), by name, not None.

    `nn.Module._buffers`: the module's own buffer table; the RoI samplers'
    scoring pass saves and restores them in place. If it goes, use
    `dict(bn.named_buffers(recurse=False))`, which returns the same tensors."""
    return {name: buf for name, buf in bn._buffers.items() if buf is not None}


# torchvision.models.detection.retinanet.RetinaNetRegressionHead._loss_type: which box loss
# torchvision's head computes ("l1", "smooth_l1", "giou", ...); retinanet_resnet50_fpn_v2 sets
# "giou" on a freshly built head the same way. If it is renamed, set the new attribute here (it
# only matters for an unpatched model: ltdet's regression head uses its own loss).
def set_retinanet_box_loss_type(head: Any, loss_type: str) -> None:
    """Choose torchvision's own box loss of a `RetinaNetRegressionHead` (e.g. "giou")."""
    head._loss_type = loss_type


M = TypeVar("M", bound=nn.Module)


def adopt_module(cls: type[M], module: nn.Module) -> M:
    """A `cls` instance (a subclass of `type(module)`) that shares everything of `module`:
    submodules, parameters, buffers (the same tensors, not copies), hooks and plain attributes;
    `cls.__init__` is not run.

    `nn.Module` keeps that state in instance-dict tables (`_modules`, `_parameters`, `_buffers`,
    the hook dicts); the tables are copied shallowly, so adding or replacing a
    submodule of the new module leaves `module` unchanged. ltdet's heads adopt torchvision's this
    way (`LTRoIHeads.from_roi_heads`, the RetinaNet heads' `from_head`). If `nn.Module` changes
    its layout, give each ltdet head an `__init__` taking the torchvision head's submodules and
    settings instead."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update(
        {
            key: copy.copy(value) if isinstance(value, (dict, set, list)) else value
            for key, value in vars(module).items()
        }
    )
    return new


def filter_state_dict_metadata(source: Mapping[str, Any], target: OrderedDict, keep) -> None:
    """Copy the `_metadata` of state dict `source` (per-module versions, which `load_state_dict`
    passes to `_load_from_state_dict`) to `target`, for the module prefixes `keep(prefix + ".")`
    accepts.

    `state_dict()._metadata` is an attribute of the returned OrderedDict, set
    by `nn.Module.state_dict`. If it goes, drop this call: the versions only matter for modules
    whose `_version` changed (BatchNorm's `num_batches_tracked`, torch 0.4)."""
    metadata = getattr(source, "_metadata", None)
    if metadata is not None:
        kept = OrderedDict((key, value) for key, value in metadata.items() if keep(key + "."))
        target._metadata = kept  # type: ignore[attr-defined]
