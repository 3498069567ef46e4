"""Box predictors: cosine, LWS, tau-norm, cRT reset, build_predictor."""

import math

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from ltdet.models.classifiers import (
    CosineClassifier,
    CosinePredictor,
    LinearPredictor,
    LWSPredictor,
    ScaledClassifier,
    build_predictor,
    reset_classifier,
    tau_normalize,
)

D, C1 = 16, 6  # feature dim, classes incl. background


def _stage1_predictor():
    p = FastRCNNPredictor(D, C1)
    with torch.no_grad():
        # Rows of very different norms, as a long-tailed stage 1 leaves them.
        p.cls_score.weight.mul_(torch.linspace(0.2, 5.0, C1).view(-1, 1))
        p.cls_score.bias.normal_()
    return p


def test_linear_predictor_layout_and_4d_input():
    p = LinearPredictor(D, C1)
    x = torch.randn(7, D)
    scores, deltas = p(x.view(7, D, 1, 1))
    assert scores.shape == (7, C1) and deltas.shape == (7, 4 * C1)
    torch.testing.assert_close(scores, x @ p.cls_score.weight.t() + p.cls_score.bias)


def test_cosine_predictor_formula_and_shapes():
    p = CosinePredictor(D, C1, scale=10.0)
    x = torch.randn(5, D)
    scores, deltas = p(x.view(5, D, 1, 1))
    assert scores.shape == (5, C1) and deltas.shape == (5, 4 * C1)
    w = p.cls_score.weight
    expected = 10.0 * (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(scores, expected)
    assert scores.abs().max() <= 10.0 + 1e-5
    # The scale is learnable: it receives a gradient.
    scores.sum().backward()
    assert p.cls_score.scale.grad is not None and p.cls_score.scale.grad.abs() > 0
    # Empty input.
    s0, d0 = p(torch.zeros(0, D))
    assert s0.shape == (0, C1) and d0.shape == (0, 4 * C1)


def test_cosine_fixed_scale_and_bad_input():
    p = CosinePredictor(D, C1, scale=5.0, learn_scale=False)
    assert not p.cls_score.scale.requires_grad
    with pytest.raises(ValueError, match=r"\[R, D, 1, 1\]"):
        p(torch.randn(2, D, 2, 2))
    with pytest.raises(ValueError, match="scale"):
        CosineClassifier(D, C1, scale=0.0)


def test_lws_at_scale_one_reproduces_stage1_logits():
    stage1 = _stage1_predictor()
    x = torch.randn(9, D)
    ref_scores, ref_deltas = stage1(x)
    lws = LWSPredictor(stage1)
    scores, deltas = lws(x)
    assert torch.equal(scores, ref_scores)
    assert torch.equal(deltas, ref_deltas)
    assert isinstance(lws.cls_score, ScaledClassifier)
    assert [n for n, p in lws.cls_score.named_parameters() if p.requires_grad] == ["scales"]


def test_lws_scales_multiply_each_column():
    stage1 = _stage1_predictor()
    x = torch.randn(4, D)
    ref, _ = stage1(x)
    lws = LWSPredictor(stage1)
    s = torch.arange(1, C1 + 1, dtype=torch.float32)
    with torch.no_grad():
        lws.cls_score.scales.copy_(s)
    torch.testing.assert_close(lws(x)[0], ref * s)
    with pytest.raises(TypeError, match="already an LWS"):
        LWSPredictor(lws)
    with pytest.raises(TypeError, match="cls_score"):
        LWSPredictor(nn.Linear(D, C1))


def test_tau_norm_identity_at_zero():
    p = _stage1_predictor()
    before = p.cls_score.weight.clone()
    tau_normalize(p, 0.0)
    assert torch.equal(p.cls_score.weight, before)


def test_tau_norm_unit_rows_at_one_background_untouched_bias_dropped():
    p = _stage1_predictor()
    w0 = p.cls_score.weight.clone()
    b0 = p.cls_score.bias.clone()
    tau_normalize(p, 1.0)
    norms = p.cls_score.weight.norm(dim=1)
    torch.testing.assert_close(norms[1:], torch.ones(C1 - 1))
    assert torch.equal(p.cls_score.weight[0], w0[0])  # background row untouched by default
    # the authors' tau-norm scores without the bias (classifier-balancing tau_norm.py)
    assert torch.equal(p.cls_score.bias[1:], torch.zeros(C1 - 1))
    assert p.cls_score.bias[0] == b0[0]  # background bias untouched too
    kept = _stage1_predictor()
    b1 = kept.cls_score.bias.clone()
    tau_normalize(kept, 1.0, keep_bias=True)
    assert torch.equal(kept.cls_score.bias, b1)


def test_tau_norm_intermediate_and_background_option():
    p = _stage1_predictor()
    w0 = p.cls_score.weight.clone()
    tau_normalize(p, 0.5, normalize_background=True)
    expected = w0 / w0.norm(dim=1, keepdim=True) ** 0.5
    torch.testing.assert_close(p.cls_score.weight, expected)


def test_tau_norm_rejects_non_linear_and_bad_tau():
    with pytest.raises(TypeError, match="nn.Linear"):
        tau_normalize(CosinePredictor(D, C1), 1.0)
    with pytest.raises(ValueError, match="tau"):
        tau_normalize(_stage1_predictor(), -0.5)
    with pytest.raises(ValueError, match="tau"):
        tau_normalize(_stage1_predictor(), math.nan)


def test_reset_classifier_reinitialises_only_cls_score():
    p = _stage1_predictor()
    box = p.bbox_pred.weight.clone()
    old = p.cls_score.weight.clone()
    reset_classifier(p, std=0.01)
    assert torch.equal(p.bbox_pred.weight, box)
    assert not torch.equal(p.cls_score.weight, old)
    assert torch.count_nonzero(p.cls_score.bias) == 0
    assert p.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.35)


def test_build_predictor_types_and_errors():
    lin = build_predictor({"type": "linear"}, D, C1 - 1)
    assert isinstance(lin, LinearPredictor) and lin.cls_score.out_features == C1
    cos = build_predictor({"type": "cosine", "scale": 16.0, "learn_scale": False}, D, C1 - 1)
    assert isinstance(cos, CosinePredictor) and cos.cls_score.scale.item() == 16.0
    assert cos.bbox_pred.out_features == 4 * C1
    lws = build_predictor({"type": "lws"}, D, C1 - 1)
    assert isinstance(lws, LWSPredictor)
    assert set(lws.state_dict()) == {
        "cls_score.base.weight",
        "cls_score.base.bias",
        "cls_score.scales",
        "bbox_pred.weight",
        "bbox_pred.bias",
    }
    assert isinstance(build_predictor(None, D, C1 - 1), LinearPredictor)
    with pytest.raises(ValueError, match="model.classifier.type"):
        build_predictor({"type": "mlp"}, D, 5)
    with pytest.raises(ValueError, match="unknown key"):
        build_predictor({"type": "linear", "scale": 3}, D, 5)
