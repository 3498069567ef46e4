"""build_detector (ltdet/models/build.py): every arch / backbone trains and infers, config
settings reach torchvision's modules, NoResizeTransform, weights names and local checkpoints.

Nothing is downloaded: weights names are resolved without loading, and the load path is run with
torchvision's `WeightsEnum.get_state_dict` replaced (in the test) by the state dict of a model
built by torchvision's own builder.
"""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    RetinaNet_ResNet50_FPN_Weights,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from ltdet.models.backbones import BACKBONES, NORMS
from ltdet.models.build import (
    ARCHS,
    MASK_ARCHS,
    NoResizeTransform,
    build_detector,
    build_torchvision_detector,
)
from ltdet.models.weights import resolve_weights

C = 3

# Small RPN / RoI budgets keep the two-stage models fast on CPU.
_SMALL = {
    "rpn": {
        "pre_nms_top_n_train": 200,
        "pre_nms_top_n_test": 100,
        "post_nms_top_n_train": 64,
        "post_nms_top_n_test": 32,
        "batch_size_per_image": 64,
    },
    "roi_heads": {"batch_size_per_image": 32},
}


def make_cfg(arch="faster_rcnn", backbone="resnet18", norm="bn", **model):
    losses = (
        {"cls_loss": {"type": "focal"}, "box_loss": {"type": "l1"}}
        if arch.startswith("retinanet")
        else {"cls_loss": {"type": "ce"}, "box_loss": {"type": "smooth_l1"}}
    )
    return {
        "model": {
            "arch": arch,
            "backbone": backbone,
            "norm": norm,
            "weights": None,
            "weights_backbone": None,
            "trainable_backbone_layers": 3,
            "detections_per_img": 300,
            "score_thresh": 1e-4,
            "nms_thresh": 0.5,
            **_SMALL,
            **losses,
            "sampler": {"type": "random"},
            "classifier": {"type": "linear"},
            **model,
        },
        "data": {"min_size": [96], "max_size": 128},
    }


