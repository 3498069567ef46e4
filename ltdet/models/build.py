"""`build_detector(cfg, num_classes, stats=None)`: a torchvision detector from an ltdet config.

The detector is assembled from torchvision's own classes, exactly as torchvision's builders do
(`FasterRCNN`, `RetinaNet`, `AnchorGenerator`, `RPNHead`, `FastRCNNConvFCHead`,
`_resnet_fpn_extractor`, `_mobilenet_extractor`), so that a torchvision weights name such as
`"COCO_V1"` loads into it key for key. Three things are ltdet's:

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

Config keys read (`cfg["model"]`, schema in docs/internals.md): arch, backbone, norm, weights,
weights_backbone, trainable_backbone_layers, detections_per_img, score_thresh, nms_thresh,
rpn.*, roi_heads.*, cls_loss, box_loss, sampler, classifier, lds, fds, cls_prior_prob; and
`cfg["data"]` min_size / max_size (recorded on the transform only: it does not resize).
"""
import logging
import math
import os
import pickle
from typing import Dict, Optional, Tuple
from functools import partial

import torch
import torchvision
from torch import nn
from torchvision.models import (MobileNet_V3_Large_Weights, ResNet18_Weights, ResNet34_Weights,
                                ResNet50_Weights, ResNet101_Weights)
from torchvision.models.detection import (FasterRCNN, FasterRCNN_MobileNet_V3_Large_FPN_Weights,
                                          FasterRCNN_ResNet50_FPN_V2_Weights,
                                          FasterRCNN_ResNet50_FPN_Weights, RetinaNet,
                                          RetinaNet_ResNet50_FPN_V2_Weights,
                                          RetinaNet_ResNet50_FPN_Weights)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, RPNHead
from torchvision.models.detection.faster_rcnn import _default_anchorgen as _default_rpn_anchorgen
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.retinanet import _default_anchorgen as _default_retinanet_anchorgen
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

logger = logging.getLogger(__name__)

ARCHS = ("faster_rcnn", "faster_rcnn_v2", "retinanet", "retinanet_v2")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
NORMS = ("frozen_bn", "bn", "gn")

# Config key -> torchvision constructor keyword. Keys outside these maps are errors.
_RPN_KWARGS = {k: f"rpn_{k}" for k in (
    "pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train", "post_nms_top_n_test",
    "batch_size_per_image", "positive_fraction", "fg_iou_thresh", "bg_iou_thresh", "nms_thresh",
    "score_thresh")}
_ROI_KWARGS = {k: f"box_{k}" for k in (
    "batch_size_per_image", "positive_fraction", "fg_iou_thresh", "bg_iou_thresh")}

# Detection weights torchvision publishes, per (arch, backbone).
DETECTION_WEIGHTS = {
    ("faster_rcnn", "resnet50"): FasterRCNN_ResNet50_FPN_Weights,
    ("faster_rcnn_v2", "resnet50"): FasterRCNN_ResNet50_FPN_V2_Weights,
    ("faster_rcnn", "mobilenet_v3_large"): FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    ("retinanet", "resnet50"): RetinaNet_ResNet50_FPN_Weights,
    ("retinanet_v2", "resnet50"): RetinaNet_ResNet50_FPN_V2_Weights,
}
BACKBONE_WEIGHTS = {
    "resnet18": ResNet18_Weights, "resnet34": ResNet34_Weights, "resnet50": ResNet50_Weights,
    "resnet101": ResNet101_Weights, "mobilenet_v3_large": MobileNet_V3_Large_Weights,
}
# The two legacy COCO checkpoints were trained before pytorch/vision#2933 fixed FrozenBatchNorm2d's
# eps; torchvision's builders reset eps to 0 after loading them, and so do we.
_ZERO_EPS_WEIGHTS = (FasterRCNN_ResNet50_FPN_Weights.COCO_V1, RetinaNet_ResNet50_FPN_Weights.COCO_V1)

