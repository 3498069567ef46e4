"""RetinaNet heads with ltdet losses (ltdet/models/retinanet.py).

References are computed independently: torchvision's own RetinaNet head losses (on the C
foreground columns with labels shifted to 0..C-1, which is what torchvision trains for a head of C
classes) and `torchvision.ops.sigmoid_focal_loss` per image.
"""

import pytest
import torch
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetRegressionHead,
)
from torchvision.ops import box_iou, sigmoid_focal_loss

from ltdet.losses import build_loss
from ltdet.models.build import build_torchvision_detector
from ltdet.models.retinanet import (
    LTRetinaNet,
    LTRetinaNetClassificationHead,
    LTRetinaNetRegressionHead,
    patch_retinanet,
)

C = 3  # foreground classes; the head has C + 1 columns


def tiny_retinanet(arch="retinanet", backbone="resnet18", **model):
    cfg = {
        "model": {
            "arch": arch,
            "backbone": backbone,
            "norm": "bn",
            "detections_per_img": 300,
            "score_thresh": 1e-4,
            **model,
        }
    }
    return build_torchvision_detector(cfg, C)


def images_and_targets():
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[30.0, 30.0, 50.0, 52.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def capture_head_inputs(model, images, targets):
    """Head outputs, anchors and matched indices of one training forward (torchvision's own
    matcher), captured with forward hooks."""
    seen = {}
    h1 = model.head.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    h2 = model.anchor_generator.register_forward_hook(
        lambda m, i, o: seen.__setitem__("anchors", o)
    )
    losses = model(images, [dict(t) for t in targets])
    h1.remove()
    h2.remove()
    matched = [
        model.proposal_matcher(box_iou(t["boxes"], a))
        if t["boxes"].numel()
        else torch.full((a.shape[0],), -1, dtype=torch.int64)
        for t, a in zip(targets, seen["anchors"])
    ]
    return losses, seen["out"], seen["anchors"], matched


def torchvision_reference(out, anchors, matched, targets, box_type="l1"):
    """torchvision's RetinaNet losses for a head of C classes (columns 1..C, labels - 1)."""
    shifted = [{"boxes": t["boxes"], "labels": t["labels"] - 1} for t in targets]
    cls_head = RetinaNetClassificationHead(8, 1, C)
    reg_head = RetinaNetRegressionHead(8, 1)
    reg_head._loss_type = box_type
    cls = cls_head.compute_loss(shifted, {"cls_logits": out["cls_logits"][..., 1:]}, matched)
    box = reg_head.compute_loss(
        shifted, {"bbox_regression": out["bbox_regression"]}, anchors, matched
    )
    return cls, box


def test_focal_and_l1_equal_torchvision_retinanet_loss():
    model = tiny_retinanet()
    patch_retinanet(model, cls_loss={"type": "focal"}, box_loss={"type": "l1"})
    model.train()
    images, targets = images_and_targets()
    losses, out, anchors, matched = capture_head_inputs(model, images, targets)
    # the two images have different foreground counts: per-image normalisation matters
    fg = [int((m >= 0).sum()) for m in matched]
    assert fg[0] != fg[1] and min(fg) > 0
    ref_cls, ref_box = torchvision_reference(out, anchors, matched, targets, "l1")
    torch.testing.assert_close(losses["classification"], ref_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses["bbox_regression"], ref_box, atol=1e-5, rtol=1e-5)


def test_focal_matches_independent_per_image_formula_and_gradient():
    """Synthetic logits: loss = mean_b sum_valid focal / max(1, fg_b); column 0 gets no gradient;
    ignored anchors (between thresholds) contribute nothing."""
    torch.manual_seed(3)
    head = LTRetinaNetClassificationHead.from_head(
        RetinaNetClassificationHead(8, 1, C + 1), loss=build_loss({"type": "focal"}, num_classes=C)
    )
    logits = torch.randn(2, 50, C + 1, requires_grad=True)
    matched = [torch.randint(-2, 2, (50,)), torch.full((50,), -1)]
    targets = [
        {"boxes": torch.zeros(2, 4), "labels": torch.tensor([2, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    expected = 0.0
    for b in range(2):
        valid = matched[b] != -2
        onehot = torch.zeros(50, C)
        fg = matched[b] >= 0
        if fg.any():
            onehot[fg, targets[b]["labels"][matched[b][fg]] - 1] = 1.0
        per = sigmoid_focal_loss(logits[b, valid, 1:], onehot[valid], reduction="sum")
        expected = expected + per / max(1, int(fg.sum()))
    expected = expected / 2
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert torch.all(logits.grad[..., 0] == 0)
    assert torch.all(logits.grad[0][matched[0] == -2] == 0)
    assert logits.grad[..., 1:].abs().sum() > 0


def test_smooth_l1_and_giou_equal_torchvision_box_losses():
    model = tiny_retinanet()
    images, targets = images_and_targets()
    for box_cfg, tv_type in (
        ({"type": "smooth_l1", "beta": 1.0}, "smooth_l1"),
        ({"type": "giou"}, "giou"),
    ):
        patch_retinanet(model, cls_loss={"type": "focal"}, box_loss=box_cfg)
        model.train()
        losses, out, anchors, matched = capture_head_inputs(model, images, targets)
        _, ref_box = torchvision_reference(out, anchors, matched, targets, tv_type)
        torch.testing.assert_close(losses["bbox_regression"], ref_box, atol=1e-5, rtol=1e-5)


def test_patch_keeps_weights_and_modules():
    model = tiny_retinanet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model.head.classification_head.conv
    patch_retinanet(model, cls_loss={"type": "eqlv2"}, box_loss={"type": "smooth_l1"})
    assert type(model) is LTRetinaNet
    assert isinstance(model.head.classification_head, LTRetinaNetClassificationHead)
    assert isinstance(model.head.regression_head, LTRetinaNetRegressionHead)
    assert model.head.classification_head.conv is conv
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # the loss state is part of the model's state (checkpoint / resume)
    extra = set(after) - set(before)
    assert {
        "head.classification_head.loss.pos_grad",
        "head.classification_head.loss.neg_grad",
    } <= extra


@pytest.mark.parametrize(
    "cls_cfg", [{"type": "eqlv2"}, {"type": "ghmc", "bins": 30, "momentum": 0.75}]
)
def test_eqlv2_and_ghmc_train_a_step(cls_cfg):
    model = tiny_retinanet()
    patch_retinanet(model, cls_loss=cls_cfg, box_loss={"type": "smooth_l1"})
    model.train()
    images, targets = images_and_targets()
    state_before = {
        k: v.clone() for k, v in model.head.classification_head.loss.state_dict().items()
    }
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = model.head.classification_head.cls_logits.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    state_after = model.head.classification_head.loss.state_dict()
    assert any(not torch.equal(state_before[k], state_after[k]) for k in state_before)


def test_ghmc_is_normalised_by_gradient_density_not_foreground_count():
    """GHM-C on the dense head is the paper's sum_i L_i / GD(g_i) over all valid elements of the
    batch (eq. 8), computed here from scratch with 10 bins and no momentum."""
    torch.manual_seed(5)
    head = LTRetinaNetClassificationHead.from_head(
        RetinaNetClassificationHead(8, 1, C + 1),
        loss=build_loss({"type": "ghmc", "bins": 10}, num_classes=C),
    )
    logits = torch.randn(2, 40, C + 1)
    matched = [torch.randint(-2, 2, (40,)), torch.randint(-2, 1, (40,))]
    targets = [
        {"boxes": torch.zeros(2, 4), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(1, 4), "labels": torch.tensor([2])},
    ]
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    z, y = [], []
    for b in range(2):
        valid = matched[b] != -2
        onehot = torch.zeros(40, C)
        fg = matched[b] >= 0
        onehot[fg, targets[b]["labels"][matched[b][fg]] - 1] = 1.0
        z.append(logits[b, valid, 1:])
        y.append(onehot[valid])
    z, y = torch.cat(z), torch.cat(y)
    g = (z.sigmoid() - y).abs()
    bins = torch.clamp((g * 10).floor().long(), max=9)
    counts = torch.bincount(bins.flatten(), minlength=10).float()
    n_nonempty = (counts > 0).sum()
    gd = counts[bins] * n_nonempty
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    expected = (bce / gd).sum()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls_cfg", [{"type": "eqlv2"}, {"type": "ce"}])
def test_postprocess_scores_with_the_loss_activation(cls_cfg):
    """Three far-apart anchors (no NMS interaction); detections must carry the activation's
    foreground scores, column j -> label j, and never the background column."""
    model = tiny_retinanet()
    patch_retinanet(model, cls_loss=cls_cfg)
    model.eval()
    loss = model.head.classification_head.loss
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5], [-3.0, 0.2, 0.8, -2.0], [0.0, -1.0, 3.0, 1.0]])
    anchors = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0], [80.0, 0.0, 95.0, 12.0]]
    )
    head_outputs = {"cls_logits": [logits[None]], "bbox_regression": [torch.zeros(1, 3, 4)]}
    det = model.postprocess_detections(head_outputs, [[anchors]], [(96, 128)])[0]
    if cls_cfg["type"] == "eqlv2":
        expected = torch.sigmoid(logits[:, 1:]) * (1 - torch.sigmoid(logits[:, :1]))
    else:
        expected = torch.softmax(logits, dim=1)[:, 1:]
    # the hand-written scores are the patched loss's own activation (foreground columns)
    torch.testing.assert_close(loss.activation(logits)[:, 1:], expected, atol=1e-6, rtol=1e-6)
    values, order = expected.flatten().sort(descending=True)
    torch.testing.assert_close(det["scores"], values, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(det["labels"], order % C + 1)
    torch.testing.assert_close(det["boxes"], anchors[order // C])
    # the same logits through torchvision's sigmoid would rank differently for EQLv2
    assert not torch.allclose(
        det["scores"], torch.sigmoid(logits[:, 1:]).flatten().sort(descending=True).values
    )


def test_eval_forward_respects_detection_settings():
    model = tiny_retinanet(detections_per_img=7, score_thresh=0.005)
    patch_retinanet(model, cls_loss={"type": "eqlv2"})
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])
    assert out[0]["boxes"].shape == (7, 4)
    assert torch.all(out[0]["scores"] > 0.005)
    assert out[0]["labels"].min() >= 1 and out[0]["labels"].max() <= C
    assert torch.all(out[0]["boxes"][:, 2] <= 128) and torch.all(out[0]["boxes"][:, 3] <= 96)


def test_images_without_boxes_train():
    model = tiny_retinanet()
    patch_retinanet(model, cls_loss={"type": "focal"}, box_loss={"type": "smooth_l1"})
    model.train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses, out, _, _ = capture_head_inputs(model, images, empty)
    assert losses["bbox_regression"].item() == 0.0
    # no foreground: every anchor is a negative, normaliser 1 per image, mean over images
    expected = (
        sigmoid_focal_loss(
            out["cls_logits"][..., 1:],
            torch.zeros_like(out["cls_logits"][..., 1:]),
            reduction="sum",
        )
        / 2
    )
    torch.testing.assert_close(losses["classification"], expected, atol=1e-5, rtol=1e-5)
    sum(losses.values()).backward()
    assert model.head.classification_head.cls_logits.weight.grad.abs().sum() > 0


def test_bad_inputs_raise():
    model = tiny_retinanet()
    patch_retinanet(model, cls_loss={"type": "focal"})
    model.train()
    images, targets = images_and_targets()
    targets[1]["labels"] = torch.tensor([C + 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[1, 3\]"):
        model(images, targets)
    targets[1]["labels"] = torch.tensor([0])
    with pytest.raises(ValueError, match="column 0 = background"):
        model(images, targets)
    with pytest.raises(TypeError, match="needs a torchvision RetinaNet"):
        patch_retinanet(torch.nn.Linear(2, 2), cls_loss={"type": "focal"})
    with pytest.raises(TypeError, match="not a regression loss"):
        patch_retinanet(tiny_retinanet(), box_loss=build_loss({"type": "focal"}, num_classes=C))
    with pytest.raises(ValueError, match="num_classes"):
        # a loss built for 5 classes does not fit a head of 3 + 1 columns
        patch_retinanet(tiny_retinanet(), cls_loss=build_loss({"type": "focal"}, num_classes=5))
