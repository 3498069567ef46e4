"""`build_detector(cfg, num_classes, stats=None)`: a torchvision detector from an ltdet config.

The detector is assembled from torchvision's own classes, exactly as torchvision's builders do
(`ltdet.models.assembly.torchvision_detector`), so that a torchvision weights name such as
`"COCO_V1"` loads into it key for key (`ltdet.models.weights`). What is ltdet's:

* `NoResizeTransform` replaces `GeneralizedRCNNTransform`'s resize by the identity, because the
  ltdet data pipeline already resized the images with OpenCV (normalisation and batching stay
  torchvision's);
* a non-linear box classifier (`model.classifier`, e.g. cosine) replaces the box predictor;
* `ltdet.models.patch.patch` installs the configured losses, RoI sampler and (two-stage only)
  the LDS / FDS hooks of `model.lds` / `model.fds`;
* a box classifier trained with a sigmoid loss (`cls_loss.use_sigmoid`: EQL, EQLv2, federated,
  focal, GHM-C, sigmoid class-balanced) starts at the authors' prior `model.cls_prior_prob`
  (0.001; `ltdet.models.init`): weight N(0, 0.01), bias `-log((1 - p) / p)` in every column.
  Softmax losses keep torchvision's init, and so does RetinaNet (torchvision's prior 0.01).

Label convention (torchvision's): `num_classes` is the number of foreground classes `C`; every
detector is built with `C + 1` outputs, index 0 = background, labels in `[1, C]`. For RetinaNet
this means the dense head emits `C + 1` logits per anchor whose column `k` scores label `k`
(torchvision's own RetinaNet convention, COCO's 91), column 0 being the background column.

Config -> arguments: the keys of `cfg["model"]` (and `cfg["data"]` min_size / max_size,
recorded on the transform only: it does not resize) are the keyword arguments of
`torchvision_detector` and `install_ltdet_parts`. A config run has every key (the config loader
merges the schema); a hand-written dict may leave some out, and those take the functions'
defaults, the one place the Python API keeps them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any, Callable, Optional, cast

from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.roi_heads import RoIHeads

from ltdet.imbalance import build_fds, build_lds
from ltdet.losses import build_loss

from .assembly import (
    ARCHS,
    DETECTION_WEIGHTS,
    MASK_ARCHS,
    NoResizeTransform,
    has_masks,
    torchvision_detector,
)
from .classifiers import build_predictor, normal_linear
from .init import DEFAULT_PRIOR_PROB, init_classifier_for_loss, resolve_prior_prob
from .patch import patch
from .roi_heads import DEFAULT_CLS_LOSS
from .weights import (
    is_checkpoint_path,
    load_checkpoint_state_dict,
    load_detector_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS",
    "DETECTION_WEIGHTS",
    "MASK_ARCHS",
    "NoResizeTransform",
    "build_detector",
    "build_torchvision_detector",
    "has_masks",
    "install_ltdet_parts",
    "torchvision_detector",
]

# `cfg["data"]` keys that are `torchvision_detector` arguments (recorded on the transform).
_DATA_KEYS = ("min_size", "max_size")


def _arguments(section: Mapping[str, Any], fn: Callable) -> dict[str, Any]:
    """The keys of a config section that are keyword-only arguments of `fn` (config -> call)."""
    params = inspect.signature(fn).parameters
    return {
        name: section[name]
        for name, p in params.items()
        if p.kind is p.KEYWORD_ONLY and name in section
    }


def _sections(cfg: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(model section, the data keys the detector records) of a full config; a bare model
    section is accepted too."""
    data = cfg.get("data") or {}
    return cfg.get("model", cfg), {k: data[k] for k in _DATA_KEYS if k in data}


