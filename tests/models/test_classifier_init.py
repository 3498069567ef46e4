"""A box classifier trained with a sigmoid loss starts at the authors' prior probability.

References (the authors' code, read for these tests; the reference below is written from it):

* tztztztztz/eqlv2, mmdet/models/roi_heads/bbox_heads/convfc_bbox_head.py,
  ConvFCBBoxHead.init_weights: when the loss has `use_sigmoid`, `normal_init(fc_cls, std=0.01,
  bias=bias_init_with_prob(0.001))`, i.e. weight N(0, 0.01) and bias -log((1 - p) / p) with
  p = 0.001 in every channel of fc_cls. For EQLv2 fc_cls has C + 1 channels
  (mmdet/models/losses/eqlv2.py, EQLv2.get_channel_num), the last one being the objectness
  (background) channel; for other sigmoid losses it has C channels (no background).
* tztztztztz/eql.detectron2, projects/EQL/eql/fast_rcnn.py, EQLFastRCNNOutputLayers.__init__:
  cls_score weight N(0, 0.01), bias -log((1 - prior_prob) / prior_prob), PRIOR_PROB 0.001
  (projects/EQL/configs/Base-EQL-RCNN-FPN.yaml).
* EQLv2 loss (mmdet/models/losses/eqlv2.py, EQLv2.forward / get_weight): BCE over all C + 1
  channels, target one-hot at the label (background = the last channel), element weight
  r_j y + q_j (1 - y) with q_j = 1 / (1 + exp(-gamma (g_j - mu))) over the classes and 1 for the
  objectness channel, r_j = 1 + alpha (1 - q_j); g_j starts at 100; sum / number of RoIs.
* Focal loss (Lin et al., ICCV 2017): -alpha_t (1 - p_t)^gamma log p_t per sigmoid element,
  over the C class channels (a background RoI is all-negative), divided by the number of RoIs
  (mmdetection's bbox head: avg_factor = number of RoIs with a label weight).
"""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn

import ltdet
from ltdet.data import ClassStats
from ltdet.engine.refine import prepare_stage2
from ltdet.losses import build_loss
from ltdet.losses.registry import LOSSES
from ltdet.models.build import build_detector, build_torchvision_detector
from ltdet.models.classifiers import CosinePredictor, ScaledClassifier

LVIS_C = 1203
PRIOR = 0.001
PRIOR_BIAS = -math.log((1 - PRIOR) / PRIOR)  # bias_init_with_prob(0.001) = -log(999)
PRED = "roi_heads.box_predictor."


def make_cfg(cls_loss, arch="faster_rcnn", backbone="resnet18", **model):
    return {
        "model": {
            "arch": arch,
            "backbone": backbone,
            "norm": "bn",
            "weights": None,
            "weights_backbone": None,
            "rpn": {
                "pre_nms_top_n_train": 2000,
                "post_nms_top_n_train": 1000,
                "batch_size_per_image": 256,
            },
            "roi_heads": {"batch_size_per_image": 512},
            "cls_loss": cls_loss,
            "box_loss": {"type": "l1"},
            **model,
        },
        "data": {"min_size": [256], "max_size": 256},
    }


def stats_for(num_classes):
    counts = torch.arange(1, num_classes + 1, dtype=torch.float32)
    return ClassStats(image_count=counts, instance_count=2 * counts, num_images=10 * num_classes)


def lvis_like_batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 256, 256, generator=g), torch.rand(3, 224, 256, generator=g)]
    boxes = torch.tensor(
        [[10.0, 12, 100, 120], [50, 20, 200, 190], [120, 130, 250, 220], [5, 150, 60, 220]]
    )
    targets = [
        {"boxes": boxes, "labels": torch.tensor([1, 17, 600, LVIS_C])},
        {"boxes": boxes[:3] * 0.8, "labels": torch.tensor([5, 5, 900])},
    ]
    return images, targets


