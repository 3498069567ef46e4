"""Seesaw with its objectness branch (`seesaw`, the authors' design) against mmdetection.

Reference: open-mmlab/mmdetection `mmdet/models/losses/seesaw_loss.py` (`seesaw_ce_loss`,
`SeesawLoss.forward`, `get_activation`, `get_cls_channels`), as its bbox head uses it
(`mmdet/models/roi_heads/bbox_heads/bbox_head.py`: `fc_cls` with `get_cls_channels(C)` = C + 2
outputs when `custom_cls_channels`, `avg_factor = max(#(label_weights > 0), 1)` = the sampled
RoIs, scores by `get_activation`). `MMDetSeesaw` below re-writes it as explicit loops over RoIs
and classes, in mmdetection's own layout: logits (classes 0..C-1, objectness "pos", objectness
"neg"), labels 0..C-1 for the classes and C for background, `cum_samples [C+1]` with background
last. ltdet's layout (torchvision's conventions) is converted explicitly:

    ltdet column 0 (objectness background)  <->  mmdetection column C + 1
    ltdet column j = 1..C (class, label j)  <->  mmdetection column j - 1 (label j - 1)
    ltdet column C + 1 (objectness fgd)     <->  mmdetection column C
    scores: ltdet [p_bg, classes * p_fg]    <->  mmdetection [classes * p_fg, p_bg]

The unit cases of mmdetection's own test (`test_seesaw_loss` in
tests/test_models/test_losses/test_loss.py, mmdetection 2.x) are ported at the end of the loss
section, in ltdet's layout.
"""

import logging
import math

import pytest
import torch

import ltdet
from ltdet.losses import LOSSES, build_loss
from ltdet.losses.base import ClassificationLoss
from ltdet.models.build import build_detector
from ltdet.models.weights import load_detector_state_dict

C = 6


# ----------------------------------------------------------------------------- the reference


class MMDetSeesaw:
    """mmdetection's SeesawLoss, loop by loop, in mmdetection's layout (module docstring)."""

    def __init__(self, num_classes, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0):
        self.num_classes, self.p, self.q, self.eps = num_classes, p, q, eps
        self.loss_weight = loss_weight
        self.cum_samples = [0.0] * (num_classes + 1)  # background counted too, at index C

    def step(self, z, labels, label_weights=None, avg_factor=None):
        """(loss_cls_classes, loss_cls_objectness, d(sum of both)/dz) of one training step."""
        n, num = z.shape[0], self.num_classes
        labels = [int(y) for y in labels]
        weights = [1.0] * n if label_weights is None else [float(w) for w in label_weights]
        for y in labels:  # `unique_labels` loop: every label, before the loss
            self.cum_samples[y] += 1
        positives = [r for r in range(n) if labels[r] < num]
        # weight_reduce_loss(reduction="mean"): sum / avg_factor, else the mean of the elements
        obj_div = float(avg_factor) if avg_factor is not None else float(n)
        cls_div = float(avg_factor) if avg_factor is not None else float(max(len(positives), 1))
        classes, objectness = 0.0, 0.0
        grad = torch.zeros(n, num + 2, dtype=torch.float64)
        for r in range(n):
            w, y = weights[r], labels[r]
            # objectness: 2-way softmax over (pos, neg); target 1 ("neg") for background
            obj = [float(z[r, num]), float(z[r, num + 1])]
            target = 1 if y == num else 0
            lse = math.log(sum(math.exp(v) for v in obj))
            objectness += w * (lse - obj[target])
            for k in range(2):
                grad[r, num + k] += w * (math.exp(obj[k] - lse) - (k == target)) / obj_div
            if y == num:
                continue  # seesaw_ce_loss runs on the positives only
            logit = [float(v) for v in z[r, :num]]
            lse_plain = math.log(sum(math.exp(v) for v in logit))
            score = [math.exp(v - lse_plain) for v in logit]  # detached softmax
            shifted = []
            for j in range(num):
                factor = 1.0
                if j != y:
                    if self.p > 0:  # mitigation: (N_j / N_i)^p where N_j < N_i
                        ratio = max(self.cum_samples[j], 1.0) / max(self.cum_samples[y], 1.0)
                        if ratio < 1.0:
                            factor *= ratio**self.p
                    if self.q > 0:  # compensation: (s_j / max(s_i, eps))^q where > 1
                        ratio = score[j] / max(score[y], self.eps)
                        if ratio > 1.0:
                            factor *= ratio**self.q
                shifted.append(logit[j] + math.log(factor))
            lse = math.log(sum(math.exp(v) for v in shifted))
            classes += w * (lse - shifted[y])
            for j in range(num):
                grad[r, j] += w * (math.exp(shifted[j] - lse) - (j == y)) / cls_div
        return (
            self.loss_weight * classes / cls_div,
            self.loss_weight * objectness / obj_div,
            self.loss_weight * grad,
        )

    @staticmethod
    def activation(z):
        """get_activation: [softmax(classes) * p_pos, p_neg]."""
        rows = []
        for row in z.tolist():
            cls, obj = row[:-2], row[-2:]
            e = [math.exp(v - max(cls)) for v in cls]
            o = [math.exp(v - max(obj)) for v in obj]
            p_pos, p_neg = o[0] / sum(o), o[1] / sum(o)
            rows.append([v / sum(e) * p_pos for v in e] + [p_neg])
        return torch.tensor(rows, dtype=torch.float64)