def batch(masks=False):
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 112)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    if masks:  # Mask R-CNN: each box filled
        for image, t in zip(images, targets):
            t["masks"] = torch.zeros(len(t["boxes"]), *image.shape[1:], dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(t["masks"], t["boxes"].long().tolist()):
                m[y1:y2, x1:x2] = 1
    return images, targets


_FAST = [
    ("faster_rcnn", "resnet18"),
    ("faster_rcnn", "mobilenet_v3_large"),
    ("faster_rcnn_v2", "resnet18"),
    ("retinanet", "resnet18"),
    ("retinanet", "mobilenet_v3_large"),
    ("retinanet_v2", "resnet18"),
]
_SLOW = [(a, b) for a in ARCHS for b in BACKBONES if (a, b) not in _FAST]


def check_train_step_and_eval(arch, backbone):
    model = build_detector(make_cfg(arch, backbone), C)
    model.train()
    images, targets = batch(masks=arch in MASK_ARCHS)
    losses = model(images, targets)
    expected = (
        {"classification", "bbox_regression"}
        if arch.startswith("retinanet")
        else {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    )
    if arch in MASK_ARCHS:
        expected = expected | {"loss_mask"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # no pretrained weights: the whole backbone trains, down to the stem
    stem = next(p for n, p in model.backbone.body.named_parameters())
    assert stem.requires_grad and stem.grad is not None and stem.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    for det, image in zip(out, images):
        h, w = image.shape[-2:]
        assert det["boxes"].shape[0] <= 300 and det["boxes"].shape[0] == det["scores"].shape[0]
        assert torch.all(det["scores"] > 1e-4)
        if det["labels"].numel():
            assert det["labels"].min() >= 1 and det["labels"].max() <= C
            assert torch.all(det["boxes"][:, 2] <= w) and torch.all(det["boxes"][:, 3] <= h)
        if arch in MASK_ARCHS:
            assert det["masks"].shape == (det["boxes"].shape[0], 1, h, w)


@pytest.mark.parametrize("arch,backbone", _FAST)
def test_train_step_and_eval(arch, backbone):
    check_train_step_and_eval(arch, backbone)


@pytest.mark.slow
@pytest.mark.parametrize("arch,backbone", _SLOW)
def test_train_step_and_eval_large(arch, backbone):
    check_train_step_and_eval(arch, backbone)


def test_config_settings_reach_torchvision_modules():
    cfg = make_cfg(detections_per_img=5, score_thresh=0.3, nms_thresh=0.4)
    cfg["model"]["roi_heads"].update(positive_fraction=0.5, fg_iou_thresh=0.6, bg_iou_thresh=0.4)
    model = build_detector(cfg, C)
    rh, rpn = model.roi_heads, model.rpn
    assert (rh.detections_per_img, rh.score_thresh, rh.nms_thresh) == (5, 0.3, 0.4)
    assert rh.fg_bg_sampler.batch_size_per_image == 32
    assert rh.fg_bg_sampler.positive_fraction == 0.5
    assert (rh.proposal_matcher.high_threshold, rh.proposal_matcher.low_threshold) == (0.6, 0.4)
    assert rpn._pre_nms_top_n == {"training": 200, "testing": 100}
    assert rpn._post_nms_top_n == {"training": 64, "testing": 32}
    assert rpn.fg_bg_sampler.batch_size_per_image == 64
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])[0]
    assert out["scores"].numel() <= 5 and torch.all(out["scores"] > 0.3)

    retina = build_detector(
        make_cfg("retinanet", detections_per_img=7, score_thresh=0.002, nms_thresh=0.3), C
    )
    assert (retina.detections_per_img, retina.score_thresh, retina.nms_thresh) == (7, 0.002, 0.3)
    retina.eval()
    with torch.no_grad():
        out = retina([torch.rand(3, 96, 128)])[0]
    # the prior probability 0.01 is above the threshold everywhere: exactly 7 survive
    assert out["scores"].shape == (7,) and torch.all(out["scores"] > 0.002)


def test_defaults_are_lvis_settings():
    model = build_torchvision_detector(
        {"model": {"arch": "faster_rcnn", "backbone": "resnet18", "norm": "bn"}}, C
    )
    assert model.roi_heads.detections_per_img == 300 and model.roi_heads.score_thresh == 1e-4
    assert model.roi_heads.box_predictor.cls_score.out_features == C + 1
    retina = build_torchvision_detector(
        {"model": {"arch": "retinanet", "backbone": "resnet18", "norm": "bn"}}, C
    )
    assert retina.detections_per_img == 300 and retina.score_thresh == 1e-4
    assert retina.head.classification_head.num_classes == C + 1


@pytest.mark.parametrize("training", [True, False])
def test_no_resize_transform_leaves_sizes_and_boxes(training):
    model = build_detector(make_cfg(), C)
    transform = model.transform
    assert isinstance(transform, NoResizeTransform)
    transform.train(training)
    images, targets = batch()
    boxes = [t["boxes"].clone() for t in targets]
    image_list, out_targets = transform(images, [dict(t) for t in targets])
    assert image_list.image_sizes == [(96, 128), (80, 112)]
    for before, after in zip(boxes, out_targets):
        assert torch.equal(before, after["boxes"])
    # torchvision's normalisation and padding to a multiple of 32 are kept
    assert image_list.tensors.shape == (2, 3, 96, 128)
    mean = torch.tensor(transform.image_mean).view(3, 1, 1)
    std = torch.tensor(transform.image_std).view(3, 1, 1)
    torch.testing.assert_close(image_list.tensors[1, :, :80, :112], (images[1] - mean) / std)
    assert torch.all(image_list.tensors[1, :, 80:, :] == 0)
    # the stock transform would have resized to its min_size (96 -> 800 by default)
    stock = GeneralizedRCNNTransform(800, 1333, transform.image_mean, transform.image_std)
    stock.train(training)
    assert stock(images)[0].image_sizes[0] != (96, 128)


def test_bad_names_list_valid_options():
    for field, value, valid in (
        ("arch", "yolo", ARCHS),
        ("backbone", "vgg16", BACKBONES),
        ("norm", "syncbn", NORMS),
    ):
        with pytest.raises(ValueError) as err:
            build_torchvision_detector(make_cfg(**{field: value}), C)
        message = str(err.value)
        assert f"model.{field}: unknown value {value!r}" in message
        assert all(v in message for v in valid)
    with pytest.raises(
        ValueError, match="model.rpn.nms_tresh is not a setting; valid keys: .*nms_thresh"
    ):
        cfg = make_cfg()
        cfg["model"]["rpn"] = {"nms_tresh": 0.7}
        build_torchvision_detector(cfg, C)
    with pytest.raises(ValueError, match="no detection weights for faster_rcnn with resnet18"):
        build_torchvision_detector(make_cfg(weights="COCO_V1"), C)
    with pytest.raises(ValueError, match="ResNet18_Weights.IMAGENET1K_V1"):
        build_torchvision_detector(make_cfg(weights_backbone="IMAGENET_V9"), C)
    with pytest.raises(ValueError, match=r"trainable_backbone_layers must be in \[0, 5\], got 7"):
        build_torchvision_detector(
            make_cfg(weights_backbone="IMAGENET1K_V1", trainable_backbone_layers=7), C
        )
    with pytest.raises(ValueError, match="number of foreground classes"):
        build_torchvision_detector(make_cfg(), 0)


def test_weights_names_resolve_without_download():
    enum = FasterRCNN_ResNet50_FPN_Weights
    assert resolve_weights("COCO_V1", enum, "model.weights") is enum.COCO_V1
    assert resolve_weights("DEFAULT", enum, "model.weights") is enum.COCO_V1
    assert (
        resolve_weights("FasterRCNN_ResNet50_FPN_Weights.COCO_V1", enum, "model.weights")
        is enum.COCO_V1
    )
    assert (
        resolve_weights("IMAGENET1K_V1", ResNet18_Weights, "model.weights_backbone")
        is ResNet18_Weights.IMAGENET1K_V1
    )
    with pytest.raises(
        ValueError,
        match="names weights of RetinaNet_ResNet50_FPN_Weights.*"
        "FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    ):
        resolve_weights("RetinaNet_ResNet50_FPN_Weights.COCO_V1", enum, "model.weights")
    with pytest.raises(
        ValueError,
        match="model.weights='COCO_V2'.*valid values: FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
    ):
        resolve_weights("COCO_V2", enum, "model.weights")


def _fake_download(monkeypatch, state_dict):
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return {k: v.clone() for k, v in state_dict.items()}

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return calls


def _assert_loaded_except_predictor(model, source, predictor_prefix):
    own = model.state_dict()
    compared = 0
    for key, value in source.items():
        if key.startswith(predictor_prefix) or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(own[key], value), key
        compared += 1
    assert compared > 100


def test_weights_name_loads_torchvision_layout_and_reinitialises_predictor(monkeypatch):
    source_model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=91
    )
    with torch.no_grad():
        for p in source_model.parameters():
            p.add_(0.5)  # distinguishable from any fresh initialisation
    source = source_model.state_dict()
    calls = _fake_download(monkeypatch, source)
    model = build_detector(
        make_cfg("faster_rcnn", "mobilenet_v3_large", norm="frozen_bn", weights="COCO_V1"), C
    )
    assert calls == [FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1]
    _assert_loaded_except_predictor(model, source, "roi_heads.box_predictor.")
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.weight.shape == (C + 1, 1024)
    assert predictor.bbox_pred.weight.shape == (4 * (C + 1), 1024)
    # re-initialised, not a slice of the source predictor
    assert not torch.equal(
        predictor.cls_score.weight, source["roi_heads.box_predictor.cls_score.weight"][: C + 1]
    )
    # torchvision's MobileNet builder settings
    assert model.rpn.score_thresh == 0.05
    norms = [
        m
        for m in model.backbone.body.modules()
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))
    ]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,builder,enum,prefix",
    [
        (
            "faster_rcnn",
            "fasterrcnn_resnet50_fpn",
            FasterRCNN_ResNet50_FPN_Weights,
            "roi_heads.box_predictor.",
        ),
        ("faster_rcnn_v2", "fasterrcnn_resnet50_fpn_v2", None, "roi_heads.box_predictor."),
        (
            "retinanet",
            "retinanet_resnet50_fpn",
            RetinaNet_ResNet50_FPN_Weights,
            "head.classification_head.cls_logits.",
        ),
        ("retinanet_v2", "retinanet_resnet50_fpn_v2", None, "head.classification_head.cls_logits."),
    ],
)
def test_resnet50_weights_names_load_into_built_models(monkeypatch, arch, builder, enum, prefix):
    source = getattr(torchvision.models.detection, builder)(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    _fake_download(monkeypatch, source)
    model = build_detector(make_cfg(arch, "resnet50", norm="frozen_bn", weights="COCO_V1"), C)
    _assert_loaded_except_predictor(model, source, prefix)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    if enum is not None:  # the legacy COCO_V1 checkpoints: torchvision resets eps to 0
        assert frozen and all(m.eps == 0.0 for m in frozen)
    else:
        assert frozen and all(m.eps == 1e-5 for m in frozen)


def test_local_checkpoint_round_trip(tmp_path):
    cfg = make_cfg(cls_loss={"type": "eqlv2"})
    trained = build_detector(cfg, C)
    trained.train()
    images, targets = batch()
    sum(trained(images, targets).values()).backward()  # EQLv2 statistics move off their start
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.25)
    state = trained.state_dict()
    assert "roi_heads.cls_loss.pos_grad" in state
    assert state["roi_heads.cls_loss.pos_grad"].abs().sum() > 0

    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 3, "rng": np.random.get_state()}, ckpt)
    plain = tmp_path / "plain.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, plain)
    for path in (ckpt, plain):
        torch.manual_seed(123)
        loaded = build_detector({**cfg, "model": {**cfg["model"], "weights": str(path)}}, C)
        own = loaded.state_dict()
        assert own.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(own[key], value), key