def step0(cls_loss, **model):
    """(loss_classifier, RoI features, labels) of the first training step of a built detector."""
    torch.manual_seed(0)
    detector = build_detector(make_cfg(cls_loss, **model), LVIS_C)
    detector.train()
    seen = {}
    detector.roi_heads.box_predictor.register_forward_hook(
        lambda m, args, out: seen.__setitem__("features", args[0].detach())
    )
    detector.roi_heads.cls_loss.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("labels", args[1].detach())
    )
    losses = detector(*lvis_like_batch())
    return losses["loss_classifier"].detach(), seen["features"], seen["labels"], detector


# --- reference: the authors' classifier initialisation and step-0 losses ---------------------


def authors_classifier(in_features, out_features, seed=1):
    """nn.Linear initialised as the authors do: weight N(0, 0.01), bias -log((1 - p) / p)."""
    linear = nn.Linear(in_features, out_features)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.01)
        linear.bias.fill_(-math.log((1 - PRIOR) / PRIOR))
    return linear


def to_authors_labels(labels, num_classes):
    """torchvision labels (0 = background, 1..C) -> mmdetection's (0..C-1, background = C)."""
    return torch.where(labels == 0, torch.full_like(labels, num_classes), labels - 1)


def reference_eqlv2_step0(logits, labels, gamma=12.0, mu=0.8, alpha=4.0):
    """EQLv2 of the authors on [N, C+1] logits with the background channel last, first step."""
    n, channels = logits.shape
    target = torch.zeros_like(logits)
    target[torch.arange(n), labels] = 1.0
    ratio = torch.full((channels - 1,), 100.0)  # initial g_j
    q = torch.cat([1.0 / (1.0 + torch.exp(-gamma * (ratio - mu))), torch.ones(1)])
    r = 1.0 + alpha * (1.0 - q)
    weight = r * target + q * (1.0 - target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * weight).sum() / n