def to_mmdet(x):
    """ltdet-ordered columns [bg_obj, class 1..C, fg_obj] -> mmdetection's [classes, pos, neg]."""
    return torch.cat([x[:, 1:-1], x[:, -1:], x[:, :1]], dim=1)


def labels_to_mmdet(labels, num_classes=C):
    return torch.where(labels > 0, labels - 1, torch.full_like(labels, num_classes))


def counts_to_mmdet(cum_samples):
    """ltdet `cum_samples` (index = label, 0 = background) -> mmdetection's (background last)."""
    return torch.cat([cum_samples[1:], cum_samples[:1]])


def _grad(value, x):
    (g,) = torch.autograd.grad(value, x)
    return g


def _batch(n, seed, num_classes=C, bg_fraction=0.5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, num_classes + 2, generator=g)).double().requires_grad_(True)
    # skewed: class 1 frequent, the last class rare
    pool = torch.tensor([1, 1, 1, 1, 2, 2, 3, 4, num_classes])
    labels = pool[torch.randint(0, len(pool), (n,), generator=g)]
    labels[torch.rand(n, generator=g) < bg_fraction] = 0
    return logits, labels


# ----------------------------------------------------------------------------- the loss


def test_registry_declares_the_channels(make_stats):
    for name, cls in LOSSES.items():
        if not issubclass(cls, ClassificationLoss):
            continue
        stats = None
        if name in ("cb", "balanced_softmax", "eql", "federated", "las"):
            stats = make_stats()
        loss = build_loss({"type": name}, num_classes=C, stats=stats)
        assert loss.cls_channels == (C + 2 if name == "seesaw" else C + 1), name
        assert loss.get_cls_channels(11) == (13 if name == "seesaw" else 12), name
    assert build_loss({"type": "ce"}).cls_channels is None  # no C given: width unknown


@pytest.mark.parametrize("p,q,loss_weight", [(0.8, 2.0, 1.0), (1.0, 0.0, 2.0), (0.0, 1.0, 1.0)])
def test_values_gradients_and_counts_equal_mmdetection_over_four_steps(p, q, loss_weight):
    loss = (
        build_loss({"type": "seesaw", "p": p, "q": q, "loss_weight": loss_weight}, num_classes=C)
        .double()
        .train()
    )
    ref = MMDetSeesaw(C, p=p, q=q, loss_weight=loss_weight)
    for step in range(4):
        logits, labels = _batch(12, seed=step)
        # the RoI head's call: weights (mixup / PISA) in two steps, avg_factor = sampled RoIs
        weight = None if step < 2 else torch.rand(12, dtype=torch.float64) + 0.5
        value = loss(logits, labels, weight=weight, avg_factor=12.0)
        cls_part, obj_part, ref_grad = ref.step(
            to_mmdet(logits.detach()), labels_to_mmdet(labels), weight, avg_factor=12.0
        )
        assert value.item() == pytest.approx(cls_part + obj_part, rel=1e-12, abs=1e-12), step
        grad = _grad(value, logits)
        torch.testing.assert_close(to_mmdet(grad), ref_grad, rtol=1e-10, atol=1e-12)
        assert torch.equal(
            counts_to_mmdet(loss.cum_samples), torch.tensor(ref.cum_samples, dtype=torch.float64)
        ), step
    # background is counted (index 0) as mmdetection counts it (index C); the classes are skewed
    assert loss.cum_samples[0] > 0 and loss.cum_samples[1] > loss.cum_samples[C]
    # the state matters: a fresh loss gives another value on the last batch (p > 0)
    if p > 0:
        fresh = (
            build_loss(
                {"type": "seesaw", "p": p, "q": q, "loss_weight": loss_weight}, num_classes=C
            )
            .double()
            .eval()
        )
        assert not torch.allclose(
            fresh(logits, labels, avg_factor=12.0), loss.eval()(logits, labels, avg_factor=12.0)
        )