# State-dict prefixes of the class-specific predictor, re-initialised for `num_classes`.
_PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "head.classification_head.cls_logits.")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl", ".ckpt", ".bin")


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize.

    The ltdet data pipeline resizes images (and boxes) with OpenCV before batching, so resizing
    again here would be wasted work and, with torchvision's bilinear interpolation, a second
    slightly different image. Normalisation, padding to `size_divisible` and batching are
    torchvision's; `postprocess` maps boxes from the batched size back to the input size, which
    is the identity here.
    """

    def resize(self, image: torch.Tensor, target: Optional[Dict[str, torch.Tensor]] = None
               ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:  # scriptable
        return image, target


def _group_norm(num_channels):
    """GroupNorm with 32 groups (Wu & He, ECCV 2018) or the largest divisor of 32 that fits
    (MobileNetV3 has 16-, 24-, 40-channel layers)."""
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels)


_NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": _group_norm}


def _choice(value, valid, field):
    if value not in valid:
        raise ValueError(f"{field}={value!r} is not supported; valid values: {', '.join(valid)}")
    return value


def _is_path(value):
    return (os.path.exists(value) or os.sep in value or "/" in value
            or value.endswith(_CHECKPOINT_SUFFIXES))


def resolve_weights(name, enum_cls, field):
    """A torchvision weights enum member from `"COCO_V1"`, `"DEFAULT"` or the full
    `"FasterRCNN_ResNet50_FPN_Weights.COCO_V1"`; nothing is downloaded.

    Raises ValueError naming `field` and listing the valid names when `name` is not one of
    `enum_cls`'s members (e.g. a RetinaNet weights name given for a Faster R-CNN)."""
    valid = [f"{enum_cls.__name__}.{member}" for member in enum_cls.__members__]
    short = name
    if "." in name:
        prefix, _, short = name.rpartition(".")
        if prefix != enum_cls.__name__:
            raise ValueError(f"{field}={name!r} names weights of {prefix}, but this model takes "
                             f"{enum_cls.__name__}; valid values: {', '.join(valid)} "
                             f"(or the short member name, or a local checkpoint path)")
    if short not in enum_cls.__members__:
        raise ValueError(f"{field}={name!r} is not a torchvision weights name for this model; "
                         f"valid values: {', '.join(valid)} (or the short member name, or a "
                         f"local checkpoint path)")
    return enum_cls[short]


