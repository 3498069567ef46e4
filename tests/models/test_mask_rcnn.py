"""Mask R-CNN (`model.arch: mask_rcnn`, `mask_rcnn_v2`) with every ltdet seam: losses, RoI
samplers, LDS / FDS, `ltdet.patch`, stage 2 with the mask branch frozen or trained, TorchScript,
and the inference path that pastes masks at the original image size."""

import copy

import pytest
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

import ltdet
from ltdet.engine.outputs import unpasted_masks
from ltdet.engine.refine import prepare_stage2, refine_options, stage2_loss_keys
from ltdet.losses import LOSSES
from ltdet.losses.base import ClassificationLoss, RegressionLoss
from ltdet.models import ROI_SAMPLERS, build_detector
from ltdet.models.build import MASK_ARCHS, has_masks
from ltdet.models.roi_heads import LTRoIHeads

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

C = 5
SIZE = 64
CLASSIFICATION = sorted(n for n, cls in LOSSES.items() if issubclass(cls, ClassificationLoss))
# dfl regresses side distributions of GFL's dense head (RetinaNet only), not RoI box deltas
REGRESSION = sorted(
    n for n, cls in LOSSES.items() if issubclass(cls, RegressionLoss) and n != "dfl"
)
ALL_LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def _cfg(arch="mask_rcnn", **model):
    return {
        "model": {
            "arch": arch,
            "backbone": "resnet18",
            "norm": "bn",
            "detections_per_img": 20,
            "rpn": {
                "pre_nms_top_n_train": 100,
                "post_nms_top_n_train": 50,
                "pre_nms_top_n_test": 50,
                "post_nms_top_n_test": 20,
            },
            "roi_heads": {"batch_size_per_image": 16},
            "mask_head": {"layers": [16, 16]},
            **model,
        },
        "data": {"min_size": [SIZE], "max_size": SIZE},
    }


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    model = build_detector(_cfg(), C)
    model.backbone.requires_grad_(False)  # the tests are about the heads: cheap backward
    return model


def _batch(empty=False):
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE - 8)]
    boxes = [
        torch.tensor([[4.0, 6.0, 36.0, 44.0], [24.0, 20.0, 60.0, 54.0]]),
        torch.tensor([[10.0, 10.0, 40.0, 40.0]]),
    ]
    labels = [torch.tensor([1, 3]), torch.tensor([5])]
    if empty:
        boxes[1], labels[1] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    targets = []
    for image, b, lab in zip(images, boxes, labels):
        m = torch.zeros(len(b), *image.shape[1:], dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            m[i, y1:y2, x1 : (x1 + x2) // 2] = 1  # the left half of the box
        targets.append({"boxes": b, "labels": lab, "masks": m})
    return images, targets


def _train_step(model, empty=False):
    model.train()
    losses = model(*_batch(empty))
    assert set(losses) >= ALL_LOSSES
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    grad = model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    return losses


def test_archs_build_torchvisions_mask_rcnn():
    for arch in MASK_ARCHS:
        model = build_detector(_cfg(arch, mask_head={"layers": [256, 256, 256, 256]}), C)
        assert isinstance(model, MaskRCNN) and isinstance(model.roi_heads, LTRoIHeads)
        assert model.roi_heads.has_mask() and has_masks(arch)
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == C + 1
        head_norm = [
            type(m)
            for m in model.roi_heads.mask_head.modules()
            if isinstance(m, torch.nn.BatchNorm2d)
        ]
        assert bool(head_norm) == (arch == "mask_rcnn_v2")  # torchvision's v2 mask head
    assert not has_masks({"model": {"arch": "faster_rcnn"}})
    light = build_detector(_cfg(), C).roi_heads
    assert [
        m.out_channels for m in light.mask_head.modules() if isinstance(m, torch.nn.Conv2d)
    ] == [16, 16]
    assert light.mask_predictor.conv5_mask.in_channels == 16
    with pytest.raises(ValueError, match="mask_head.width is not a setting"):
        build_detector(_cfg(mask_head={"width": 3}), C)
    with pytest.raises(ValueError, match="positive conv widths"):
        build_detector(_cfg(mask_head={"layers": []}), C)


@pytest.mark.parametrize("cls_loss", CLASSIFICATION)
def test_training_step_with_every_classification_loss(cls_loss, base_model, make_stats):
    model = copy.deepcopy(base_model)
    ltdet.patch(
        model,
        cls_loss={"type": cls_loss},
        stats=make_stats(image_count=(400.0, 90.0, 30.0, 8.0, 2.0)),
    )
    assert type(model.roi_heads.cls_loss) is LOSSES[cls_loss]  # the patched loss is the one used
    losses = _train_step(model)
    assert losses["loss_classifier"] > 0
    cls_grad = model.roi_heads.box_predictor.cls_score.weight.grad
    assert cls_grad is not None and cls_grad.abs().sum() > 0  # the classifier learns from it


@pytest.mark.parametrize("box_loss", REGRESSION)
def test_training_step_with_every_box_loss(box_loss, base_model):
    model = copy.deepcopy(base_model)
    ltdet.patch(model, box_loss={"type": box_loss})
    assert type(model.roi_heads.box_loss) is LOSSES[box_loss]
    losses = _train_step(model)
    assert losses["loss_box_reg"] > 0
    box_grad = model.roi_heads.box_predictor.bbox_pred.weight.grad
    assert box_grad is not None and box_grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", sorted(ROI_SAMPLERS))
def test_training_step_with_every_roi_sampler(sampler, base_model):
    model = copy.deepcopy(base_model)
    ltdet.patch(model, sampler={"type": sampler})
    losses = _train_step(model)
    if sampler == "pisa":
        assert "loss_carl" in losses


def test_an_image_without_objects_trains(base_model):
    model = copy.deepcopy(base_model)
    losses = _train_step(model, empty=True)
    assert float(losses["loss_mask"]) > 0  # the other image's masks still train
    images, targets = _batch(empty=True)
    model.zero_grad()
    losses = model(images[1:], targets[1:])  # only the empty image: a zero mask loss
    assert float(losses["loss_mask"]) == 0
    sum(losses.values()).backward()


def test_lds_and_fds_with_the_mask_branch():
    model = build_detector(_cfg(lds={"enabled": True}, fds={"enabled": True}), C)
    assert model.roi_heads.lds is not None and model.roi_heads.fds is not None
    _train_step(model)


def test_patch_on_a_torchvision_mask_rcnn_keeps_its_mask_branch(make_stats):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=C + 1,
        min_size=SIZE,
        max_size=SIZE,
        rpn_post_nms_top_n_train=30,
        box_batch_size_per_image=16,
        box_detections_per_img=5,
    )
    model.backbone.requires_grad_(False)
    mask_head = model.roi_heads.mask_head
    ltdet.patch(
        model,
        cls_loss={"type": "eqlv2"},
        sampler={"type": "ohem"},
        stats=make_stats(image_count=(400.0, 90.0, 30.0, 8.0, 2.0)),
    )
    assert model.roi_heads.mask_head is mask_head
    _train_step(model)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, SIZE, SIZE)])[0]
    assert out["masks"].shape[1:] == (1, SIZE, SIZE)  # torchvision's own transform pastes