def test_per_roi_and_sum_reductions_split_like_the_reference():
    loss = build_loss({"type": "seesaw"}, num_classes=C).double().train()
    ref = MMDetSeesaw(C)
    logits, labels = _batch(10, seed=7)
    per_roi = loss(logits, labels, reduction="none")
    assert per_roi.shape == (10,)
    loss.cum_samples.zero_()
    total = loss(logits, labels, reduction="sum")
    cls_part, obj_part, _ = ref.step(
        to_mmdet(logits.detach()), labels_to_mmdet(labels), avg_factor=1.0
    )  # sum = mean with avg_factor 1
    assert total.item() == pytest.approx(cls_part + obj_part, rel=1e-12)
    assert total.item() == pytest.approx(per_roi.sum().item(), rel=1e-12)
    # default mean: ltdet's contract divides by the N RoIs (the RoI head passes avg_factor=N too)
    assert loss.eval()(logits, labels).item() == pytest.approx(total.item() / 10, rel=1e-12)


def test_all_background_batch_leaves_every_class_logit_exactly_alone():
    loss = build_loss({"type": "seesaw"}, num_classes=C).double().train()
    loss.cum_samples.copy_(torch.tensor([50.0, 1000, 1, 1, 1, 1, 1]))
    logits, _ = _batch(16, seed=3)
    labels = torch.zeros(16, dtype=torch.long)
    value = loss(logits, labels)
    grad = _grad(value, logits)
    assert torch.isfinite(value) and value.item() > 0
    assert torch.equal(grad[:, 1:-1], torch.zeros_like(grad[:, 1:-1]))  # exactly zero
    assert grad[:, 0].abs().min() > 0 and grad[:, -1].abs().min() > 0  # objectness trains
    # it is plain 2-way CE on (background, foreground) objectness
    objectness = torch.stack([logits[:, 0], logits[:, -1]], 1).detach()
    expected = torch.nn.functional.cross_entropy(objectness, labels)
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert loss.cum_samples[0] == 66.0  # background counted, in training mode


