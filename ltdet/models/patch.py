"""`ltdet.patch`: swap the losses and RoI sampler of an existing torchvision detector, in place.

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn_v2(weights=None, num_classes=C + 1)
    ltdet.patch(model, cls_loss={"type": "eqlv2"}, sampler={"type": "pisa"}, stats=stats)

Two-stage models (`FasterRCNN` and its subclasses `MaskRCNN`, `KeypointRCNN`, from any builder)
get an `LTRoIHeads` sharing all their submodules; `RetinaNet` models are handed to
`ltdet.models.retinanet.patch_retinanet`. Parameters and buffers of the model are not touched; the
only new state is the losses' own buffers (e.g. EQLv2's gradient statistics) under
`roi_heads.cls_loss.*` / `roi_heads.box_loss.*`. One exception: a loss that trains a classifier of
another width (`loss.cls_channels`; seesaw's `C + 2`: C classes and a 2-way objectness, the
authors' design) cannot use the model's `C + 1` box classifier, so `patch` re-creates only
`roi_heads.box_predictor.cls_score` with that many outputs, fresh (linear: weight N(0, 0.01^2),
bias 0, mmdetection's `fc_cls` init; cosine: fresh prototypes), and logs a warning; the regressor,
the box head and everything else keep their weights. An LWS classifier cannot be re-created
(TypeError). RetinaNet's dense head has no such classifier: a loss with `cls_channels != C + 1`
is refused there (ValueError).

Checkpoints across patched and unpatched models: that state is training state. A torchvision
state dict loads into a patched model with `strict=True` (absent loss state keeps its current
values - a new model's fresh ones - logged once per loss: `ltdet.losses.base.LossModule`);
`ltdet.models.weights.torchvision_state_dict(model)` is a patched model's state dict without
ltdet's additions, which the unpatched torchvision model loads with `strict=True`. With seesaw
the `cls_score` shapes differ (`C + 2` against torchvision's `C + 1`): `load_state_dict` raises
on them, and `ltdet.models.weights.load_detector_state_dict` loads everything else, leaving the
fresh `cls_score` (logged).
"""

import copy
from typing import Any, Mapping, Optional

from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet

from .init import init_sigmoid_classifier
from .retinanet import patch_retinanet
from .roi_heads import LTRoIHeads

__all__ = ["SUPPORTED_MODELS", "patch"]

SUPPORTED_MODELS = (
    "torchvision.models.detection.FasterRCNN (fasterrcnn_resnet50_fpn, _v2, "
    "fasterrcnn_mobilenet_v3_large_fpn, _320_fpn) and its subclasses MaskRCNN, "
    "KeypointRCNN; torchvision.models.detection.RetinaNet (retinanet_resnet50_fpn, _v2)"
)


def patch(
    model: nn.Module,
    cls_loss: Any = None,
    box_loss: Any = None,
    sampler: Any = None,
    stats: Any = None,
    *,
    lds: Optional[nn.Module] = None,
    fds: Optional[nn.Module] = None,
    cls_prior_prob: Optional[float] = None,
    dfl: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Installs ltdet losses (and, for two-stage models, a RoI sampler and LDS/FDS hooks) in
    `model`, in place, and returns it.

    cls_loss, box_loss: `build_loss` config dicts (`{"type": "eqlv2", "gamma": 12}`) or built loss
    modules; None = torchvision's loss (cross entropy / smooth L1), or the current one of an already
    patched model. sampler: `{"type": "random" | "ohem" | "pisa", ...}` or a built `RoISampler`
    (two-stage models only). stats: `ClassStats` for losses that need class frequencies; its class
    count must equal the model's C. lds / fds: built LDS / FDS modules (keyword-only extension, used
    by `build_detector`). dfl (keyword-only, RetinaNet only): GFL's distribution regression head,
    `{"reg_max": 16, "loss_weight": 0.25, "score_weighted": True}` (`patch_retinanet`).
    cls_prior_prob (keyword-only, default None = weights untouched): also re-initialise the box
    classifier for a sigmoid loss at this prior, e.g. 0.001
    (`ltdet.models.init.init_sigmoid_classifier`; a fresh classifier only, never trained weights).
    A classification loss whose `cls_channels` differs from the box classifier's width (seesaw:
    `C + 2`) gets a fresh `cls_score` of that width (module docstring; logged).

    Everything is validated before the first step: an unsupported model, inconsistent class counts
    or unknown loss / sampler options raise here."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            "patch the model before wrapping it in DataParallel / DistributedDataParallel "
            "(patch(model) then DistributedDataParallel(model))"
        )
    if isinstance(model, FasterRCNN):
        if dfl is not None and dfl.get("enabled", True):
            raise ValueError(
                "dfl (a distribution regression head, GFL) is a dense-head option; "
                "a two-stage RoI box head has none (use a RetinaNet model)"
            )
        if cls_prior_prob is not None:  # refuse a classifier it cannot set before changing any
            init_sigmoid_classifier(copy.deepcopy(model.roi_heads.box_predictor), cls_prior_prob)
        model.roi_heads = LTRoIHeads.from_roi_heads(
            model.roi_heads,
            cls_loss=cls_loss,
            box_loss=box_loss,
            sampler=sampler,
            lds=lds,
            fds=fds,
            stats=stats,
        )
        if cls_prior_prob is not None:  # after validation, on the final (loss-width) cls_score
            init_sigmoid_classifier(model, cls_prior_prob)
        return model
    if cls_prior_prob is not None:
        init_sigmoid_classifier(model, cls_prior_prob)  # RetinaNet: refused, nothing changed
    if isinstance(model, RetinaNet):
        extra = [
            name
            for name, value in (("sampler", sampler), ("lds", lds), ("fds", fds))
            if value is not None and not (name == "sampler" and _is_random(value))
        ]
        if extra:
            raise ValueError(
                f"{', '.join(extra)} apply to two-stage RoI heads only; RetinaNet "
                "learns from all anchors (drop them or use a FasterRCNN model)"
            )
        # the dense head's class convention (and its check against stats) is patch_retinanet's
        return patch_retinanet(model, cls_loss=cls_loss, box_loss=box_loss, stats=stats, dfl=dfl)
    raise TypeError(
        f"ltdet.patch does not support {type(model).__module__}.{type(model).__name__}; "
        f"supported: {SUPPORTED_MODELS}"
    )


def _is_random(sampler: Any) -> bool:
    return (
        isinstance(sampler, dict)
        and sampler.get("type", "random") == "random"
        and len(sampler) <= 1
    )
