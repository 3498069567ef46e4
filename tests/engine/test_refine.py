"""Stage 2 (decoupled refinement) on a tiny torchvision Faster R-CNN: freezing, heads,
shifted BN."""

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from ltdet.engine.refine import (
    install_refine_head,
    prepare_stage2,
    stage2_loss_keys,
    trainable_parameter_names,
)
from ltdet.models.classifiers import CosinePredictor, LWSPredictor

NUM_CLASSES = 4  # foreground; predictor has 5 columns
PRED = "roi_heads.box_predictor."


def tiny_detector(v2_head=False, seed=0):
    """ResNet-18 (BatchNorm) + 32-channel FPN, small RPN/RoI settings, 64 px images."""
    torch.manual_seed(seed)
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        body, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [64, 128, 256, 512], 32
    )
    if v2_head:
        box_head = FastRCNNConvFCHead((32, 7, 7), [16, 16], [32], norm_layer=nn.BatchNorm2d)
    else:
        box_head = TwoMLPHead(32 * 7 * 7, 32)
    return FasterRCNN(
        backbone,
        min_size=64,
        max_size=64,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(32, NUM_CLASSES + 1),
        rpn_pre_nms_top_n_train=100,
        rpn_post_nms_top_n_train=50,
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
    )


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([4])},
    ]
    return images, targets


def stage1_state(v2_head=False):
    """A 'stage-1' model whose BN running statistics moved away from their init."""
    model = tiny_detector(v2_head, seed=1)
    model.train()
    with torch.no_grad():
        model(*batch())
    return copy.deepcopy(model.state_dict())


def stage2_step(model, setup):
    opt = torch.optim.SGD(setup.param_groups, lr=0.5, momentum=0.9, weight_decay=1e-4)
    model.train()
    losses = model(*batch())
    total = sum(losses[k] for k in setup.loss_keys)
    opt.zero_grad()
    total.backward()
    opt.step()
    return losses


def cfg(**refine):
    return {"refine": {"head": "crt", "tau": 1.0, "box": False, "shifted_bn": False, **refine}}


def changed_keys(sd1, model, rename=None):
    """Stage-1 keys whose value differs bit-wise after stage 2 (``rename`` maps stage-1 keys)."""
    sd2 = model.state_dict()
    out = []
    for k, v in sd1.items():
        if k.endswith("num_batches_tracked"):
            continue  # FrozenBatchNorm2d keeps no batch counter
        k2 = (rename or {}).get(k, k)
        if not torch.equal(sd2[k2], v):
            out.append(k)
    return sorted(out)


@pytest.mark.parametrize("box", [False, True])
def test_crt_step_changes_only_the_classifier(box):
    sd1 = stage1_state()
    model = tiny_detector(seed=2)
    setup = prepare_stage2(model, cfg(head="crt", box=box), sd1)
    assert setup.loss_keys == (("loss_classifier", "loss_box_reg") if box else ("loss_classifier",))
    expected = {PRED + "cls_score.weight", PRED + "cls_score.bias"}
    if box:
        expected |= {PRED + "bbox_pred.weight", PRED + "bbox_pred.bias"}
    assert set(trainable_parameter_names(model)) == expected
    # Every BatchNorm is locked in inference mode, whatever train() says.
    model.train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 20
    losses = stage2_step(model, setup)
    assert {"loss_objectness", "loss_rpn_box_reg"} <= set(losses)  # computed, but not summed
    assert changed_keys(sd1, model) == sorted(expected)


def test_lws_at_scale_one_reproduces_stage1_and_trains_only_scales():
    sd1 = stage1_state()
    ref = tiny_detector(seed=1)
    ref.load_state_dict(sd1)
    ref.eval()
    model = tiny_detector(seed=3)
    setup = prepare_stage2(model, cfg(head="lws"), sd1)
    groups = setup.param_groups
    assert isinstance(model.roi_heads.box_predictor, LWSPredictor)
    assert groups == [
        {
            "params": [model.roi_heads.box_predictor.cls_score.scales],
            "weight_decay": 0.0,
            "name": "lws_scales",
        }
    ]
    model.eval()
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.roi_heads.box_predictor(x)[0], ref.roi_heads.box_predictor(x)[0], rtol=0, atol=0
        )
        images, _ = batch()
        out_ref, out = ref(images), model(images)
    for a, b in zip(out_ref, out):
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
    stage2_step(model, setup)
    rename = {
        PRED + "cls_score.weight": PRED + "cls_score.base.weight",
        PRED + "cls_score.bias": PRED + "cls_score.base.bias",
    }
    assert changed_keys(sd1, model, rename) == []
    assert not torch.equal(model.roi_heads.box_predictor.cls_score.scales, torch.ones(5))


def test_tau_norm_head_trains_nothing():
    sd1 = stage1_state()
    model = tiny_detector(seed=2)
    groups = prepare_stage2(model, cfg(head="tau_norm", tau=1.0), sd1).param_groups
    assert groups == [] and trainable_parameter_names(model) == []
    w = model.roi_heads.box_predictor.cls_score.weight
    torch.testing.assert_close(w[1:].norm(dim=1), torch.ones(NUM_CLASSES))
    assert torch.equal(w[0], sd1[PRED + "cls_score.weight"][0])
    # the foreground biases are dropped (the authors' tau-norm scores without bias)
    b = model.roi_heads.box_predictor.cls_score.bias
    assert torch.equal(b[1:], torch.zeros(NUM_CLASSES)) and b[0] == sd1[PRED + "cls_score.bias"][0]
    assert sorted(changed_keys(sd1, model)) == [PRED + "cls_score.bias", PRED + "cls_score.weight"]
    with pytest.raises(ValueError, match="trains nothing"):
        prepare_stage2(tiny_detector(), cfg(head="tau_norm", box=True), sd1)


