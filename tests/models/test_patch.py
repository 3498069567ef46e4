"""ltdet.patch on models from torchvision's own builders (weights=None, tiny images)."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models.detection import keypointrcnn_resnet50_fpn, retinanet_resnet50_fpn

import ltdet
from ltdet.data import ClassStats
from ltdet.losses import build_loss
from ltdet.models.roi_heads import LTRoIHeads


def _capture_box_head(model):
    """Records (proposals per image, class_logits) of the next RoI-head call."""
    record = {}
    model.roi_heads.register_forward_pre_hook(
        lambda m, args: record.__setitem__("sizes", [p.shape[0] for p in args[1]])
    )
    model.roi_heads.box_predictor.register_forward_hook(
        lambda m, args, out: record.__setitem__("logits", out[0].detach())
    )
    return record


def test_patched_builder_trains_and_scores_with_the_activation(
    builder_name, detection_batch, tiny_detector, tiny_image_size
):
    """Runs once per builder `tiny_detector` knows (`builder_name`: tests/conftest.py)."""
    masks = builder_name.startswith("mask")
    model = tiny_detector(builder_name)
    ltdet.patch(model, cls_loss={"type": "focal"}, sampler={"type": "random"})
    assert isinstance(model.roi_heads, LTRoIHeads)
    images, targets = detection_batch(masks=masks)  # the second image has no boxes
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if masks else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    if masks:
        assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0

    model.eval()
    model.roi_heads.score_thresh = 0.0
    record = _capture_box_head(model)
    with torch.no_grad():
        out = model(images)
    for i, det in enumerate(out):
        rows = slice(sum(record["sizes"][:i]), sum(record["sizes"][: i + 1]))
        fg = record["logits"][rows, 1:].sigmoid()  # focal's activation, recomputed here
        assert det["scores"].numel() > 0
        # the best detection is the best (RoI, class) score: greedy NMS always keeps it
        assert torch.allclose(det["scores"][0], fg.max())
        # every detection's score is the sigmoid of some RoI's logit for its label
        per_label = fg[:, det["labels"] - 1]  # [R, K]
        assert ((per_label - det["scores"][None]).abs() < 1e-6).any(0).all()
        if masks:
            assert det["masks"].shape == (
                det["scores"].numel(),
                1,
                tiny_image_size,
                tiny_image_size,
            )


@pytest.mark.parametrize(
    "name",
    [
        "fasterrcnn_mobilenet_v3_large_fpn",
        pytest.param("maskrcnn_resnet50_fpn", marks=pytest.mark.slow),
    ],
)
def test_default_patch_reproduces_torchvision(name, detection_batch, tiny_detector):
    vanilla = tiny_detector(name)
    patched = ltdet.patch(copy.deepcopy(vanilla))
    images, targets = detection_batch(masks=name.startswith("mask"), empty_second=False)
    ref, ours = {}, {}
    for model, out in ((vanilla, ref), (patched, ours)):
        torch.manual_seed(11)
        out.update(model(images, targets))
        sum(out.values()).backward()
    assert ref.keys() == ours.keys()
    for k in ref:
        assert torch.allclose(ref[k], ours[k], rtol=1e-5, atol=1e-6), k
    for (n, a), b in zip(vanilla.named_parameters(), patched.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n
    vanilla.eval()
    patched.eval()
    with torch.no_grad():
        for a, b in zip(vanilla(images), patched(images)):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def test_patch_leaves_weights_bit_identical(tiny_detector):
    model = tiny_detector("fasterrcnn_mobilenet_v3_large_fpn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert ltdet.patch(model, cls_loss={"type": "eqlv2"}, sampler={"type": "pisa"}) is model
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    new = set(after) - set(before)
    assert new and all(k.startswith(("roi_heads.cls_loss.", "roi_heads.box_loss.")) for k in new)
    assert [id(p) for p in model.parameters()] == params  # an optimizer built before still works


def test_patch_accepts_built_modules_and_stats(tiny_detector, tiny_num_classes):
    model = tiny_detector("fasterrcnn_mobilenet_v3_large_fpn")
    stats = ClassStats(
        image_count=torch.arange(1.0, tiny_num_classes + 1),
        instance_count=torch.arange(2.0, tiny_num_classes + 2),
        num_images=20,
    )
    cls_loss = build_loss({"type": "focal"}, num_classes=tiny_num_classes)
    ltdet.patch(model, cls_loss=cls_loss, box_loss={"type": "l1"}, stats=stats)
    assert model.roi_heads.cls_loss is cls_loss
    # patching again keeps what is not given
    ltdet.patch(model, sampler={"type": "ohem"})
    assert (
        model.roi_heads.cls_loss is cls_loss and type(model.roi_heads.box_loss).__name__ == "L1Loss"
    )
    assert type(model.roi_heads.sampler).__name__ == "OHEMRoISampler"


def test_patch_validates_before_the_first_step(tiny_detector):
    model = tiny_detector("fasterrcnn_mobilenet_v3_large_fpn")
    with pytest.raises(TypeError, match="supported: .*FasterRCNN.*RetinaNet"):
        ltdet.patch(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="num_classes=7"):
        ltdet.patch(model, cls_loss=build_loss({"type": "ce"}, num_classes=7))
    wrong = ClassStats(image_count=torch.ones(9), instance_count=torch.ones(9), num_images=3)
    with pytest.raises(ValueError, match="the class statistics have 9 classes"):
        ltdet.patch(model, cls_loss={"type": "ce"}, stats=wrong)
    with pytest.raises(ValueError, match="unknown loss type"):
        ltdet.patch(model, cls_loss={"type": "nope"})
    with pytest.raises(ValueError, match="valid values: .*'pisa'"):
        ltdet.patch(model, sampler={"type": "hardest"})
    assert not isinstance(model.roi_heads, LTRoIHeads)  # failed patches changed nothing


def test_patch_dispatches_retinanet(tiny_num_classes):
    model = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=tiny_num_classes + 1
    )
    with pytest.raises(ValueError, match="two-stage"):
        ltdet.patch(model, sampler={"type": "ohem"})
    assert ltdet.patch(model, cls_loss={"type": "focal"}) is model
    assert type(model.head.classification_head).__module__ == "ltdet.models.retinanet"


@pytest.mark.slow
def test_keypoint_rcnn_keeps_its_branch(tiny_image_size):
    model = keypointrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=2,
        min_size=tiny_image_size,
        max_size=tiny_image_size,
        rpn_post_nms_top_n_train=50,
        box_batch_size_per_image=16,
        box_detections_per_img=5,
    )
    model.backbone.requires_grad_(False)
    ltdet.patch(model, cls_loss={"type": "focal"}, sampler={"type": "pisa"})
    keypoints = torch.tensor([[[10.0, 10.0, 1.0]] * 17])
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4, 40, 50]]),
            "labels": torch.tensor([1]),
            "keypoints": keypoints,
        }
    ]
    losses = model([torch.rand(3, tiny_image_size, tiny_image_size)], targets)
    assert losses["loss_keypoint"] > 0
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        det = model([torch.rand(3, tiny_image_size, tiny_image_size)])[0]
    assert det["keypoints"].shape == (det["scores"].numel(), 17, 3)
