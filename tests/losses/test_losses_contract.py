"""The loss contract, checked for every entry of the registry (`ltdet.losses.LOSSES`).

A loss registered in `LOSSES` is covered here without editing this file: it is built from its
default config (with small class statistics), fed a seeded batch of the inputs its kind takes
(logits `[N, cls_channels]` and labels for a classification loss; box deltas, or decoded boxes
when `needs_boxes`, for a regression loss), and must honour the template `LossModule.forward`
owns: input checks, per-element shape, the reductions, weights, `avg_factor`, `loss_weight`,
empty batches, `[N, C+1]` scores and the declared attributes. A loss whose inputs are of
another form adds its input maker to `SPECIAL_INPUTS`. Each loss's values against its paper are
tests/losses/test_losses.py's.
"""

import copy
import inspect

import pytest
import torch

from ltdet.losses import (
    LOSSES,
    ClassificationLoss,
    LossModule,
    RegressionLoss,
    SigmoidClassificationLoss,
    build_loss,
    hyper_parameters,
)

C = 6  # foreground classes: the default of make_batch and make_stats (tests/conftest.py)
ALL = sorted(LOSSES)
#: The registry's losses by kind, read from `LOSSES` (a new loss joins them without a test edit);
#: module constants because `parametrize` needs them at collection, where fixtures are not.
CLASSIFICATION = sorted(n for n, cls in LOSSES.items() if issubclass(cls, ClassificationLoss))
REGRESSION = sorted(n for n, cls in LOSSES.items() if issubclass(cls, RegressionLoss))
SIGMOID_FOREGROUND = sorted(
    n for n, cls in LOSSES.items() if issubclass(cls, SigmoidClassificationLoss)
)

#: name -> maker(loss) -> (input, target), for a loss whose inputs the defaults below do not fit.
SPECIAL_INPUTS = {
    # side distributions [P, 4, reg_max + 1] and distances [P, 4] in bin units
    "dfl": lambda loss: (
        torch.randn(
            9, 4, loss.reg_max + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        ).requires_grad_(True),
        torch.rand(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        * loss.reg_max,
    ),
}


def _grad(loss_value, x):
    (g,) = torch.autograd.grad(loss_value, x)
    return g


@pytest.fixture
def build(make_stats):
    """`build(cfg, stats=None)`: the loss in float64, given `make_stats()` unless `stats`."""

    def _build(cfg, stats=None):
        stats = make_stats() if stats is None else stats
        return build_loss(cfg, num_classes=C, stats=stats).double()

    return _build


@pytest.fixture
def inputs(make_batch, make_boxes, make_deltas):
    """`inputs(name, loss)`: a seeded batch the loss accepts; the input requires grad."""

    def _inputs(name, loss):
        if name in SPECIAL_INPUTS:
            return SPECIAL_INPUTS[name](loss)
        if isinstance(loss, RegressionLoss):
            return make_boxes() if loss.needs_boxes else make_deltas()
        return make_batch(num_columns=loss.cls_channels)

    return _inputs


def _needs_stats(cls):
    """The loss's constructor takes class statistics without a default."""
    param = inspect.signature(cls.__init__).parameters.get("stats")
    return param is not None and param.default is inspect.Parameter.empty


# ----------------------------------------------------------------------------- declared contract


def test_every_loss_is_a_classification_or_a_regression_loss():
    assert sorted(CLASSIFICATION + REGRESSION) == ALL
    assert not set(CLASSIFICATION) & set(REGRESSION)


@pytest.mark.parametrize("name", ALL)
def test_declared_attributes_and_the_template(name, build):
    loss = build({"type": name})
    cls = type(loss)
    assert isinstance(loss, LossModule)
    # the template is the base's: a loss writes elementwise (and at most the narrow hook)
    assert cls.forward is LossModule.forward
    assert cls.elementwise is not LossModule.elementwise
    assert isinstance(loss.loss_weight, float) and loss.loss_weight == 1.0
    assert isinstance(loss.self_normalising, bool)
    if isinstance(loss, ClassificationLoss):
        assert isinstance(loss.use_sigmoid, bool)
        assert loss.num_classes == C
        assert isinstance(loss.cls_channels, int) and loss.cls_channels >= C + 1
        assert loss.cls_channels == loss.get_cls_channels(C)
        assert callable(loss.activation)
    else:
        assert isinstance(loss, RegressionLoss)
        assert isinstance(loss.needs_boxes, bool)
    for key in ("num_classes", "stats"):  # injected by the builder, never config keys
        assert key not in hyper_parameters(cls)
    assert "loss_weight" in hyper_parameters(cls)


@pytest.mark.parametrize("name", sorted(n for n, cls in LOSSES.items() if _needs_stats(cls)))
def test_losses_built_from_statistics_check_them(name, make_stats):
    with pytest.raises(ValueError, match="needs class statistics"):
        build_loss({"type": name}, num_classes=C)
    with pytest.raises(ValueError, match="num_classes=4 but the class statistics have 6"):
        build_loss({"type": name}, num_classes=4, stats=make_stats())
    assert build_loss({"type": name}, stats=make_stats()).num_classes == C


# ------------------------------------------------------------------------ values and reductions


@pytest.mark.parametrize("name", ALL)
def test_value_shape_and_finite(name, build, inputs):
    loss = build({"type": name}).train()
    x, y = inputs(name, loss)
    none = loss(x, y, reduction="none")
    assert none.shape[0] == x.shape[0] and none.dim() in (1, 2)
    if none.dim() == 2:
        assert none.shape == x.shape  # per logit / per coordinate
    assert torch.isfinite(none).all()
    value = loss(x, y)
    assert value.dim() == 0 and torch.isfinite(value)
    assert torch.isfinite(_grad(value, x)).all()


@pytest.mark.parametrize("name", CLASSIFICATION + REGRESSION)
def test_reductions_are_consistent(name, build, inputs):
    template = build({"type": name}).eval()  # eval: stateful losses keep their state fixed
    x, y = inputs(name, template)
    n = x.shape[0]
    weight = torch.rand(n, dtype=torch.float64) + 0.5

    def run(**kwargs):
        # a fresh copy per call: a loss that draws (federated's negatives) draws the same sample
        return copy.deepcopy(template)(x, y, **kwargs).detach()

    none = run(reduction="none")
    assert none.shape[0] == n
    assert torch.allclose(run(reduction="sum"), none.sum())
    assert torch.allclose(run(reduction="mean"), none.sum() / n)
    assert torch.allclose(run(reduction="mean", avg_factor=3.5), none.sum() / 3.5)
    assert torch.allclose(run(reduction="mean", avg_factor=torch.tensor(3.5)), none.sum() / 3.5)
    weighted = run(reduction="none", weight=weight)
    assert torch.allclose(weighted, none * weight.view(-1, *([1] * (none.dim() - 1))))
    element_weight = torch.rand(none.shape, dtype=torch.float64) + 0.5
    assert torch.allclose(run(reduction="none", weight=element_weight), none * element_weight)
    with pytest.raises(ValueError, match="avg_factor"):
        run(reduction="sum", avg_factor=2.0)


@pytest.mark.parametrize("name", ALL)
def test_loss_weight_scales_the_reduced_loss(name, build, inputs):
    plain = build({"type": name}).eval()
    scaled = build({"type": name, "loss_weight": 2.5}).eval()
    assert scaled.loss_weight == 2.5
    x, y = inputs(name, plain)
    for reduction in ("none", "sum", "mean"):
        assert torch.allclose(
            copy.deepcopy(scaled)(x, y, reduction=reduction),
            2.5 * copy.deepcopy(plain)(x, y, reduction=reduction),
        )


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_labels_out_of_range_are_rejected(name, build, make_batch):
    loss = build({"type": name})
    logits, labels = make_batch(num_columns=loss.cls_channels)
    for bad in (C + 1, -1):
        labels_bad = labels.clone()
        labels_bad[3] = bad
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\]"):
            loss(logits, labels_bad)
    with pytest.raises(ValueError, match="integer"):
        loss(logits, labels.float())


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_empty_batch_and_all_background(name, build, make_batch):
    loss = build({"type": name}).train()
    logits, labels = make_batch(num_columns=loss.cls_channels)
    empty = logits[:0]
    for reduction in ("mean", "sum"):
        value = loss(empty, labels[:0], reduction=reduction)
        assert torch.isfinite(value) and value.item() == 0.0
        assert _grad(value, logits).abs().sum().item() == 0.0
    assert loss(empty, labels[:0], reduction="none").shape[0] == 0
    value = loss(logits, torch.zeros_like(labels))  # RoIs but no positives
    assert torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(_grad(value, logits)).all()
    assert loss.activation(logits).shape == (logits.shape[0], C + 1)  # scores: C+1 for every loss
    assert loss.activation(empty).shape == (0, C + 1)


