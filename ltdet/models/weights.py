"""Weights and checkpoints: torchvision weights names, local checkpoints, state-dict conversion.

- `resolve_weights`: a torchvision weights enum member from `"COCO_V1"` / `"DEFAULT"` / the full
  name, nothing downloaded;
- `unwrap_state_dict`: the one way a model state dict is taken out of what a checkpoint file
  holds (an ltdet checkpoint dict's `"model"`, a DistributedDataParallel `module.` prefix);
- `load_checkpoint_state_dict` / `load_detector_state_dict`: read a local checkpoint and load it
  strictly except for the class-specific predictor;
- `torchvision_state_dict`: a patched model's state dict without ltdet's additions
  (`LTDET_STATE_PREFIXES`), which the unpatched torchvision model loads with `strict=True`.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from ltdet.compat import filter_state_dict_metadata

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "LTDET_STATE_PREFIXES",
    "PREDICTOR_PREFIXES",
    "is_checkpoint_path",
    "load_checkpoint_state_dict",
    "load_detector_state_dict",
    "resolve_weights",
    "torchvision_state_dict",
    "unwrap_state_dict",
]

#: state-dict prefixes of the modules `ltdet.patch` adds (two-stage: losses, RoI sampler, LDS /
#: FDS; RetinaNet: the heads' losses); torchvision's models have no such entries
LTDET_STATE_PREFIXES = (
    "roi_heads.cls_loss.",
    "roi_heads.box_loss.",
    "roi_heads.sampler.",
    "roi_heads.lds.",
    "roi_heads.fds.",
    "head.classification_head.loss.",
    "head.regression_head.loss.",
)
#: state-dict prefixes of the class-specific predictors (box; Mask R-CNN's per-class mask
#: logits), re-initialised for `num_classes`
PREDICTOR_PREFIXES = (
    "roi_heads.box_predictor.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
    "head.classification_head.cls_logits.",
)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")
_DDP_PREFIX = "module."


def is_checkpoint_path(value: str) -> bool:
    """Whether a `model.weights` / `model.weights_backbone` value names a local file rather than
    torchvision weights."""
    return (
        os.path.exists(value)
        or os.sep in value
        or "/" in value
        or value.endswith(CHECKPOINT_SUFFIXES)
    )


def resolve_weights(name: str, enum_cls: type[WeightsEnum], field: str) -> WeightsEnum:
    """A torchvision weights enum member from `"COCO_V1"`, `"DEFAULT"` or the full
    `"FasterRCNN_ResNet50_FPN_Weights.COCO_V1"`; nothing is downloaded.

    Raises ValueError naming `field` and listing the valid names when `name` is not one of
    `enum_cls`'s members (e.g. a RetinaNet weights name given for a Faster R-CNN)."""
    valid = [f"{enum_cls.__name__}.{member}" for member in enum_cls.__members__]
    short = name
    if "." in name:
        prefix, _, short = name.rpartition(".")
        if prefix != enum_cls.__name__:
            raise ValueError(
                f"{field}={name!r} names weights of {prefix}, but this model takes "
                f"{enum_cls.__name__}; valid values: {', '.join(valid)} "
                f"(or the short member name, or a local checkpoint path)"
            )
    if short not in enum_cls.__members__:
        raise ValueError(
            f"{field}={name!r} is not a torchvision weights name for this model; "
            f"valid values: {', '.join(valid)} (or the short member name, or a "
            f"local checkpoint path)"
        )
    return enum_cls[short]


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The model state dict in `obj`: a plain state dict, or an ltdet checkpoint dict's
    `"model"` entry; a DistributedDataParallel `module.` prefix on every key is removed."""
    if isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    state = dict(obj)
    if state and all(k.startswith(_DDP_PREFIX) for k in state):
        state = {k[len(_DDP_PREFIX) :]: v for k, v in state.items()}
    return state


def load_checkpoint_state_dict(path: str, field: str = "model.weights") -> dict[str, Tensor]:
    """The model state_dict stored at `path`: a plain state_dict or an ltdet checkpoint dict with
    a "model" key; a DistributedDataParallel "module." prefix is removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{field}: checkpoint {path!r} does not exist; give a "
            f"torchvision weights name or the path of a saved state_dict / "
            f"ltdet checkpoint"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as safe_error:
        # ltdet checkpoints also carry optimizer and RNG state (NumPy arrays), which the
        # weights-only unpickler refuses; they are the user's own files, so load them fully.
        logger.info(
            "%s: %s is not a weights-only file (%s); loading it fully", field, path, safe_error
        )
        obj = torch.load(path, map_location="cpu", weights_only=False)
    state = unwrap_state_dict(obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"{field}: {path!r} holds neither a state_dict nor a checkpoint dict with "
            f"a 'model' state_dict"
        )
    return state