def test_background_push_down_on_a_rare_class_logit_before_and_after():
    """LVIS-sized: 1203 classes, 512 sampled RoIs of which 25% foreground (frequent classes),
    a fresh classifier (logits ~ 0), the rarest class seen 10 times. 'Push-down' = the summed
    gradient on the rare class's logit (positive = pushed down), per source of RoIs."""
    num, n, rare = 1203, 512, 1203
    counts = (
        (20000.0 / torch.arange(1, num + 1, dtype=torch.float64).pow(1.3)).clamp(min=10).round()
    )
    counts[rare - 1] = 10.0
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(n, dtype=torch.long)
    labels[: n // 4] = torch.randint(1, 51, (n // 4,), generator=g)  # frequent classes only
    z = 0.01 * torch.randn(n, num + 2, generator=g, dtype=torch.float64)
    fg, bg = labels > 0, labels == 0

    def push(name, logits, column):
        loss = build_loss({"type": name}, num_classes=num).double().eval()  # state fixed
        loss.cum_samples.copy_(
            counts
            if name == "seesaw_softmax"
            else torch.cat([torch.tensor([3.0 * counts.sum()]), counts])
        )
        logits = logits.clone().requires_grad_(True)
        grad = _grad(loss(logits, labels, avg_factor=float(n)), logits)[:, column]
        return grad[fg].sum().item(), grad[bg].sum().item()

    # single softmax over [bg, classes] (ltdet's old `seesaw`, now `seesaw_softmax`)
    fg_before, bg_before = push("seesaw_softmax", z[:, :-1], rare)
    # the authors' design: [objectness bg, classes, objectness fg]
    fg_after, bg_after = push("seesaw", z, rare)
    assert bg_after == 0.0  # background RoIs never push a class logit
    assert bg_before == pytest.approx(0.75 / (num + 1), rel=1e-2)  # 384 of 512 RoIs, 1/1204 each
    # foreground RoIs: mitigated in both, about alike (the old softmax also has a bg column)
    assert 0 < fg_after == pytest.approx(fg_before, rel=0.05)
    assert bg_before > 5 * fg_before  # before, background dominated the push on the rare logit
    print(
        f"push-down on the rare class's logit (mean over {n} RoIs): foreground RoIs "
        f"{fg_before:.3g} -> {fg_after:.3g}; background RoIs {bg_before:.3g} -> {bg_after:.3g}"
    )


def test_activation_scores_background_first_and_equals_mmdetection():
    loss = build_loss({"type": "seesaw"}, num_classes=C).double()
    logits, _ = _batch(9, seed=5, scale=4.0)
    logits = logits.detach()
    scores = loss.activation(logits)
    assert scores.shape == (9, C + 1)
    assert torch.allclose(scores.sum(1), torch.ones(9, dtype=torch.float64), atol=1e-12)
    p = torch.stack([logits[:, 0], logits[:, -1]], 1).softmax(1)
    assert torch.allclose(scores[:, 0], p[:, 0])  # column 0 = background probability
    assert torch.allclose(scores[:, 1:], logits[:, 1:-1].softmax(1) * p[:, 1:])
    ref = MMDetSeesaw.activation(to_mmdet(logits))
    torch.testing.assert_close(
        torch.cat([scores[:, 1:], scores[:, :1]], 1), ref, rtol=1e-12, atol=1e-15
    )


def test_shape_and_label_errors():
    loss = build_loss({"type": "seesaw"}, num_classes=C)
    with pytest.raises(ValueError, match=r"C\+2 = 8 logit columns.* got 7 columns"):
        loss(torch.zeros(3, C + 1), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\]"):
        loss(torch.zeros(3, C + 2), torch.tensor([0, 1, 7]))


# mmdetection's own unit test (test_seesaw_loss), mmdetection layout -> ltdet layout:
# mmdet [cls_0, cls_1, pos, neg] with label k  ==  ltdet [neg, cls_0, cls_1, pos] with label k + 1


def _mmdet_case(pred, label, **cfg):
    loss = build_loss({"type": "seesaw", **cfg}, num_classes=2).train()
    pred = torch.tensor([pred], dtype=torch.float32)
    return loss, torch.cat([pred[:, -1:], pred[:, :-1]], 1), torch.tensor([label + 1])


def test_mmdetection_unit_cases():
    # only softmax: mmdetection asserts on use_sigmoid=True; ltdet has no such option
    with pytest.raises(ValueError, match="use_sigmoid"):
        build_loss({"type": "seesaw", "use_sigmoid": True}, num_classes=2)
    loss = build_loss({"type": "seesaw", "p": 0.0, "q": 0.0}, num_classes=2)
    for width in (2, 3):  # the logits must have num_classes + 2 columns
        with pytest.raises(ValueError, match="4 logit columns"):
            loss(torch.zeros(1, width), torch.tensor([2]))
    # without p and q: objectness 200, classes 0
    loss, z, y = _mmdet_case([-100, 100, -100, 100], 1, p=0.0, q=0.0)
    assert torch.allclose(loss(z, y), torch.tensor(200.0 + 0.0))
    # with p, without q: cum_samples of class 0 = e^20 -> classes 180
    loss, z, y = _mmdet_case([-100, 100, -100, 100], 0, p=1.0, q=0.0)
    loss.cum_samples[1] = math.exp(20.0)  # mmdetection's index 0 = ltdet's label 1
    assert torch.allclose(loss(z, y), torch.tensor(200.0 + 180.0))
    # with q, without p: classes 200 + log(100)
    loss, z, y = _mmdet_case([-100, 100, -100, 100], 0, p=0.0, q=1.0)
    assert torch.allclose(loss(z, y), torch.tensor(200.0 + 200.0 + math.log(100.0)))
    # the others: a confident, correct RoI; its scores are [1, 0, 0] in mmdetection's layout
    loss, z, y = _mmdet_case([100, -100, 100, -100], 0, p=0.0, q=1.0)
    assert torch.allclose(loss(z, y), torch.tensor(0.0))
    assert torch.allclose(loss.activation(z), torch.tensor([[0.0, 1.0, 0.0]]))  # [bg, cls_0, cls_1]
    # reduction must be one of none / mean / sum (test_loss_with_reduction_override)
    with pytest.raises(ValueError, match="reduction"):
        loss(z, y, reduction=True)


# ----------------------------------------------------------------------------- in detectors


def _small_cfg(**model):
    return {
        "model": {
            "arch": "faster_rcnn",
            "backbone": "resnet18",
            "norm": "bn",
            "weights": None,
            "weights_backbone": None,
            "rpn": {
                "pre_nms_top_n_train": 200,
                "pre_nms_top_n_test": 100,
                "post_nms_top_n_train": 64,
                "post_nms_top_n_test": 32,
                "batch_size_per_image": 64,
            },
            "roi_heads": {"batch_size_per_image": 32},
            "cls_loss": {"type": "seesaw"},
            "box_loss": {"type": "smooth_l1"},
            **model,
        },
        "data": {"min_size": [96], "max_size": 128},
    }


def _batch_images():
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 112)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