@pytest.mark.parametrize("name", REGRESSION)
def test_regression_empty_batch(name, build, inputs):
    loss = build({"type": name}).train()
    pred, target = inputs(name, loss)
    for reduction in ("mean", "sum"):
        value = loss(pred[:0], target[:0], reduction=reduction)
        assert torch.isfinite(value) and value.item() == 0.0
        assert _grad(value, pred).abs().sum().item() == 0.0


@pytest.mark.parametrize("name", SIGMOID_FOREGROUND)
def test_sigmoid_foreground_losses_leave_column_zero_untrained(name, build, make_batch):
    loss = build({"type": name}).train()
    assert loss.use_sigmoid
    logits, labels = make_batch(n=16, num_columns=loss.cls_channels)
    grad = _grad(loss(logits, labels), logits)
    assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))
    per_element = loss(logits, labels, reduction="none")
    assert per_element.shape == logits.shape
    assert torch.equal(per_element[:, 0], torch.zeros(16, dtype=per_element.dtype))


# ----------------------------------------------------------------------------- extending


class _SquaredErrorLoss(ClassificationLoss):
    """A new loss as `ltdet.losses.base` describes one: a constructor and an element-wise
    function."""

    def __init__(self, *, num_classes=None, loss_weight=1.0):
        super().__init__(num_classes=num_classes, loss_weight=loss_weight)

    def elementwise(self, logits, labels):
        target = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return (logits.softmax(dim=1) - target).square()


def test_a_new_loss_is_one_class_and_one_registry_line(monkeypatch, make_batch):
    monkeypatch.setitem(LOSSES, "squared_error", _SquaredErrorLoss)
    loss = build_loss({"type": "squared_error", "loss_weight": 2.0}, num_classes=C).double()
    logits, labels = make_batch()
    none = loss(logits, labels, reduction="none")
    assert none.shape == logits.shape
    expected = (logits.softmax(1) - torch.nn.functional.one_hot(labels, C + 1)).square()
    assert torch.allclose(none, 2.0 * expected)
    assert torch.allclose(loss(logits, labels), 2.0 * expected.sum() / logits.shape[0])
    with pytest.raises(ValueError, match="labels must lie"):
        loss(logits, labels.clamp(max=C) + 1)
    with pytest.raises(ValueError, match="unknown key 'gamma'"):
        build_loss({"type": "squared_error", "gamma": 2.0}, num_classes=C)