def load_detector_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    reinit_predictor: bool = False,
    base_keys: Iterable[str] | None = None,
) -> None:
    """Load `state_dict` into `model`, strictly except for the class-specific predictor.

    Predictor entries (box predictor / RetinaNet `cls_logits`) whose shapes or names differ are
    left at their fresh initialisation (all of them when `reinit_predictor`), with a log line:
    other classes, or another classifier width - a torchvision `C + 1` state dict (or a checkpoint
    trained with any other loss) in a model trained with seesaw, whose `cls_score` has `C + 2`
    outputs (`loss.cls_channels`): its `cls_score` starts fresh, the rest loads.
    `base_keys`: the model's keys before ltdet installed its losses; keys outside it (LDS / FDS
    statistics) may be absent from or extra in the checkpoint. (Absent loss state, such as EQLv2's
    gradient sums, is never reported missing: the losses keep their fresh state themselves,
    `ltdet.losses.base.LossModule`; extra loss state of another loss is ignored here, and so is
    loss state of another shape - e.g. `cum_samples [C]` of `seesaw_softmax` in a `seesaw` model,
    `[C+1]`: the loss keeps its fresh state, logged.)
    Raises ValueError naming `source` when backbone / neck / head entries are missing, extra or
    of another shape (a checkpoint of another arch, backbone or norm)."""
    own = model.state_dict()
    base_keys = set(own) if base_keys is None else set(base_keys)
    state_dict = dict(state_dict)
    skipped, other_loss_state = [], []
    for key in list(state_dict):
        is_predictor = key.startswith(PREDICTOR_PREFIXES)
        mismatched = key in own and own[key].shape != state_dict[key].shape
        if is_predictor and (reinit_predictor or mismatched or key not in own):
            skipped.append(key)
            del state_dict[key]
        elif mismatched and key.startswith(LTDET_STATE_PREFIXES):
            other_loss_state.append(key)
            del state_dict[key]
        elif mismatched:
            raise ValueError(
                f"{source}: {key} has shape {list(state_dict[key].shape)} in the "
                f"checkpoint but {list(own[key].shape)} in the model; check "
                f"model.arch / model.backbone / model.norm"
            )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [
        k
        for k in missing
        if k in base_keys
        and not k.startswith(PREDICTOR_PREFIXES)
        and not k.endswith("num_batches_tracked")
    ]
    # Extra head entries the model lacks are the state of another loss (a checkpoint trained with
    # EQLv2 loaded into a model patched with CE): nothing of the network itself.
    unexpected = [k for k in unexpected if not k.startswith(("roi_heads.", "head."))]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit this model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected entries, e.g. missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); check model.arch / model.backbone / "
            f"model.norm"
        )
    if skipped:
        logger.info(
            "%s: predictor entries left at this model's fresh initialisation (other "
            "classes or classifier width): %s",
            source,
            ", ".join(skipped),
        )
    if other_loss_state:
        logger.info(
            "%s: loss state of another shape (another loss) not loaded, fresh here: %s",
            source,
            ", ".join(other_loss_state),
        )


def torchvision_state_dict(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
) -> OrderedDict[str, Tensor]:
    """A patched model's state dict that the unpatched torchvision model loads with `strict=True`.

    `model_or_state_dict`: a patched model (DataParallel / DistributedDataParallel unwrapped) or
    its state dict (e.g. `torch.load(ckpt)["model"]` of an ltdet checkpoint; a DDP `module.`
    prefix is recognised and kept). Drops ltdet's own entries (`LTDET_STATE_PREFIXES`: loss
    state such as EQLv2's gradient sums, Seesaw's counts, GHM's `density.acc_sum`, LDS / FDS
    statistics); every other entry is returned as is (same tensors, same order, torchvision's
    version metadata kept). A non-linear box classifier (`CosinePredictor`, `LWSPredictor`) has no
    torchvision equivalent: its entries are kept and a `FastRCNNPredictor` will not load them.

        plain = fasterrcnn_resnet50_fpn(weights=None, num_classes=C + 1)
        plain.load_state_dict(ltdet.torchvision_state_dict(patched_model))  # strict
    """
    source = model_or_state_dict
    if isinstance(source, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        source = source.module
    state = source.state_dict() if isinstance(source, nn.Module) else source
    kept = OrderedDict((key, value) for key, value in state.items() if not _is_ltdet_key(key))
    filter_state_dict_metadata(state, kept, lambda key: not _is_ltdet_key(key))
    return kept


def _is_ltdet_key(key: str) -> bool:
    if key.startswith(_DDP_PREFIX):
        key = key[len(_DDP_PREFIX) :]
    return key.startswith(LTDET_STATE_PREFIXES)