def test_local_checkpoint_with_other_classes_reinitialises_predictor(tmp_path):
    other = build_detector(make_cfg(), 5)
    path = tmp_path / "five_classes.pth"
    torch.save({"model": other.state_dict()}, path)
    model = build_detector(make_cfg(weights=str(path)), C)
    _assert_loaded_except_predictor(model, other.state_dict(), "roi_heads.box_predictor.")
    assert model.roi_heads.box_predictor.cls_score.out_features == C + 1


def test_local_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights: checkpoint .*missing.pth"):
        build_detector(make_cfg(weights=str(tmp_path / "missing.pth")), C)
    mobilenet = build_torchvision_detector(make_cfg(backbone="mobilenet_v3_large"), C)
    path = tmp_path / "mobilenet.pth"
    torch.save(mobilenet.state_dict(), path)
    with pytest.raises(ValueError, match="check model.arch / model.backbone / model.norm"):
        build_detector(make_cfg(weights=str(path)), C)
    v2 = build_torchvision_detector(make_cfg("faster_rcnn_v2"), C)
    path = tmp_path / "v2.pth"
    torch.save({"model": v2.state_dict()}, path)
    with pytest.raises(
        ValueError,
        match=r"does not fit this model \(\d+ missing, \d+ "
        r"unexpected entries",
    ):
        build_detector(make_cfg("faster_rcnn", weights=str(path)), C)
    junk = tmp_path / "junk.pth"
    torch.save({"model": [1, 2, 3]}, junk)
    with pytest.raises(ValueError, match="neither a state_dict"):
        build_detector(make_cfg(weights=str(junk)), C)