def test_build_detector_makes_a_c_plus_2_classifier_that_trains_and_detects():
    num = 3
    torch.manual_seed(0)
    model = build_detector(_small_cfg(), num)
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.out_features == num + 2
    assert predictor.bbox_pred.out_features == 4 * (num + 1)  # indexed by label, unchanged
    assert torch.equal(predictor.cls_score.bias, torch.zeros(num + 2))  # mmdetection's fc_cls init
    assert float(predictor.cls_score.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert model.roi_heads.cls_loss.cls_channels == num + 2
    model.train()
    images, targets = _batch_images()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.roi_heads.cls_loss.cum_samples.sum() == 2 * 32  # every sampled RoI counted
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = model(images)
    assert sum(d["labels"].numel() for d in out) > 0
    for det in out:
        if det["labels"].numel():
            assert det["labels"].min() >= 1 and det["labels"].max() <= num
            assert torch.all((det["scores"] >= 0) & (det["scores"] <= 1))


def test_build_detector_changes_only_the_classifier_against_torchvision():
    from ltdet.models.build import build_torchvision_detector

    cfg = _small_cfg(backbone="mobilenet_v3_large")
    torch.manual_seed(0)
    reference = build_torchvision_detector(cfg, 4).state_dict()
    torch.manual_seed(0)
    own = build_detector(cfg, 4).state_dict()
    pred = "roi_heads.box_predictor."
    differ = sorted(
        k
        for k in reference
        if k not in own
        or own[k].shape != reference[k].shape
        or not torch.equal(own[k], reference[k])
    )
    assert differ == [pred + "cls_score.bias", pred + "cls_score.weight"]
    assert own[pred + "cls_score.weight"].shape == (
        6,
        reference[pred + "cls_score.weight"].shape[1],
    )
    assert set(own) - set(reference) == {"roi_heads.cls_loss.cum_samples"}


@pytest.mark.parametrize("kind", ["cosine", "lws"])
def test_build_detector_cosine_and_lws_classifiers_have_c_plus_2_outputs(kind):
    model = build_detector(_small_cfg(backbone="mobilenet_v3_large", classifier={"type": kind}), 4)
    cls_score = model.roi_heads.box_predictor.cls_score
    assert cls_score.out_features == 6
    if kind == "lws":
        assert cls_score.scales.shape == (6,)
    model.train()
    losses = model(*_batch_images())
    assert torch.isfinite(sum(losses.values()))


def test_patch_recreates_only_cls_score_and_scores_are_valid(
    caplog, detection_batch, tiny_detector, tiny_num_classes
):
    model = tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_predictor = model.roi_heads.box_predictor
    with caplog.at_level(logging.WARNING, logger="ltdet.models.classifiers"):
        ltdet.patch(model, cls_loss={"type": "seesaw"})
    assert any(
        "cls_score re-created with 7 outputs instead of 6" in r.getMessage() for r in caplog.records
    )
    predictor = model.roi_heads.box_predictor
    assert predictor is old_predictor  # the same predictor; only its classifier layer is new
    assert predictor.cls_score.out_features == tiny_num_classes + 2
    assert (
        predictor.cls_score.in_features
        == before["roi_heads.box_predictor.cls_score.weight"].shape[1]
    )
    assert torch.equal(predictor.cls_score.bias, torch.zeros(tiny_num_classes + 2))
    after = model.state_dict()
    changed = sorted(
        k
        for k in before
        if not torch.equal(after[k], before[k])
        if after[k].shape == before[k].shape
    )
    resized = sorted(k for k in before if after[k].shape != before[k].shape)
    assert changed == [] and resized == [
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
    ]
    # postprocess: generic, [N, C+1] scores, labels in [1, C]
    rh = model.roi_heads
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, tiny_num_classes + 2, generator=g) * 3
    deltas = torch.zeros(20, 4 * (tiny_num_classes + 1))
    proposals = [
        torch.tensor([[4.0, 4.0, 30.0, 30.0]]).repeat(10, 1) + torch.arange(10.0)[:, None]
    ] * 2
    rh.score_thresh = 0.0
    boxes, scores, labels = rh.postprocess_detections(logits, deltas, proposals, [(64, 64)] * 2)
    expected = rh.cls_loss.activation(logits)
    for s, lab in zip(scores, labels):
        assert s.numel() > 0 and torch.all((s > 0) & (s <= 1))
        assert lab.min() >= 1 and lab.max() <= tiny_num_classes
    assert torch.isclose(scores[0].max(), expected[:10, 1:].max())
    # a whole training step and inference of the patched model
    model.train()
    assert torch.isfinite(sum(model(*detection_batch()).values()))
    model.eval()
    with torch.no_grad():
        model(detection_batch()[0])
    # re-patching keeps the C+2 classifier (and a C+1 loss gets a C+1 one back)
    ltdet.patch(model)
    assert model.roi_heads.box_predictor.cls_score.out_features == tiny_num_classes + 2
    ltdet.patch(model, cls_loss={"type": "ce"})
    assert model.roi_heads.box_predictor.cls_score.out_features == tiny_num_classes + 1