def test_inference_pastes_or_leaves_masks_for_the_caller(base_model):
    model = copy.deepcopy(base_model).eval()
    image = torch.rand(3, SIZE, SIZE - 8)
    with torch.no_grad():
        pasted = model([image])[0]
        with unpasted_masks(model) as unpasted:
            raw = model([image])[0]
    assert unpasted and model.transform.paste_masks
    n = len(pasted["boxes"])
    assert pasted["masks"].shape == (n, 1, SIZE, SIZE - 8)
    assert raw["masks"].shape == (n, 1, 28, 28)
    assert torch.equal(raw["boxes"], pasted["boxes"])


def test_scripted_mask_rcnn_detects_as_eager(base_model):
    model = copy.deepcopy(base_model).eval()
    scripted = torch.jit.script(model)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE - 16, SIZE)]
    with torch.no_grad():
        eager = model(images)
        _, script_out = scripted(images)
    for a, b in zip(eager, script_out):
        assert set(a) == set(b) == {"boxes", "labels", "scores", "masks"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)
    scripted.transform.paste_masks = False
    with torch.no_grad():
        _, raw = scripted(images)
    assert raw[0]["masks"].shape[-2:] == (28, 28)


@pytest.mark.parametrize("train_mask", [False, True])
def test_stage2_freezes_or_trains_the_mask_branch(train_mask, base_model):
    stage1 = copy.deepcopy(base_model).state_dict()
    cfg = {**_cfg("mask_rcnn_v2"), "refine": {"head": "crt", "mask": train_mask}}
    model = build_detector(cfg, C)
    v2_stage1 = model.state_dict()
    setup = prepare_stage2(model, cfg, v2_stage1)
    names = {
        n
        for g in setup.param_groups
        for p in g["params"]
        for n, q in model.named_parameters()
        if q is p
    }
    mask_params = {n for n, _ in model.named_parameters() if ".mask_" in n}
    assert (mask_params <= names) == train_mask and bool(mask_params & names) == train_mask
    assert ("loss_mask" in setup.loss_keys) == train_mask
    assert stage2_loss_keys(cfg) == setup.loss_keys
    # the v2 mask head's BatchNorm stays locked at its stage-1 statistics either way
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.roi_heads.mask_head.modules())
    losses = model(*_batch())
    loss = sum(v for k, v in losses.items() if k in setup.loss_keys)
    loss.backward()
    grad = model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad
    assert (grad is not None) == train_mask
    assert stage1  # the v1 fixture's weights are another arch's: not loadable here


def test_refine_mask_needs_a_mask_branch_and_a_trained_head():
    with pytest.raises(ValueError, match="tau_norm trains nothing"):
        refine_options({"refine": {"head": "tau_norm", "mask": True}})
    faster = build_detector({**_cfg("faster_rcnn"), "refine": {"mask": True}}, C)
    with pytest.raises(ValueError, match="has none"):
        prepare_stage2(faster, {"refine": {"mask": True}}, faster.state_dict())


def test_other_classes_reinitialise_the_mask_logits(tmp_path):
    from ltdet.models.weights import load_detector_state_dict

    other = build_detector(_cfg(), C + 2).state_dict()
    model = build_detector(_cfg(), C)
    load_detector_state_dict(model, other, "a checkpoint of 7 classes")
    key = "roi_heads.mask_predictor.conv5_mask.weight"
    assert torch.equal(model.state_dict()[key], other[key])