def test_local_backbone_weights_and_trainable_layers(tmp_path):
    resnet = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_torchvision_detector(
        make_cfg(weights_backbone=str(path), trainable_backbone_layers=2), C
    )
    body = model.backbone.body
    for key, value in body.state_dict().items():
        assert torch.equal(value, resnet.state_dict()[key]), key
    assert not body.conv1.weight.requires_grad and not body.layer2[0].conv1.weight.requires_grad
    assert body.layer3[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="is not a resnet18 state_dict"):
        build_torchvision_detector(
            make_cfg(
                backbone="resnet18",
                weights_backbone=str(
                    _save(tmp_path / "r34.pth", torchvision.models.resnet34().state_dict())
                ),
            ),
            C,
        )


def _save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_norm_choice_reaches_the_backbone(backbone):
    kinds = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": nn.GroupNorm}
    for norm, kind in kinds.items():
        model = build_torchvision_detector(make_cfg(backbone=backbone, norm=norm), C)
        norms = [m for m in model.backbone.body.modules() if isinstance(m, tuple(kinds.values()))]
        assert norms and all(isinstance(m, kind) for m in norms), norm
        for m in norms:
            if isinstance(m, nn.GroupNorm):
                assert m.num_channels % m.num_groups == 0 and m.num_groups <= 32


