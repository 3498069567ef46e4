"""TorchScript: a patched detector in eval mode scripts and detects exactly as in eager mode.

Every classification loss of the registry (`ltdet.losses.LOSSES`) defines how logits become
scores (`activation`); a scripted model compiles it into `postprocess_detections`. Training stays
eager-only (`@torch.jit.unused`, as torchvision's own training paths are not what one scripts).
"""

import io
import logging

import pytest
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import ltdet
from ltdet.losses import LOSSES, build_loss
from ltdet.losses.base import ClassificationLoss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

#: every classification loss of the registry, never a hand-kept list
CLASSIFICATION_LOSSES = sorted(
    name for name, cls in LOSSES.items() if issubclass(cls, ClassificationLoss)
)
#: extra configurations of losses whose activation depends on a hyper-parameter
VARIANTS = {"cb": [{"base": "sigmoid"}, {"base": "focal"}]}

TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture
def stats(make_stats):
    """Class statistics for `tiny_detector`'s C = 5 classes."""
    return make_stats(image_count=(400.0, 90.0, 30.0, 8.0, 2.0))


def _images(size=64):
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, size, size, generator=g), torch.rand(3, size, size - 16, generator=g)]


def _spread_predictor(model):
    """Re-initialise the box predictor so scores, labels and boxes differ between detections (a
    fresh one scores every class alike), and keep every candidate (score_thresh 0)."""
    g = torch.Generator().manual_seed(1)
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        for p in predictor.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 1.0))
    model.roi_heads.score_thresh = 0.0
    return model


def _assert_same_detections(eager, scripted):
    """Same boxes, scores and labels (and masks when present); returns the max differences."""
    assert len(eager) == len(scripted)
    diffs = {}
    assert sum(d["boxes"].shape[0] for d in eager) > 0, "no detections: the comparison is empty"
    for e, s in zip(eager, scripted):
        assert set(e) == set(s)
        assert torch.equal(e["labels"], s["labels"])
        for key in e:
            if key == "labels":
                continue
            assert e[key].shape == s[key].shape, key
            torch.testing.assert_close(s[key], e[key], **TOLERANCE)
            if e[key].numel():
                diffs[key] = max(diffs.get(key, 0.0), (s[key] - e[key]).abs().max().item())
    return diffs


def _eager_and_scripted(model, images):
    model.eval()
    with torch.no_grad():
        eager = model(images)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        _, detections = scripted(images)  # scripted detection models return (losses, detections)
    return eager, detections, scripted


# Scripting the tiny detector takes ~0.6 s per loss on one core: every loss runs by default.
@pytest.mark.parametrize("name", CLASSIFICATION_LOSSES)
def test_scripted_faster_rcnn_detects_as_eager(name, stats, tiny_detector):
    model = _spread_predictor(ltdet.patch(tiny_detector(), cls_loss={"type": name}, stats=stats))
    images = _images()
    eager, scripted_detections, scripted = _eager_and_scripted(model, images)
    _assert_same_detections(eager, scripted_detections)
    # the scripted model scores with the loss's own activation (logits of the loss's width:
    # seesaw's C+2, every other loss's C+1; scores C+1)
    logits = torch.randn(7, model.roi_heads.cls_loss.cls_channels) * 4
    assert model.roi_heads.box_predictor.cls_score.out_features == logits.shape[1]
    torch.testing.assert_close(
        scripted.roi_heads.cls_loss.activation(logits),
        model.roi_heads.cls_loss.activation(logits),
        **TOLERANCE,
    )