def load_checkpoint_state_dict(path, field="model.weights"):
    """The model state_dict stored at `path`: a plain state_dict or an ltdet checkpoint dict with
    a "model" key; a DistributedDataParallel "module." prefix is removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}: checkpoint {path!r} does not exist; give a torchvision "
                                f"weights name or the path of a saved state_dict / ltdet checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as safe_error:
        # ltdet checkpoints also carry optimizer and RNG state (NumPy arrays), which the
        # weights-only unpickler refuses; they are the user's own files, so load them fully.
        logger.info("%s: %s is not a weights-only file (%s); loading it fully", field, path,
                    safe_error)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{field}: {path!r} holds neither a state_dict nor a checkpoint dict with "
                         f"a 'model' state_dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_detector_state_dict(model, state_dict, source, reinit_predictor=False, base_keys=None):
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
    from ltdet.models.patch import LTDET_STATE_PREFIXES

    skipped, other_loss_state = [], []
    for key in list(state_dict):
        is_predictor = key.startswith(_PREDICTOR_PREFIXES)
        mismatched = key in own and own[key].shape != state_dict[key].shape
        if is_predictor and (reinit_predictor or mismatched or key not in own):
            skipped.append(key)
            del state_dict[key]
        elif mismatched and key.startswith(LTDET_STATE_PREFIXES):
            other_loss_state.append(key)
            del state_dict[key]
        elif mismatched:
            raise ValueError(f"{source}: {key} has shape {list(state_dict[key].shape)} in the "
                             f"checkpoint but {list(own[key].shape)} in the model; check "
                             f"model.arch / model.backbone / model.norm")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k in base_keys and not k.startswith(_PREDICTOR_PREFIXES)
               and not k.endswith("num_batches_tracked")]
    # Extra head entries the model lacks are the state of another loss (a checkpoint trained with
    # EQLv2 loaded into a model patched with CE): nothing of the network itself.
    unexpected = [k for k in unexpected if not k.startswith(("roi_heads.", "head."))]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected entries, e.g. missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); check model.arch / model.backbone / "
                         f"model.norm")
    if skipped:
        logger.info("%s: predictor entries left at this model's fresh initialisation (other "
                    "classes or classifier width): %s", source, ", ".join(skipped))
    if other_loss_state:
        logger.info("%s: loss state of another shape (another loss) not loaded, fresh here: %s",
                    source, ", ".join(other_loss_state))


def _build_backbone(arch, backbone, norm, weights_backbone, trainable_layers):
    """Backbone + FPN as torchvision's builders make them; returns (module, anchor_generator)."""
    norm_layer = _NORM_LAYERS[norm]
    backbone_enum = None
    backbone_path = None
    if weights_backbone is not None:
        if _is_path(weights_backbone):
            backbone_path = weights_backbone
        else:
            backbone_enum = resolve_weights(weights_backbone, BACKBONE_WEIGHTS[backbone],
                                            "model.weights_backbone")
    body = getattr(torchvision.models, backbone)(weights=backbone_enum, norm_layer=norm_layer)
    if backbone_path is not None:
        # The classification layer (`fc` / `classifier`) is not part of the detection backbone.
        classifier = ("fc.", "classifier.")
        state = {k: v for k, v in load_checkpoint_state_dict(
            backbone_path, "model.weights_backbone").items() if not k.startswith(classifier)}
        try:
            missing, unexpected = body.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"model.weights_backbone={backbone_path!r} is not a {backbone} "
                             f"state_dict: {e}") from e
        missing = [k for k in missing if not k.startswith(classifier)
                   and not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"model.weights_backbone={backbone_path!r} is not a {backbone} "
                             f"state_dict (missing {missing[:3]}, unexpected {unexpected[:3]})")

    dense = arch.startswith("retinanet")
    if backbone.startswith("resnet"):
        if not dense:
            # faster_rcnn_v2 puts BatchNorm in the FPN (torchvision's fasterrcnn_resnet50_fpn_v2).
            fpn_norm = nn.BatchNorm2d if arch == "faster_rcnn_v2" else None
            return _resnet_fpn_extractor(body, trainable_layers, norm_layer=fpn_norm), None
        # RetinaNet skips P2 (too many anchors) and adds P6/P7: from P5 in v1, from C5 in v2.
        p6_in = 256 if arch == "retinanet" else body.inplanes
        return _resnet_fpn_extractor(body, trainable_layers, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(p6_in, 256)), None
    if not dense:
        # torchvision's fasterrcnn_mobilenet_v3_large_fpn: the last two stages + max-pool level,
        # every anchor size on every level.
        anchor_sizes = ((32, 64, 128, 256, 512),) * 3
        anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        return _mobilenet_extractor(body, True, trainable_layers), anchors
    # RetinaNet on MobileNetV3: the stride 8, 16 and 32 stages + P6/P7 give the same P3-P7
    # strides as on ResNet, so torchvision's default RetinaNet anchors apply.
    return _mobilenet_extractor(body, True, trainable_layers, returned_layers=[2, 3, 5],
                                extra_blocks=LastLevelP6P7(256, 256)), None