def test_cosine_head_keeps_box_regressor_and_loads_for_eval():
    sd1 = stage1_state()
    model = tiny_detector(seed=2)
    setup = prepare_stage2(model, cfg(head="cosine"), sd1)
    groups = setup.param_groups
    pred = model.roi_heads.box_predictor
    assert isinstance(pred, CosinePredictor)
    assert [g["name"] for g in groups] == ["classifier", "cosine_scale"]
    assert groups[1]["weight_decay"] == 0.0
    assert torch.equal(pred.bbox_pred.weight, sd1[PRED + "bbox_pred.weight"])
    scale0 = pred.cls_score.scale.item()
    stage2_step(model, setup)
    assert pred.cls_score.scale.item() != scale0
    assert torch.equal(pred.bbox_pred.weight, sd1[PRED + "bbox_pred.weight"])
    # A saved stage-2 state dict loads strictly into a fresh detector given the head structure.
    sd2 = model.state_dict()
    fresh = install_refine_head(tiny_detector(seed=5), cfg(head="cosine"), initialise=False)
    fresh.load_state_dict(sd2)
    fresh.eval()
    model.eval()
    with torch.no_grad():
        images, _ = batch()
        for a, b in zip(model(images), fresh(images)):
            torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)


def test_lws_stage2_checkpoint_roundtrip_strict():
    sd1 = stage1_state()
    model = tiny_detector(seed=2)
    stage2_step(model, prepare_stage2(model, cfg(head="lws"), sd1))
    fresh = install_refine_head(tiny_detector(seed=5), cfg(head="lws"), initialise=False)
    fresh.load_state_dict(model.state_dict())  # strict; BN batch counters filled in by BN itself
    assert torch.equal(
        fresh.roi_heads.box_predictor.cls_score.scales,
        model.roi_heads.box_predictor.cls_score.scales,
    )


def test_shifted_bn_updates_running_stats_not_affine():
    sd1 = stage1_state(v2_head=True)
    model = tiny_detector(v2_head=True, seed=2)
    setup = prepare_stage2(model, cfg(head="crt", shifted_bn=True), sd1)
    box_head_bn = [
        n for n, m in model.roi_heads.box_head.named_modules() if isinstance(m, nn.BatchNorm2d)
    ]
    assert len(box_head_bn) == 2
    # Backbone / FPN BN frozen; box-head BN live but without trainable affine parameters.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.roi_heads.box_head.parameters())
    stage2_step(model, setup)
    changed = changed_keys(sd1, model)
    bn_stats = {
        f"roi_heads.box_head.{n}.{s}" for n in box_head_bn for s in ("running_mean", "running_var")
    }
    assert set(changed) == bn_stats | {PRED + "cls_score.weight", PRED + "cls_score.bias"}
    for n in box_head_bn:  # affine parameters bit-identical
        for s in ("weight", "bias"):
            assert f"roi_heads.box_head.{n}.{s}" not in changed


def test_without_shifted_bn_the_v2_box_head_bn_is_frozen():
    sd1 = stage1_state(v2_head=True)
    model = tiny_detector(v2_head=True, seed=2)
    stage2_step(model, prepare_stage2(model, cfg(head="crt"), sd1))
    assert changed_keys(sd1, model) == [PRED + "cls_score.bias", PRED + "cls_score.weight"]


def test_errors():
    sd1 = stage1_state()
    with pytest.raises(ValueError, match="no BatchNorm"):
        prepare_stage2(tiny_detector(), cfg(shifted_bn=True), sd1)
    with pytest.raises(ValueError, match="refine.head"):
        prepare_stage2(tiny_detector(), cfg(head="mlp"), sd1)
    with pytest.raises(ValueError, match="unknown key"):
        stage2_loss_keys({"refine": {"head": "crt", "taus": 1}})
    other = dict(sd1)
    other[PRED + "cls_score.weight"] = torch.zeros(9, 32)
    with pytest.raises(ValueError, match="model.classifier"):
        prepare_stage2(tiny_detector(), cfg(), other)
    missing = {k: v for k, v in sd1.items() if not k.startswith("rpn.")}
    with pytest.raises(ValueError, match="missing"):
        prepare_stage2(tiny_detector(), cfg(), {"model": missing})


def test_accepts_checkpoint_dict_with_ddp_prefix():
    sd1 = stage1_state()
    ckpt = {"model": {f"module.{k}": v for k, v in sd1.items()}, "iteration": 10}
    model = tiny_detector(seed=2)
    prepare_stage2(model, cfg(head="lws"), ckpt)
    assert torch.equal(model.backbone.body.conv1.weight, sd1["backbone.body.conv1.weight"])


def test_tau_sweep_table_marks_best(load_tool):
    tool = load_tool("tau_sweep")
    rows = [
        {"tau": 0.0, "AP": 0.20, "APr": 0.01, "APc": 0.15, "APf": 0.30},
        {"tau": 0.5, "AP": 0.22, "APr": 0.05, "APc": 0.18, "APf": 0.29},
        {"tau": 1.0, "AP": 0.21, "APr": 0.09, "APc": 0.17, "APf": 0.27},
    ]
    table = tool.format_sweep(rows, "AP")
    assert "* 0.50" in table and table.endswith("best tau by AP: 0.5 (AP 22.00)")
    assert tool.format_sweep(rows, "APr").endswith("best tau by APr: 1 (APr 9.00)")
    assert tool.parse_taus("0, 0.25,1") == [0.0, 0.25, 1.0]
    with pytest.raises(Exception, match="taus"):
        tool.parse_taus("0,-1")