def test_patch_errors_leave_the_model_unchanged(tiny_detector):
    from ltdet.models.classifiers import LWSPredictor

    model = tiny_detector()
    model.roi_heads.box_predictor = LWSPredictor(model.roi_heads.box_predictor)
    with pytest.raises(TypeError, match="LWS head scales a trained classifier"):
        ltdet.patch(model, cls_loss={"type": "seesaw"})
    model = tiny_detector()
    cls_score = model.roi_heads.box_predictor.cls_score
    with pytest.raises(ValueError):
        ltdet.patch(model, cls_loss={"type": "seesaw"}, sampler={"type": "hardest"})
    assert model.roi_heads.box_predictor.cls_score is cls_score


def test_retinanet_refuses_seesaw_and_keeps_seesaw_softmax():
    from ltdet.models.build import build_torchvision_detector

    retina = build_torchvision_detector(
        {"model": {"arch": "retinanet", "backbone": "resnet18", "norm": "bn"}}, 3
    )
    with pytest.raises(ValueError, match="RoI-head loss"):
        ltdet.patch(retina, cls_loss={"type": "seesaw"})
    assert type(retina).__name__ == "RetinaNet"  # nothing changed
    ltdet.patch(retina, cls_loss={"type": "seesaw_softmax"})
    assert type(retina.head.classification_head.loss).__name__ == "SeesawSoftmaxLoss"
    with pytest.raises(ValueError, match="RoI-head loss"):
        build_detector(
            {
                "model": {
                    "arch": "retinanet",
                    "backbone": "resnet18",
                    "norm": "bn",
                    "cls_loss": {"type": "seesaw"},
                }
            },
            3,
        )