def build_torchvision_detector(cfg, num_classes):
    """The plain torchvision detector of `cfg["model"]` with `num_classes + 1` outputs, a
    `NoResizeTransform`, and torchvision detection weights when `model.weights` names them.

    Losses, sampler, classifier and local checkpoints are `build_detector`'s business."""
    m = cfg.get("model", cfg)
    data = cfg.get("data", {})
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be the number of foreground classes (>= 1), got "
                         f"{num_classes!r}")
    arch = _choice(m.get("arch", "faster_rcnn"), ARCHS, "model.arch")
    backbone = _choice(m.get("backbone", "resnet50"), BACKBONES, "model.backbone")
    norm = _choice(m.get("norm", "frozen_bn"), NORMS, "model.norm")
    weights = m.get("weights")
    weights_backbone = m.get("weights_backbone")

    detection_enum = None
    if weights is not None and not _is_path(weights):
        if (arch, backbone) not in DETECTION_WEIGHTS:
            have = ", ".join(f"{a}+{b}" for a, b in DETECTION_WEIGHTS)
            raise ValueError(f"model.weights={weights!r}: torchvision publishes no detection "
                             f"weights for {arch} with {backbone} (it has: {have}); use "
                             f"model.weights_backbone or a local checkpoint path")
        detection_enum = resolve_weights(weights, DETECTION_WEIGHTS[(arch, backbone)],
                                         "model.weights")
        # As torchvision's builders: full detection weights supersede backbone weights.
        weights_backbone = None

    max_layers = 6 if backbone == "mobilenet_v3_large" else 5
    trainable = m.get("trainable_backbone_layers", 3)
    if weights is None and weights_backbone is None:
        # Freezing randomly initialised layers only removes capacity (torchvision does the same).
        trainable = max_layers
    elif trainable is None or not 0 <= trainable <= max_layers:
        raise ValueError(f"model.trainable_backbone_layers={trainable!r} must be in "
                         f"[0, {max_layers}] for {backbone}")

    if norm == "frozen_bn" and weights is None and weights_backbone is None:
        logger.warning("model.norm=frozen_bn without model.weights / model.weights_backbone: the "
                       "backbone's normalisation layers stay fixed at their initial identity; set "
                       "model.norm: bn or gn to train from scratch")
    body, anchor_generator = _build_backbone(arch, backbone, norm, weights_backbone, trainable)
    min_size = data.get("min_size", 800)
    max_size = data.get("max_size", 1333)
    if arch.startswith("faster_rcnn"):
        kwargs = {"box_detections_per_img": m.get("detections_per_img", 300),
                  "box_score_thresh": m.get("score_thresh", 1e-4),
                  "box_nms_thresh": m.get("nms_thresh", 0.5)}
        if backbone == "mobilenet_v3_large":
            kwargs["rpn_score_thresh"] = 0.05  # torchvision's MobileNet builder default
        for section, table in (("rpn", _RPN_KWARGS), ("roi_heads", _ROI_KWARGS)):
            for key, value in (m.get(section) or {}).items():
                if key not in table:
                    raise ValueError(f"model.{section}.{key} is not a setting; valid keys: "
                                     f"{', '.join(table)}")
                kwargs[table[key]] = value
        if arch == "faster_rcnn_v2":
            # torchvision's fasterrcnn_resnet50_fpn_v2 heads: two-conv RPN head and a
            # 4-conv + 1-fc box head with BatchNorm (Li et al., 2021, "Benchmarking Detection
            # Transfer Learning with Vision Transformers").
            if anchor_generator is None:
                anchor_generator = _default_rpn_anchorgen()
            kwargs["rpn_head"] = RPNHead(body.out_channels,
                                         anchor_generator.num_anchors_per_location()[0],
                                         conv_depth=2)
            kwargs["box_head"] = FastRCNNConvFCHead((body.out_channels, 7, 7), [256] * 4, [1024],
                                                    norm_layer=nn.BatchNorm2d)
        model = FasterRCNN(body, num_classes=num_classes + 1, min_size=min_size,
                           max_size=max_size, rpn_anchor_generator=anchor_generator, **kwargs)
    else:
        kwargs = {"detections_per_img": m.get("detections_per_img", 300),
                  "score_thresh": m.get("score_thresh", 1e-4),
                  "nms_thresh": m.get("nms_thresh", 0.5)}
        if arch == "retinanet_v2":
            # torchvision's retinanet_resnet50_fpn_v2: GroupNorm heads and a GIoU box loss
            # (the box loss is replaced by model.box_loss when build_detector patches it).
            anchor_generator = _default_retinanet_anchorgen()
            head = RetinaNetHead(body.out_channels, anchor_generator.num_anchors_per_location()[0],
                                 num_classes + 1, norm_layer=partial(nn.GroupNorm, 32))
            head.regression_head._loss_type = "giou"
            kwargs.update(head=head, anchor_generator=anchor_generator)
        model = RetinaNet(body, num_classes + 1, min_size=min_size, max_size=max_size, **kwargs)

    old = model.transform
    model.transform = NoResizeTransform(old.min_size, old.max_size, old.image_mean, old.image_std,
                                        size_divisible=old.size_divisible)
    if detection_enum is not None:
        state = detection_enum.get_state_dict(progress=False, check_hash=True)
        load_detector_state_dict(model, state, f"model.weights={weights!r}", reinit_predictor=True)
        if detection_enum in _ZERO_EPS_WEIGHTS and norm == "frozen_bn":
            overwrite_eps(model, 0.0)
    return model