class _Scorer(nn.Module):
    """Scripts nothing but a loss's activation (milliseconds, unlike a whole detector)."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.loss.activation(logits)


@pytest.mark.parametrize(
    "cfg",
    [{"type": name} for name in CLASSIFICATION_LOSSES]
    + [{"type": name, **v} for name, vs in VARIANTS.items() for v in vs],
    ids=lambda cfg: "-".join(str(v) for v in cfg.values()),
)
def test_every_activation_scripts_and_equals_eager(cfg, stats, tiny_num_classes):
    loss = build_loss(cfg, num_classes=tiny_num_classes, stats=stats).eval()
    scorer = torch.jit.script(_Scorer(loss))
    g = torch.Generator().manual_seed(0)
    width = loss.cls_channels  # seesaw: C+2 logits
    for logits in (
        torch.randn(9, width, generator=g) * 6,
        torch.randn(0, width),
        torch.randn(4, width).double(),
    ):
        scores = scorer(logits)
        assert scores.shape == (logits.shape[0], tiny_num_classes + 1)
        torch.testing.assert_close(scores, loss.activation(logits), rtol=0, atol=0)


def test_scripted_model_saves_loads_and_does_not_train(detection_batch, tiny_detector):
    model = _spread_predictor(
        ltdet.patch(tiny_detector(), cls_loss={"type": "seesaw"}, sampler={"type": "ohem"})
    )
    images = _images()
    eager, _, scripted = _eager_and_scripted(model, images)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # training-only methods are stubs: serialisable
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        _assert_same_detections(eager, loaded(images)[1])
    # the training path is @torch.jit.unused in the scripted model; eager training is unchanged
    loaded.train()
    batch, targets = detection_batch()
    with pytest.raises(Exception, match="unused|not supported|Exception"):
        loaded(batch, targets)
    model.train()
    losses = model(batch, targets)
    assert torch.isfinite(sum(losses.values()))


@pytest.mark.parametrize("predictor", ["cosine", "lws"])
def test_non_linear_classifiers_script(predictor, tiny_detector, tiny_num_classes):
    from ltdet.models.classifiers import CosinePredictor, LWSPredictor

    model = tiny_detector()
    old = model.roi_heads.box_predictor
    if predictor == "cosine":
        model.roi_heads.box_predictor = CosinePredictor(
            old.cls_score.in_features, tiny_num_classes + 1
        )
    else:
        model.roi_heads.box_predictor = LWSPredictor(old)
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.scales.uniform_(0.5, 2.0)
    ltdet.patch(model, cls_loss={"type": "eqlv2"})
    model.roi_heads.score_thresh = 0.0
    eager, scripted, _ = _eager_and_scripted(model, _images())
    _assert_same_detections(eager, scripted)


def test_lds_fds_hooks_do_not_block_scripting(tiny_detector):
    from ltdet.imbalance import build_fds, build_lds

    model = tiny_detector()
    in_features = model.roi_heads.box_predictor.bbox_pred.in_features
    ltdet.patch(
        model,
        cls_loss={"type": "focal"},
        box_loss={"type": "ghmr", "momentum": 0.7},
        lds=build_lds({"enabled": True}, fg_iou_thresh=0.5),
        fds=build_fds({"enabled": True}, in_features, fg_iou_thresh=0.5),
    )
    _spread_predictor(model)
    eager, scripted, _ = _eager_and_scripted(model, _images())
    _assert_same_detections(eager, scripted)


def _tiny_retinanet(num_classes):
    """ltdet's resnet18 RetinaNet with torchvision's transform (`NoResizeTransform` aside)."""
    from ltdet.models.build import build_torchvision_detector

    model = build_torchvision_detector(
        {
            "model": {
                "arch": "retinanet",
                "backbone": "resnet18",
                "norm": "bn",
                "detections_per_img": 50,
                "score_thresh": 1e-3,
            }
        },
        num_classes,
    )
    old = model.transform
    model.transform = GeneralizedRCNNTransform(64, 64, old.image_mean, old.image_std)
    return model


@pytest.mark.parametrize(
    "cls_cfg,box_cfg",
    [
        ({"type": "eqlv2"}, {"type": "giou"}),
        ({"type": "ce"}, None),
        (None, {"type": "ghmr", "momentum": 0.7}),
    ],
    ids=["eqlv2-giou", "ce", "box-only"],
)
def test_scripted_patched_retinanet_detects_as_eager(cls_cfg, box_cfg, tiny_num_classes):
    model = ltdet.patch(_tiny_retinanet(tiny_num_classes), cls_loss=cls_cfg, box_loss=box_cfg)
    eager, scripted, _ = _eager_and_scripted(model, _images())
    _assert_same_detections(eager, scripted)


def test_scripted_mask_rcnn_detects_as_eager(tiny_detector):
    model = _spread_predictor(
        ltdet.patch(tiny_detector("maskrcnn_resnet50_fpn"), cls_loss={"type": "eqlv2"})
    )
    eager, scripted, _ = _eager_and_scripted(model, _images())
    assert all("masks" in d for d in scripted)
    _assert_same_detections(eager, scripted)


def test_build_detector_model_scripts(tiny_num_classes):
    from ltdet.models.build import build_torchvision_detector

    model = build_torchvision_detector(
        {"model": {"arch": "faster_rcnn", "backbone": "resnet18", "norm": "bn"}}, tiny_num_classes
    )
    model = _spread_predictor(ltdet.patch(model, cls_loss={"type": "eqlv2"}))
    eager, scripted, _ = _eager_and_scripted(model, _images())
    assert sum(len(d["boxes"]) for d in eager) > 0  # the comparison below compares something
    _assert_same_detections(eager, scripted)


def test_scripting_logs_nothing_and_leaves_the_eager_model_alone(caplog, tiny_detector):
    model = ltdet.patch(tiny_detector(), cls_loss={"type": "ghmc", "momentum": 0.75})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        torch.jit.script(model.eval())
    assert not [r for r in caplog.records if r.name.startswith("ltdet")]
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