def test_losses_are_installed_by_patch():
    from ltdet.models.retinanet import LTRetinaNet
    from ltdet.models.roi_heads import LTRoIHeads

    model = build_detector(make_cfg(cls_loss={"type": "focal"}), C)
    assert isinstance(model.roi_heads, LTRoIHeads)
    assert type(model.roi_heads.cls_loss).__name__ == "FocalLoss"
    retina = build_detector(make_cfg("retinanet", cls_loss={"type": "eqlv2"}), C)
    assert isinstance(retina, LTRetinaNet)
    assert type(retina.head.classification_head.loss).__name__ == "EQLv2Loss"
    with pytest.raises(ValueError, match="model.sampler.type='ohem'"):
        build_detector(make_cfg("retinanet", sampler={"type": "ohem"}), C)
    with pytest.raises(ValueError, match="model.lds.enabled"):
        build_detector(make_cfg("retinanet", lds={"enabled": True}), C)


def test_cosine_classifier_replaces_the_box_predictor():
    from ltdet.models.classifiers import CosinePredictor

    model = build_detector(make_cfg(classifier={"type": "cosine", "scale": 16.0}), C)
    assert isinstance(model.roi_heads.box_predictor, CosinePredictor)
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 4 * (C + 1)
    model.train()
    images, targets = batch()
    sum(model(images, targets).values()).backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="RetinaNet has none"):
        build_detector(make_cfg("retinanet", classifier={"type": "cosine"}), C)


def test_lds_and_fds_hooks_reach_the_roi_head():
    cfg = make_cfg(lds={"enabled": True, "bins": 10}, fds={"enabled": True, "bins": 10})
    cfg["model"]["roi_heads"]["fg_iou_thresh"] = 0.6
    cfg["model"]["roi_heads"]["bg_iou_thresh"] = 0.4
    model = build_detector(cfg, C)
    lds, fds = model.roi_heads.lds, model.roi_heads.fds
    assert type(lds).__name__ == "RoILDS" and type(fds).__name__ == "RoIFDS"
    assert lds.lo == 0.6 and lds.bins == 10  # IoU bins start at the foreground threshold
    assert build_detector(make_cfg(), C).roi_heads.lds is None
    model.train()
    images, targets = batch()
    total = sum(model(images, targets).values())
    assert torch.isfinite(total)
    total.backward()