def reference_focal_step0(logits, labels, num_classes, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss on [N, C] class logits (no background channel) / number of RoIs."""
    n = logits.shape[0]
    target = torch.zeros_like(logits)
    fg = labels < num_classes
    target[torch.arange(n)[fg], labels[fg]] = 1.0
    p = logits.sigmoid()
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    log_p_t = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (-alpha_t * (1 - p_t) ** gamma * log_p_t).sum() / n


# --- step-0 losses on LVIS's 1203 classes -----------------------------------------------------


@pytest.fixture(scope="module")
def eqlv2_step0():
    return step0({"type": "eqlv2"})


def test_eqlv2_step0_loss_matches_the_authors_initialisation(eqlv2_step0):
    loss, features, labels, _ = eqlv2_step0
    assert features.shape[0] == 1024 and (labels > 0).any()  # 2 images x 512 RoIs
    reference = authors_classifier(features.shape[1], LVIS_C + 1)
    with torch.no_grad():
        ref_loss = reference_eqlv2_step0(reference(features), to_authors_labels(labels, LVIS_C))
    assert 7.0 < float(ref_loss) < 9.5  # ~ 0.75 log(1000) + 0.25 log(1000) + 1203 * 0.001
    assert abs(float(loss) / float(ref_loss) - 1.0) < 0.05, (float(loss), float(ref_loss))


def test_eqlv2_without_the_prior_is_two_orders_of_magnitude_off():
    # model.cls_prior_prob: 0 keeps torchvision's init: every sigmoid starts at ~0.5
    loss, features, labels, _ = step0({"type": "eqlv2"}, cls_prior_prob=0)
    reference = authors_classifier(features.shape[1], LVIS_C + 1)
    with torch.no_grad():
        ref_loss = reference_eqlv2_step0(reference(features), to_authors_labels(labels, LVIS_C))
    assert float(loss) > 50 * float(ref_loss)
    assert abs(float(loss) / ((LVIS_C + 1) * math.log(2)) - 1) < 0.05


def test_focal_step0_loss_matches_the_authors_initialisation():
    loss, features, labels, _ = step0({"type": "focal"})
    # the authors' sigmoid head has C channels (no background), each at the prior
    reference = authors_classifier(features.shape[1], LVIS_C)
    with torch.no_grad():
        ref_loss = reference_focal_step0(
            reference(features), to_authors_labels(labels, LVIS_C), LVIS_C
        )
    assert float(ref_loss) > 0
    assert abs(float(loss) / float(ref_loss) - 1.0) < 0.05, (float(loss), float(ref_loss))


def test_built_classifier_has_the_prior_bias_and_weight_std(eqlv2_step0):
    *_, detector = eqlv2_step0
    cls_score = detector.roi_heads.box_predictor.cls_score
    # every column, background / objectness (column 0) included, as the authors' fc_cls
    assert torch.equal(cls_score.bias, torch.full_like(cls_score.bias, -math.log(999.0)))
    assert abs(float(cls_score.weight.detach().std()) / 0.01 - 1) < 0.01
    assert abs(float(cls_score.weight.detach().mean())) < 1e-4
    # the box regressor keeps torchvision's init
    bbox = detector.roi_heads.box_predictor.bbox_pred
    assert float(bbox.weight.detach().abs().max()) <= 1 / math.sqrt(bbox.in_features)


SIGMOID_LOSSES = [
    {"type": "eql"},
    {"type": "eqlv2"},
    {"type": "federated"},
    {"type": "focal"},
    {"type": "ghmc"},
    {"type": "cb", "base": "sigmoid"},
    {"type": "cb", "base": "focal"},
    {"type": "efl"},
    {"type": "eqfl"},
    {"type": "qfl"},
]
SOFTMAX_LOSSES = [
    {"type": "ce"},
    {"type": "balanced_softmax"},
    {"type": "las"},
    {"type": "cb", "base": "ce"},
    {"type": "seesaw_softmax"},
]


def test_the_loss_lists_cover_every_classification_loss():
    # seesaw (C + 2 classifier, mmdetection's fc_cls init, no prior) and seesaw_softmax are
    # softmax losses too: tests/losses/test_seesaw_objectness.py checks seesaw's classifier init
    covered = {c["type"] for c in SIGMOID_LOSSES + SOFTMAX_LOSSES} | {"seesaw", "seesaw_softmax"}
    classification = {name for name, cls in LOSSES.items() if hasattr(cls, "activation")}
    assert classification == covered
    for cfg in SIGMOID_LOSSES:
        assert build_loss(cfg, num_classes=20, stats=stats_for(20)).use_sigmoid, cfg
    for cfg in SOFTMAX_LOSSES + [{"type": "seesaw"}, {"type": "seesaw_softmax"}]:
        assert not build_loss(cfg, num_classes=20, stats=stats_for(20)).use_sigmoid, cfg


@pytest.mark.parametrize("cls_loss", SIGMOID_LOSSES, ids=lambda c: "-".join(c.values()))
def test_every_sigmoid_loss_starts_at_the_prior(cls_loss):
    num_classes = 20
    torch.manual_seed(0)
    model = build_detector(
        make_cfg(cls_loss, backbone="mobilenet_v3_large"), num_classes, stats_for(num_classes)
    )
    cls_score = model.roi_heads.box_predictor.cls_score
    assert torch.allclose(cls_score.bias, torch.full((num_classes + 1,), PRIOR_BIAS))
    assert abs(float(cls_score.weight.detach().std()) / 0.01 - 1) < 0.05
    # configurable: another prior, or 0 = torchvision's init
    model = build_detector(
        make_cfg(cls_loss, backbone="mobilenet_v3_large", cls_prior_prob=0.01),
        num_classes,
        stats_for(num_classes),
    )
    assert torch.allclose(
        model.roi_heads.box_predictor.cls_score.bias,
        torch.full((num_classes + 1,), -math.log(99.0)),
    )
    torch.manual_seed(0)
    reference = build_torchvision_detector(
        make_cfg(cls_loss, backbone="mobilenet_v3_large"), num_classes
    )
    torch.manual_seed(0)
    model = build_detector(
        make_cfg(cls_loss, backbone="mobilenet_v3_large", cls_prior_prob=0),
        num_classes,
        stats_for(num_classes),
    )
    own = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize("cls_loss", SOFTMAX_LOSSES, ids=lambda c: "-".join(c.values()))
def test_softmax_detector_keeps_torchvision_init(cls_loss):
    num_classes = 20
    cfg = make_cfg(cls_loss, backbone="mobilenet_v3_large", cls_prior_prob=PRIOR)
    torch.manual_seed(0)
    reference = build_torchvision_detector(cfg, num_classes)
    torch.manual_seed(0)
    model = build_detector(cfg, num_classes, stats_for(num_classes))
    own = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(own[key], value), key


def test_only_the_classifier_changes_for_a_sigmoid_loss():
    cfg = make_cfg({"type": "eqlv2"}, backbone="mobilenet_v3_large")
    torch.manual_seed(0)
    reference = build_torchvision_detector(cfg, 20).state_dict()
    torch.manual_seed(0)
    own = build_detector(cfg, 20).state_dict()
    changed = [k for k, v in reference.items() if not torch.equal(own[k], v)]
    assert changed == [PRED + "cls_score.weight", PRED + "cls_score.bias"]


@pytest.mark.parametrize("arch", ["retinanet", "retinanet_v2"])
def test_retinanet_keeps_torchvision_prior(arch):
    cfg = make_cfg(
        {"type": "focal"}, arch=arch, backbone="mobilenet_v3_large", cls_prior_prob=PRIOR
    )
    torch.manual_seed(0)
    reference = build_torchvision_detector(cfg, 20)
    torch.manual_seed(0)
    model = build_detector(cfg, 20)
    own = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(own[key], value), key
    bias = model.head.classification_head.cls_logits.bias
    assert torch.allclose(bias, torch.full_like(bias, -math.log(99.0)))  # torchvision's p = 0.01


def test_lws_structure_starts_at_the_prior_and_cosine_warns(caplog):
    model = build_detector(
        make_cfg({"type": "eqlv2"}, backbone="mobilenet_v3_large", classifier={"type": "lws"}), 20
    )
    cls_score = model.roi_heads.box_predictor.cls_score
    assert isinstance(cls_score, ScaledClassifier)
    assert torch.allclose(cls_score.base.bias, torch.full((21,), PRIOR_BIAS))
    assert torch.equal(cls_score.scales, torch.ones(21))
    with caplog.at_level(logging.WARNING, logger="ltdet.models.init"):
        model = build_detector(
            make_cfg(
                {"type": "eqlv2"}, backbone="mobilenet_v3_large", classifier={"type": "cosine"}
            ),
            20,
        )
    assert "no bias" in caplog.text
    assert isinstance(model.roi_heads.box_predictor, CosinePredictor)


def test_bad_prior_is_refused():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="cls_prior_prob"):
            build_detector(
                make_cfg({"type": "eqlv2"}, backbone="mobilenet_v3_large", cls_prior_prob=bad), 3
            )


# --- ltdet.patch and the explicit function ----------------------------------------------------


def test_patch_leaves_weights_untouched_unless_asked(tiny_detector):
    model = tiny_detector(num_classes=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ltdet.patch(model, cls_loss={"type": "eqlv2"})
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())

    model = tiny_detector(num_classes=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    ltdet.patch(model, cls_loss={"type": "eqlv2"}, cls_prior_prob=PRIOR)
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert changed == [PRED + "cls_score.weight", PRED + "cls_score.bias"]
    cls_score = model.roi_heads.box_predictor.cls_score
    assert torch.allclose(cls_score.bias, torch.full((51,), PRIOR_BIAS))
    assert abs(float(cls_score.weight.detach().std()) / 0.01 - 1) < 0.05
    assert [id(p) for p in model.parameters()] == params


def test_init_sigmoid_classifier_accepts_model_predictor_or_linear(tiny_detector):
    assert ltdet.init_sigmoid_classifier is ltdet.models.init_sigmoid_classifier
    model = tiny_detector(num_classes=50)
    assert ltdet.init_sigmoid_classifier(model) is model
    assert torch.allclose(
        model.roi_heads.box_predictor.cls_score.bias, torch.full((51,), PRIOR_BIAS)
    )
    predictor = tiny_detector(num_classes=50).roi_heads.box_predictor
    ltdet.init_sigmoid_classifier(predictor, prior_prob=0.01)
    assert torch.allclose(predictor.cls_score.bias, torch.full((51,), -math.log(99.0)))
    linear = nn.Linear(64, 11)
    ltdet.init_sigmoid_classifier(linear, 0.5)
    assert torch.equal(linear.bias, torch.zeros(11))


def test_init_sigmoid_classifier_refusals():
    retina = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    with pytest.raises(TypeError, match="RetinaNet"):
        ltdet.init_sigmoid_classifier(retina)
    with pytest.raises(TypeError, match="RetinaNet"):
        ltdet.patch(retina, cls_loss={"type": "focal"}, cls_prior_prob=PRIOR)
    with pytest.raises(TypeError, match="no bias"):
        ltdet.init_sigmoid_classifier(CosinePredictor(64, 5))
    with pytest.raises(ValueError, match="between 0 and 1"):
        ltdet.init_sigmoid_classifier(nn.Linear(4, 3), prior_prob=0.0)


# --- cRT's stage-2 reset --------------------------------------------------------------------


def _stage2(cls_loss, **model):
    num_classes = 20
    torch.manual_seed(1)
    stage1 = build_detector(
        make_cfg({"type": "ce"}, backbone="mobilenet_v3_large"), num_classes
    ).state_dict()
    cfg = make_cfg(cls_loss, backbone="mobilenet_v3_large", **model)
    cfg["refine"] = {"head": "crt", "box": False}
    torch.manual_seed(2)
    detector = build_detector(cfg, num_classes, stats_for(num_classes))
    prepare_stage2(detector, cfg, stage1)
    return detector, stage1


def test_crt_reset_with_a_sigmoid_stage2_loss_starts_at_the_prior():
    detector, stage1 = _stage2({"type": "eqlv2"})
    cls_score = detector.roi_heads.box_predictor.cls_score
    assert torch.allclose(cls_score.bias, torch.full((21,), PRIOR_BIAS))
    assert abs(float(cls_score.weight.detach().std()) / 0.01 - 1) < 0.05
    own = detector.state_dict()
    assert torch.equal(own[PRED + "bbox_pred.weight"], stage1[PRED + "bbox_pred.weight"])
    assert torch.equal(
        own["roi_heads.box_head.fc6.weight"], stage1["roi_heads.box_head.fc6.weight"]
    )


def test_crt_reset_with_softmax_or_without_prior_keeps_bias_zero():
    for detector, _ in (_stage2({"type": "ce"}), _stage2({"type": "eqlv2"}, cls_prior_prob=0)):
        cls_score = detector.roi_heads.box_predictor.cls_score
        assert torch.equal(cls_score.bias, torch.zeros(21))
        assert abs(float(cls_score.weight.detach().std()) / 0.01 - 1) < 0.05


def test_patch_with_a_prior_leaves_the_model_unchanged_when_the_config_is_rejected():
    """cls_prior_prob must not touch the classifier before the losses / sampler validate."""
    import torchvision

    import ltdet

    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=5
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        ltdet.patch(
            model, cls_loss={"type": "eqlv2"}, sampler={"type": "bogus"}, cls_prior_prob=1e-3
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.roi_heads).__name__ == "RoIHeads"