def _install_classifier(model, cfg_classifier, num_classes, cls_channels=None):
    """The `model.classifier` box predictor, its `cls_score` with the loss's `cls_channels`
    outputs (None = C + 1; seesaw's C + 2: a linear one at mmdetection's `fc_cls` init)."""
    from ltdet.models.classifiers import _normal_linear, build_predictor

    linear = not cfg_classifier or cfg_classifier.get("type", "linear") == "linear"
    if not hasattr(model, "roi_heads"):
        if not linear:
            raise ValueError(f"model.classifier.type={cfg_classifier.get('type')!r} replaces the "
                             f"box predictor of a two-stage detector; RetinaNet has none (use "
                             f"model.classifier.type=linear)")
        return
    predictor = model.roi_heads.box_predictor
    in_features = predictor.cls_score.in_features
    if not linear:
        model.roi_heads.box_predictor = build_predictor(cfg_classifier, in_features, num_classes,
                                                        cls_channels)
    elif cls_channels is not None and cls_channels != predictor.cls_score.out_features:
        # only the classifier; the regressor (and the random stream before it) stay torchvision's
        predictor.cls_score = _normal_linear(in_features, cls_channels)
        logger.info("box classifier with %d outputs (the loss's cls_channels, C = %d): weight "
                    "N(0, 0.01^2), bias 0", cls_channels, num_classes)


def build_detector(cfg, num_classes, stats=None):
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
    from ltdet.models.init import init_classifier_for_loss, prior_prob_from_cfg
    from ltdet.models.patch import patch

    m = cfg.get("model", cfg)
    model = build_torchvision_detector(cfg, num_classes)
    cls_loss = m.get("cls_loss")
    cls_channels = None
    if isinstance(model, FasterRCNN):
        # The loss first: its cls_channels sizes the box classifier (seesaw: C + 2).
        from ltdet.losses import build_loss
        from ltdet.models.roi_heads import DEFAULT_CLS_LOSS

        if not isinstance(cls_loss, nn.Module):
            cls_loss = build_loss(cls_loss or DEFAULT_CLS_LOSS, num_classes=num_classes,
                                  stats=stats)
        cls_channels = cls_loss.get_cls_channels(num_classes)
    _install_classifier(model, m.get("classifier"), num_classes, cls_channels)
    base_keys = set(model.state_dict())
    sampler = m.get("sampler")
    if isinstance(model, RetinaNet):
        # A dense detector learns from all anchors: there is no RoI sampler to replace.
        if sampler and sampler.get("type", "random") != "random":
            raise ValueError(f"model.sampler.type={sampler.get('type')!r} samples RoIs of a "
                             f"two-stage detector; {m.get('arch')} has none (use random)")
        sampler = None
    hooks = {}
    if isinstance(model, FasterRCNN):
        # LDS re-weights and FDS smooths the RoI box regression over IoU bins that start at the
        # foreground threshold (METHODS.md, "At RoI level").
        from ltdet.imbalance import build_fds, build_lds

        fg_iou = model.roi_heads.proposal_matcher.high_threshold
        lds = build_lds(m.get("lds"), fg_iou_thresh=fg_iou)
        fds = build_fds(m.get("fds"), model.roi_heads.box_predictor.bbox_pred.in_features,
                        fg_iou_thresh=fg_iou)
        hooks = {k: v for k, v in (("lds", lds), ("fds", fds)) if v is not None}
    else:
        for key in ("lds", "fds"):
            if (m.get(key) or {}).get("enabled", False):
                raise ValueError(f"model.{key}.enabled: {key.upper()} acts on the RoI box head of a "
                                 f"two-stage detector; {m.get('arch')} has none (set enabled: false)")
    patch(model, cls_loss=cls_loss, box_loss=m.get("box_loss"), sampler=sampler,
          stats=stats, **hooks)
    # A sigmoid-trained classifier starts at the authors' prior (before a checkpoint overrides it).
    init_classifier_for_loss(model, prior_prob_from_cfg(m))
    weights = m.get("weights")
    if weights is not None and _is_path(weights):
        state = load_checkpoint_state_dict(weights, "model.weights")
        load_detector_state_dict(model, state, f"model.weights={weights!r}", base_keys=base_keys)
    return model
