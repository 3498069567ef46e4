"""`torchvision_detector`: the plain torchvision detector of an arch, assembled from torchvision's
own classes exactly as torchvision's builders do (`FasterRCNN`, `MaskRCNN`, `RetinaNet`,
`AnchorGenerator`, `RPNHead`, `FastRCNNConvFCHead`, the backbones of `ltdet.models.backbones`), so
that a torchvision weights name such as `"COCO_V1"` loads into it key for key
(`ltdet.models.weights`), with a `NoResizeTransform` (the ltdet data pipeline already resized the
images with OpenCV; normalisation and batching stay torchvision's).

The config mapping (`build_torchvision_detector`) and ltdet's parts (`install_ltdet_parts`,
`build_detector`) are `ltdet.models.build`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    MaskRCNN,
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
    RetinaNet,
    RetinaNet_ResNet50_FPN_V2_Weights,
    RetinaNet_ResNet50_FPN_Weights,
)
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, RPNHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import (
    GeneralizedRCNNTransform,
    resize_boxes,
    resize_keypoints,
)

from ltdet.compat import (
    default_retinanet_anchorgen,
    default_rpn_anchorgen,
    overwrite_eps,
    set_retinanet_box_loss_type,
)
from ltdet.spec import check_choice, check_number

from .backbones import BACKBONES, NORMS, build_backbone, max_trainable_layers
from .weights import is_checkpoint_path, load_detector_state_dict, resolve_weights

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS",
    "DETECTION_WEIGHTS",
    "MASK_ARCHS",
    "NoResizeTransform",
    "has_masks",
    "torchvision_detector",
]

ARCHS = ("faster_rcnn", "faster_rcnn_v2", "mask_rcnn", "mask_rcnn_v2", "retinanet", "retinanet_v2")
#: the archs with a mask branch: their data sets load instance masks, their runs evaluate segm
MASK_ARCHS = ("mask_rcnn", "mask_rcnn_v2")
#: the archs whose box and mask heads are torchvision's v2 ones (Li et al., 2021)
_V2_TWO_STAGE = ("faster_rcnn_v2", "mask_rcnn_v2")

# Config key -> torchvision constructor keyword. Keys outside these maps are errors.
_RPN_KWARGS = {
    k: f"rpn_{k}"
    for k in (
        "pre_nms_top_n_train",
        "pre_nms_top_n_test",
        "post_nms_top_n_train",
        "post_nms_top_n_test",
        "batch_size_per_image",
        "positive_fraction",
        "fg_iou_thresh",
        "bg_iou_thresh",
        "nms_thresh",
        "score_thresh",
    )
}
_ROI_KWARGS = {
    k: f"box_{k}"
    for k in ("batch_size_per_image", "positive_fraction", "fg_iou_thresh", "bg_iou_thresh")
}

# Detection weights torchvision publishes, per (arch, backbone).
DETECTION_WEIGHTS = {
    ("faster_rcnn", "resnet50"): FasterRCNN_ResNet50_FPN_Weights,
    ("faster_rcnn_v2", "resnet50"): FasterRCNN_ResNet50_FPN_V2_Weights,
    ("faster_rcnn", "mobilenet_v3_large"): FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    ("mask_rcnn", "resnet50"): MaskRCNN_ResNet50_FPN_Weights,
    ("mask_rcnn_v2", "resnet50"): MaskRCNN_ResNet50_FPN_V2_Weights,
    ("retinanet", "resnet50"): RetinaNet_ResNet50_FPN_Weights,
    ("retinanet_v2", "resnet50"): RetinaNet_ResNet50_FPN_V2_Weights,
}
# The two legacy COCO checkpoints were trained before pytorch/vision#2933 fixed FrozenBatchNorm2d's
# eps; torchvision's builders reset eps to 0 after loading them, and so do we.
_ZERO_EPS_WEIGHTS = (
    FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
    MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
    RetinaNet_ResNet50_FPN_Weights.COCO_V1,
)


def has_masks(cfg_or_arch: Mapping[str, Any] | str) -> bool:
    """Whether a config (full or its `model` section) or an arch name has a mask branch."""
    if isinstance(cfg_or_arch, str):
        return cfg_or_arch in MASK_ARCHS
    model_cfg = cfg_or_arch.get("model", cfg_or_arch)
    return model_cfg.get("arch", "faster_rcnn") in MASK_ARCHS


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize.

    The ltdet data pipeline resizes images (and boxes) with OpenCV before batching, so resizing
    again here would be wasted work and, with torchvision's bilinear interpolation, a second
    slightly different image. Normalisation, padding to `size_divisible` and batching are
    torchvision's; `postprocess` maps boxes from the batched size back to the input size, which
    is the identity here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: False: `postprocess` leaves Mask R-CNN's masks as the head's [N, 1, 28, 28]
        #: probabilities, for a caller that pastes them itself - at the original image size
        #: (`ltdet.engine.validation`): pasting at the resized input and resizing afterwards
        #: would interpolate twice, and hold [N, H, W] floats of the resized image as well.
        self.paste_masks = True

    def resize(
        self, image: torch.Tensor, target: Optional[Dict[str, torch.Tensor]] = None
    ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:  # scriptable
        return image, target

    def postprocess(
        self,
        result: List[Dict[str, torch.Tensor]],
        image_shapes: List[Tuple[int, int]],
        original_image_sizes: List[Tuple[int, int]],
    ) -> List[Dict[str, torch.Tensor]]:
        """torchvision's postprocess (boxes and keypoints to the input size: the identity here;
        masks pasted into the image), masks left unpasted when `paste_masks` is False."""
        if self.training:
            return result
        for i, (pred, im_s, o_im_s) in enumerate(zip(result, image_shapes, original_image_sizes)):
            boxes = resize_boxes(pred["boxes"], im_s, o_im_s)
            result[i]["boxes"] = boxes
            if "masks" in pred and self.paste_masks:
                result[i]["masks"] = paste_masks_in_image(pred["masks"], boxes, o_im_s)
            if "keypoints" in pred:
                result[i]["keypoints"] = resize_keypoints(pred["keypoints"], im_s, o_im_s)
        return result


def torchvision_detector(
    num_classes: int,
    *,
    arch: str = "faster_rcnn",
    backbone: str = "resnet50",
    norm: str = "frozen_bn",
    weights: Optional[str] = None,
    weights_backbone: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = 3,
    detections_per_img: int = 300,
    score_thresh: float = 1e-4,
    nms_thresh: float = 0.5,
    rpn: Optional[Mapping[str, Any]] = None,
    roi_heads: Optional[Mapping[str, Any]] = None,
    mask_head: Optional[Mapping[str, Any]] = None,
    min_size: Any = 800,
    max_size: int = 1333,
) -> nn.Module:
    """The plain torchvision detector with `num_classes + 1` outputs, a `NoResizeTransform`, and
    torchvision detection weights when `weights` names them (the `model.*` keys of the same
    names; `rpn` / `roi_heads`: torchvision's `rpn_*` / `box_*` settings without the prefix;
    `mask_head`: Mask R-CNN's `layers` (conv widths, torchvision's [256] * 4) and `dilation`
    (1), ignored by the other archs).

    Losses, sampler, classifier and local checkpoints are `build_detector`'s business."""
    check_number("num_classes (the number of foreground classes)", num_classes, low=1, integer=True)
    check_choice("model.arch", arch, ARCHS)
    check_choice("model.backbone", backbone, BACKBONES)
    check_choice("model.norm", norm, NORMS)

    detection_enum = None
    if weights is not None and not is_checkpoint_path(weights):
        if (arch, backbone) not in DETECTION_WEIGHTS:
            have = ", ".join(f"{a}+{b}" for a, b in DETECTION_WEIGHTS)
            raise ValueError(
                f"model.weights={weights!r}: torchvision publishes no detection "
                f"weights for {arch} with {backbone} (it has: {have}); use "
                f"model.weights_backbone or a local checkpoint path"
            )
        detection_enum = resolve_weights(
            weights, DETECTION_WEIGHTS[(arch, backbone)], "model.weights"
        )
        # As torchvision's builders: full detection weights supersede backbone weights.
        weights_backbone = None

    max_layers = max_trainable_layers(backbone)
    trainable = trainable_backbone_layers
    if weights is None and weights_backbone is None:
        # Freezing randomly initialised layers only removes capacity (torchvision does the same).
        trainable = max_layers
    else:
        check_number(
            "model.trainable_backbone_layers", trainable, low=0, high=max_layers, integer=True
        )
        assert trainable is not None  # check_number refuses None

    if norm == "frozen_bn" and weights is None and weights_backbone is None:
        logger.warning(
            "model.norm=frozen_bn without model.weights / model.weights_backbone: the "
            "backbone's normalisation layers stay fixed at their initial identity; set "
            "model.norm: bn or gn to train from scratch"
        )
    body, anchor_generator = build_backbone(arch, backbone, norm, weights_backbone, trainable)
    if not arch.startswith("retinanet"):
        kwargs = {
            "box_detections_per_img": detections_per_img,
            "box_score_thresh": score_thresh,
            "box_nms_thresh": nms_thresh,
        }
        if backbone == "mobilenet_v3_large":
            kwargs["rpn_score_thresh"] = 0.05  # torchvision's MobileNet builder default
        for section, settings, table in (
            ("rpn", rpn, _RPN_KWARGS),
            ("roi_heads", roi_heads, _ROI_KWARGS),
        ):
            for key, value in (settings or {}).items():
                if key not in table:
                    raise ValueError(
                        f"model.{section}.{key} is not a setting; valid keys: {', '.join(table)}"
                    )
                kwargs[table[key]] = value
        if arch in _V2_TWO_STAGE:
            # torchvision's fasterrcnn_resnet50_fpn_v2 / maskrcnn_resnet50_fpn_v2 heads: two-conv
            # RPN head, a 4-conv + 1-fc box head and (Mask R-CNN) a 4-conv mask head, with
            # BatchNorm (Li et al., 2021, "Benchmarking Detection Transfer Learning with Vision
            # Transformers").
            if anchor_generator is None:
                anchor_generator = default_rpn_anchorgen()
            kwargs["rpn_head"] = RPNHead(
                body.out_channels, anchor_generator.num_anchors_per_location()[0], conv_depth=2
            )
            kwargs["box_head"] = FastRCNNConvFCHead(
                (body.out_channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d
            )
            if arch == "mask_rcnn_v2":
                kwargs["mask_head"] = MaskRCNNHeads(
                    body.out_channels, [256] * 4, 1, norm_layer=nn.BatchNorm2d
                )
        # MaskRCNN is torchvision's FasterRCNN plus its default mask branch (RoIAlign 14x14,
        # four 3x3 convs, a 2x deconv and a per-class 28x28 mask predictor), as its builders.
        detector = MaskRCNN if arch in MASK_ARCHS else FasterRCNN
        model = detector(
            body,
            num_classes=num_classes + 1,
            min_size=min_size,
            max_size=max_size,
            rpn_anchor_generator=anchor_generator,
            **kwargs,
        )
    else:
        kwargs = {
            "detections_per_img": detections_per_img,
            "score_thresh": score_thresh,
            "nms_thresh": nms_thresh,
        }
        if arch == "retinanet_v2":
            # torchvision's retinanet_resnet50_fpn_v2: GroupNorm heads and a GIoU box loss
            # (the box loss is replaced by model.box_loss when build_detector patches it).
            anchor_generator = default_retinanet_anchorgen()
            head = RetinaNetHead(
                body.out_channels,
                anchor_generator.num_anchors_per_location()[0],
                num_classes + 1,
                norm_layer=partial(nn.GroupNorm, 32),
            )
            set_retinanet_box_loss_type(head.regression_head, "giou")
            kwargs.update(head=head, anchor_generator=anchor_generator)
        model = RetinaNet(body, num_classes + 1, min_size=min_size, max_size=max_size, **kwargs)

    if arch in MASK_ARCHS:
        _set_mask_head(model, mask_head, num_classes, v2=arch == "mask_rcnn_v2")
    old = model.transform
    model.transform = NoResizeTransform(
        old.min_size, old.max_size, old.image_mean, old.image_std, size_divisible=old.size_divisible
    )
    if detection_enum is not None:
        state = detection_enum.get_state_dict(progress=False, check_hash=True)
        load_detector_state_dict(model, state, f"model.weights={weights!r}", reinit_predictor=True)
        if detection_enum in _ZERO_EPS_WEIGHTS and norm == "frozen_bn":
            overwrite_eps(model, 0.0)
    return model


_MASK_HEAD_DEFAULTS = {"layers": [256, 256, 256, 256], "dilation": 1}


def _set_mask_head(
    model: nn.Module, spec: Optional[Mapping[str, Any]], num_classes: int, v2: bool
) -> None:
    """A mask head of other conv widths than torchvision's (`model.mask_head.layers`) replaces
    the default one, with a `MaskRCNNPredictor` reading its last width (a lighter head for small
    CPU runs: the 256-wide head costs ~0.7 GFLOPs per detection at inference)."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(_MASK_HEAD_DEFAULTS))
    if unknown:
        raise ValueError(
            f"model.mask_head.{unknown[0]} is not a setting; valid keys: "
            f"{', '.join(_MASK_HEAD_DEFAULTS)}"
        )
    layers = list(spec.get("layers", _MASK_HEAD_DEFAULTS["layers"]))
    dilation = spec.get("dilation", _MASK_HEAD_DEFAULTS["dilation"])
    if not layers or not all(isinstance(v, int) and v > 0 for v in layers):
        raise ValueError(
            f"model.mask_head.layers must be a non-empty list of positive conv "
            f"widths, got {layers!r}"
        )
    check_number("model.mask_head.dilation", dilation, low=1, integer=True)
    if layers == _MASK_HEAD_DEFAULTS["layers"] and dilation == _MASK_HEAD_DEFAULTS["dilation"]:
        return  # torchvision's own head, as its builder made it
    # nn.Module types its submodules as `Tensor | Module`: name the torchvision classes here
    mask_rcnn = cast(MaskRCNN, model)
    in_channels = mask_rcnn.backbone.out_channels
    mask_rcnn.roi_heads.mask_head = MaskRCNNHeads(
        in_channels, layers, dilation, norm_layer=nn.BatchNorm2d if v2 else None
    )
    mask_rcnn.roi_heads.mask_predictor = MaskRCNNPredictor(layers[-1], layers[-1], num_classes + 1)