def test_torchvision_state_dict_loads_into_a_seesaw_model_except_cls_score(
    caplog, tiny_detector, tiny_num_classes
):
    plain = tiny_detector()
    model = ltdet.patch(tiny_detector(), cls_loss={"type": "seesaw"})
    fresh = {k: v.clone() for k, v in model.state_dict().items() if ".cls_score." in k}
    with pytest.raises(RuntimeError, match="size mismatch for roi_heads.box_predictor.cls_score"):
        model.load_state_dict(plain.state_dict())
    with caplog.at_level(logging.INFO, logger="ltdet.models.weights"):
        load_detector_state_dict(model, plain.state_dict(), "torchvision")
    assert any("cls_score.weight" in r.getMessage() for r in caplog.records)
    own = model.state_dict()
    for key, value in plain.state_dict().items():
        if ".cls_score." in key:
            assert torch.equal(own[key], fresh[key])  # left fresh
        else:
            assert torch.equal(own[key], value), key
    # a checkpoint of the single-softmax variant (cum_samples [C]) keeps the loss fresh
    old = ltdet.patch(tiny_detector(), cls_loss={"type": "seesaw_softmax"})
    old.roi_heads.cls_loss.cum_samples.fill_(3.0)
    load_detector_state_dict(model, old.state_dict(), "seesaw_softmax checkpoint")
    assert torch.equal(
        model.roi_heads.cls_loss.cum_samples, torch.zeros(tiny_num_classes + 1, dtype=torch.float64)
    )


def test_stage2_crt_from_a_c_plus_1_stage1_and_lws_error(
    detection_batch, tiny_detector, tiny_num_classes
):
    from ltdet.engine.refine import prepare_stage2

    stage1 = ltdet.patch(tiny_detector(), cls_loss={"type": "ce"}).state_dict()
    model = ltdet.patch(tiny_detector(), cls_loss={"type": "seesaw"})
    groups = prepare_stage2(model, {"refine": {"head": "crt"}}, stage1).param_groups
    cls_score = model.roi_heads.box_predictor.cls_score
    assert cls_score.out_features == tiny_num_classes + 2 and torch.equal(
        cls_score.bias, torch.zeros(tiny_num_classes + 2)
    )
    assert [g["name"] for g in groups] == ["classifier"]
    for key, value in stage1.items():  # the rest is stage 1's
        if ".cls_score." not in key and not key.startswith("roi_heads.cls_loss"):
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(model.state_dict()[key], value), key
    model.train()
    assert torch.isfinite(model(*detection_batch())["loss_classifier"])
    # cosine head: a fresh C+2 cosine classifier
    model = ltdet.patch(tiny_detector(), cls_loss={"type": "seesaw"})
    prepare_stage2(model, {"refine": {"head": "cosine"}}, stage1)
    assert model.roi_heads.box_predictor.cls_score.out_features == tiny_num_classes + 2
    # LWS keeps the stage-1 classifier: a C+1 one cannot serve seesaw
    model = ltdet.patch(tiny_detector(), cls_loss={"type": "seesaw"})
    with pytest.raises(ValueError, match="same classifier width"):
        prepare_stage2(model, {"refine": {"head": "lws"}}, stage1)


def test_tau_norm_leaves_both_objectness_rows_alone(tiny_detector, tiny_num_classes):
    from ltdet.models.classifiers import tau_normalize

    model = ltdet.patch(tiny_detector(), cls_loss={"type": "seesaw"})
    cls_score = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls_score.bias.uniform_(-1, 1)
    weight, bias = cls_score.weight.detach().clone(), cls_score.bias.detach().clone()
    tau_normalize(model.roi_heads.box_predictor, 1.0)
    for row in (0, tiny_num_classes + 1):
        assert torch.equal(cls_score.weight[row], weight[row]) and cls_score.bias[row] == bias[row]
    norms = cls_score.weight[1:-1].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms)) and torch.all(cls_score.bias[1:-1] == 0)