def build_torchvision_detector(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """`torchvision_detector` of `cfg["model"]` (and `cfg["data"]` min_size / max_size)."""
    model_cfg, data_cfg = _sections(cfg)
    return torchvision_detector(
        num_classes,
        **_arguments(model_cfg, torchvision_detector),
        **_arguments(data_cfg, torchvision_detector),
    )


def _install_classifier(
    model: nn.Module,
    classifier: Optional[Mapping[str, Any]],
    num_classes: int,
    cls_channels: Optional[int] = None,
) -> None:
    """The `model.classifier` box predictor, its `cls_score` with the loss's `cls_channels`
    outputs (None = C + 1; seesaw's C + 2: a linear one at mmdetection's `fc_cls` init)."""
    kind = (classifier or {}).get("type", "linear")
    if not hasattr(model, "roi_heads"):
        if kind != "linear":
            raise ValueError(
                f"model.classifier.type={kind!r} replaces the box predictor of a "
                f"two-stage detector; RetinaNet has none (use "
                f"model.classifier.type=linear)"
            )
        return
    roi_heads = cast(RoIHeads, model.roi_heads)  # nn.Module types it `Tensor | Module`
    predictor = roi_heads.box_predictor
    in_features = predictor.cls_score.in_features
    if kind != "linear":
        roi_heads.box_predictor = build_predictor(
            classifier, in_features, num_classes, cls_channels
        )
    elif cls_channels is not None and cls_channels != predictor.cls_score.out_features:
        # only the classifier; the regressor (and the random stream before it) stay torchvision's
        predictor.cls_score = normal_linear(in_features, cls_channels)
        logger.info(
            "box classifier with %d outputs (the loss's cls_channels, C = %d): weight "
            "N(0, 0.01^2), bias 0",
            cls_channels,
            num_classes,
        )


def install_ltdet_parts(
    model: nn.Module,
    num_classes: int,
    stats: Any = None,
    *,
    cls_loss: Any = None,
    box_loss: Any = None,
    sampler: Optional[Mapping[str, Any]] = None,
    classifier: Optional[Mapping[str, Any]] = None,
    lds: Optional[Mapping[str, Any]] = None,
    fds: Optional[Mapping[str, Any]] = None,
    dfl: Optional[Mapping[str, Any]] = None,
    cls_prior_prob: Optional[float] = DEFAULT_PRIOR_PROB,
    weights: Optional[str] = None,
) -> nn.Module:
    """Install ltdet's parts in a `torchvision_detector`, in place (the `model.*` keys of the
    same names): the box classifier, the losses and RoI sampler (`ltdet.patch`), the LDS / FDS
    hooks (two-stage), GFL's distribution regression head (`dfl`, RetinaNet), the sigmoid prior
    init, and a local checkpoint `weights` (loaded last, so the losses' state in it is restored
    too). Returns the model."""
    cls_channels = None
    if isinstance(model, FasterRCNN):
        # The loss first: its cls_channels sizes the box classifier (seesaw: C + 2).
        if not isinstance(cls_loss, nn.Module):
            cls_loss = build_loss(
                cls_loss or DEFAULT_CLS_LOSS, num_classes=num_classes, stats=stats
            )
        cls_channels = cls_loss.get_cls_channels(num_classes)
    _install_classifier(model, classifier, num_classes, cls_channels)
    base_keys = set(model.state_dict())
    hooks: dict[str, Any] = {}
    if (dfl or {}).get("enabled", False):
        if not isinstance(model, RetinaNet):
            raise ValueError(
                "model.dfl.enabled: the distribution regression head (GFL) is a "
                "dense-head option; a two-stage detector has none (set enabled: "
                "false or use a RetinaNet arch)"
            )
        hooks["dfl"] = dfl
    if isinstance(model, RetinaNet):
        # A dense detector learns from all anchors: there is no RoI sampler to replace.
        if sampler and sampler.get("type", "random") != "random":
            raise ValueError(
                f"model.sampler.type={sampler.get('type')!r} samples RoIs of a "
                f"two-stage detector; RetinaNet has none (use random)"
            )
        sampler = None
        for key, spec in (("lds", lds), ("fds", fds)):
            if (spec or {}).get("enabled", False):
                raise ValueError(
                    f"model.{key}.enabled: {key.upper()} acts on the RoI box head of a "
                    f"two-stage detector; RetinaNet has none (set enabled: false)"
                )
    else:
        # LDS re-weights and FDS smooths the RoI box regression over IoU bins that start at the
        # foreground threshold (METHODS.md, "At RoI level").
        roi_heads = cast(RoIHeads, model.roi_heads)  # nn.Module types it `Tensor | Module`
        fg_iou = roi_heads.proposal_matcher.high_threshold
        built = {
            "lds": build_lds(lds, fg_iou_thresh=fg_iou),
            "fds": build_fds(
                fds, roi_heads.box_predictor.bbox_pred.in_features, fg_iou_thresh=fg_iou
            ),
        }
        hooks = {k: v for k, v in built.items() if v is not None}
    patch(model, cls_loss=cls_loss, box_loss=box_loss, sampler=sampler, stats=stats, **hooks)
    # A sigmoid-trained classifier starts at the authors' prior (before a checkpoint overrides it).
    init_classifier_for_loss(model, resolve_prior_prob(cls_prior_prob))
    if weights is not None and is_checkpoint_path(weights):
        state = load_checkpoint_state_dict(weights, "model.weights")
        load_detector_state_dict(model, state, f"model.weights={weights!r}", base_keys=base_keys)
    return model


def build_detector(cfg: Mapping[str, Any], num_classes: int, stats: Any = None) -> nn.Module:
    """Build the detector of `cfg["model"]` for `num_classes` foreground classes.

    Args:
        cfg: the full config dict (`cfg["model"]`, `cfg["data"]`; schema in docs/internals.md).
        num_classes: foreground classes C; the detector has C + 1 outputs, 0 = background.
        stats: `ltdet.data.ClassStats` for losses that need class frequencies (EQL, CB, ...).

    Returns:
        a torchvision `FasterRCNN` / `RetinaNet` with a `NoResizeTransform`, the configured
        box classifier, losses and RoI sampler installed by `ltdet.patch`, a sigmoid-trained box
        classifier started at `model.cls_prior_prob` (`ltdet.models.init`), and `model.weights`
        loaded (a local checkpoint is loaded last, so the losses' state in it is restored too).
    """
    model_cfg, _ = _sections(cfg)
    model = build_torchvision_detector(cfg, num_classes)
    return install_ltdet_parts(
        model, num_classes, stats, **_arguments(model_cfg, install_ltdet_parts)
    )
