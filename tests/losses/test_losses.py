"""ltdet.losses: reducer, builder errors and every stateless loss against its paper's equations.

Each reference below is written independently of the library (explicit formulas, often a loop
over the few RoIs / classes), in float64; gradients are checked against hand-derived formulas.
The properties every registered loss must have (shapes, reductions, empty batches, ...) are
tests/losses/test_losses_contract.py's, parametrised over the registry.
"""

import math

import pytest
import torch

from ltdet.imbalance.class_weights import class_balanced_weights
from ltdet.imbalance.las_factors import label_aware_smoothing
from ltdet.losses import LOSSES, build_loss, reduce_loss
from ltdet.losses.federated import federated_class_mask

C = 6  # foreground classes: the default of make_batch and make_stats (tests/conftest.py)
K = C + 1
#: Sigmoid losses whose background column must get exactly zero gradient.
SIGMOID_FOREGROUND = [
    {"type": "focal"},
    {"type": "eql", "lambda_": 0.05},
    {"type": "federated"},
    {"type": "ghmc"},
    {"type": "cb", "base": "sigmoid"},
    {"type": "cb", "base": "focal"},
]

#: The losses the library was specified with; the registry may hold more.
ISSUE_LOSSES = [
    "ce",
    "focal",
    "cb",
    "balanced_softmax",
    "eql",
    "eqlv2",
    "seesaw",
    "seesaw_softmax",
    "federated",
    "ghmc",
    "las",
    "smooth_l1",
    "l1",
    "giou",
    "ghmr",
    "focal_r",
    "balanced_l1",
]


def _grad(loss_value, x):
    (g,) = torch.autograd.grad(loss_value, x)
    return g


def smoothing_targets(labels, eps, num_columns):
    """Soft targets `[N, K]` of label-aware smoothing for integer labels `[N]` in `[0, K)`, given
    each label's smoothing factor `eps [K]` (K >= 2): `1 - eps_y` on y, `eps_y / (K - 1)` on the
    other columns (the loss computes the same without materialising them)."""
    eps_i = eps[labels].unsqueeze(1)
    target = (eps_i / (num_columns - 1)).expand(labels.shape[0], num_columns).clone()
    target.scatter_(1, labels.view(-1, 1), 1.0 - eps_i)
    return target


@pytest.fixture
def build(make_stats):
    """`build(cfg, stats=None)`: the loss in float64, with `make_stats()` unless given stats."""

    def _build(cfg, stats=None):
        return build_loss(
            cfg, num_classes=C, stats=make_stats() if stats is None else stats
        ).double()

    return _build


# ----------------------------------------------------------------------------- reducer


def test_reduce_loss_semantics():
    loss = torch.arange(12.0).view(4, 3)
    w_row = torch.tensor([1.0, 0.0, 2.0, 0.5])
    w_elem = torch.rand(4, 3)
    assert torch.equal(reduce_loss(loss, None, "none"), loss)
    assert torch.equal(reduce_loss(loss, w_row, "none"), loss * w_row[:, None])
    assert torch.equal(reduce_loss(loss, w_elem, "none"), loss * w_elem)
    assert reduce_loss(loss, None, "sum").item() == 66.0
    assert reduce_loss(loss, None, "mean").item() == pytest.approx(66.0 / 4)  # / N rows, not 12
    assert reduce_loss(loss, w_row, "mean", avg_factor=5).item() == pytest.approx(
        (loss * w_row[:, None]).sum().item() / 5
    )
    assert reduce_loss(loss, None, "mean", avg_factor=torch.tensor(11.0)).item() == pytest.approx(
        6.0
    )
    # per-element weight on a per-sample loss: mean over the sample's elements
    assert torch.allclose(reduce_loss(torch.ones(4), w_elem, "none"), w_elem.mean(1))
    with pytest.raises(ValueError, match="reduction must be one of"):
        reduce_loss(loss, None, "avg")
    with pytest.raises(ValueError, match="rows"):
        reduce_loss(loss, torch.ones(3), "sum")


def test_reduce_loss_empty_is_finite_zero():
    empty = torch.zeros(0, 5, requires_grad=True)
    for kwargs in ({}, {"avg_factor": 0}, {"avg_factor": torch.tensor(0.0)}):
        value = reduce_loss(empty * 2, None, "mean", **kwargs)
        assert torch.isfinite(value) and value.item() == 0.0
    value.backward()
    assert empty.grad.shape == (0, 5)


# ----------------------------------------------------------------------------- builder


def test_registry_lists_every_loss_of_the_issue(classification_losses, regression_losses):
    assert set(ISSUE_LOSSES) <= set(LOSSES)  # a loss added later must not fail this test
    assert sorted(LOSSES) == sorted(classification_losses + regression_losses)


def test_unknown_type_lists_valid_types():
    with pytest.raises(ValueError) as e:
        build_loss({"type": "eqlv3"})
    assert "eqlv3" in str(e.value) and "'eqlv2'" in str(e.value) and "'balanced_l1'" in str(e.value)
    with pytest.raises(ValueError, match="'type'"):
        build_loss({"gamma": 2})


def test_unknown_hyper_parameter_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        build_loss({"type": "eqlv2", "gama": 12}, num_classes=C)
    msg = str(e.value)
    assert "gama" in msg and "'gamma'" in msg and "'mu'" in msg and "'alpha'" in msg
    with pytest.raises(ValueError, match="num_classes"):  # injected, never a config key
        build_loss({"type": "focal", "num_classes": 3})


@pytest.mark.parametrize("name", ["cb", "balanced_softmax", "eql", "federated", "las"])
def test_loss_needing_stats_without_stats_is_a_clear_error(name):
    with pytest.raises(ValueError, match="needs class statistics"):
        build_loss({"type": name}, num_classes=C)


def test_num_classes_errors(make_batch, make_stats):
    with pytest.raises(ValueError, match="needs num_classes"):
        build_loss({"type": "eqlv2"})
    with pytest.raises(ValueError, match="num_classes=4 but the class statistics have 6"):
        build_loss({"type": "eql"}, num_classes=4, stats=make_stats())
    assert build_loss({"type": "seesaw"}, stats=make_stats()).num_classes == C  # from stats
    loss = build_loss({"type": "ce"}, num_classes=C)
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="num_classes=6"):
        loss(logits[:, :-1], labels.clamp(max=C - 1))


@pytest.mark.parametrize("name", ["cb", "balanced_softmax", "eql", "federated", "las"])
def test_stats_losses_reject_logits_of_another_width(name, make_batch, make_stats):
    """Built from statistics alone, C comes from the statistics and the logits must have C+1."""
    loss = LOSSES[name](stats=make_stats())
    assert loss.num_classes == C
    logits, labels = make_batch()
    with pytest.raises(ValueError, match=f"num_classes={C} .* got {C} columns"):
        loss(logits[:, :-1], labels.clamp(max=C - 1))
    with pytest.raises(ValueError, match="num_classes=4 but the class statistics have 6"):
        LOSSES[name](stats=make_stats(), num_classes=4)


def test_regression_shape_check():
    with pytest.raises(ValueError, match=r"\[P, 4\]"):
        build_loss({"type": "smooth_l1"})(torch.zeros(3, 4), torch.zeros(3, 5))


@pytest.mark.parametrize("cfg", SIGMOID_FOREGROUND, ids=lambda c: "-".join(map(str, c.values())))
def test_sigmoid_losses_give_background_column_exactly_zero_gradient(cfg, build, make_batch):
    loss = build(cfg).train()
    logits, labels = make_batch(n=16)
    assert loss.use_sigmoid
    grad = _grad(loss(logits, labels), logits)
    assert torch.equal(grad[:, 0], torch.zeros_like(grad[:, 0]))
    assert grad[:, 1:].abs().sum() > 0
    per_element = loss(logits, labels, reduction="none")
    assert per_element.shape == logits.shape and torch.equal(
        per_element[:, 0], torch.zeros(16).double()
    )


def test_softmax_and_sigmoid_activations(build, make_batch):
    logits, _ = make_batch()
    for name in ("ce", "balanced_softmax", "seesaw_softmax", "las", "cb"):
        assert torch.allclose(build({"type": name}).activation(logits), logits.softmax(1))
    for cfg in SIGMOID_FOREGROUND:
        scores = build(cfg).activation(logits)
        fg = torch.sigmoid(logits[:, 1:])
        assert torch.allclose(scores[:, 1:], fg)
        assert torch.allclose(scores[:, 0], 1 - fg.max(1).values)
    scores = build({"type": "eqlv2"}).activation(logits)
    p = torch.sigmoid(logits)
    assert torch.allclose(scores[:, 1:], p[:, 1:] * (1 - p[:, :1]))
    assert torch.allclose(scores[:, 0], p[:, 0])


# ----------------------------------------------------------------------------- softmax family


def test_ce_value_and_gradient(build, make_batch, one_hot):
    logits, labels = make_batch()
    loss = build({"type": "ce"})
    value = loss(logits, labels)
    log_p = logits.detach() - logits.detach().exp().sum(1, keepdim=True).log()
    expected = -sum(log_p[i, labels[i]] for i in range(len(labels))) / len(labels)
    assert torch.allclose(value, expected)
    expected_grad = (logits.detach().softmax(1) - one_hot(labels, K)) / len(labels)
    assert torch.allclose(_grad(value, logits), expected_grad)


def test_balanced_softmax_value_gradient_and_activation(make_batch, make_stats, one_hot):
    stats = make_stats()
    tau, bg = 0.7, 0.75
    loss = build_loss({"type": "balanced_softmax", "tau": tau}, stats=stats).double()
    logits, labels = make_batch()
    n = stats.instance_count.double().clamp(min=1)
    prior = torch.cat([torch.tensor([bg]).double(), (1 - bg) * n / n.sum()])
    assert prior.sum().item() == pytest.approx(1.0)
    adjusted = logits.detach() + tau * prior.log()
    value = loss(logits, labels)
    expected = -(adjusted.log_softmax(1) * one_hot(labels, K)).sum() / len(labels)
    assert torch.allclose(value, expected)
    assert torch.allclose(
        _grad(value, logits), (adjusted.softmax(1) - one_hot(labels, K)) / len(labels)
    )
    assert torch.allclose(loss.activation(logits), logits.softmax(1))  # raw logits at test time


@pytest.mark.parametrize("shape", ["concave", "linear", "convex"])
def test_label_aware_smoothing_factors(shape):
    counts = torch.tensor([5.0, 100.0, 1.0, 50.5])
    eps = label_aware_smoothing(counts, eps_head=0.4, eps_tail=0.1, shape=shape)
    x = torch.tensor([4 / 99, 1.0, 0.0, 0.5])
    h = {
        "concave": torch.sin(math.pi * x / 2),
        "linear": x,
        "convex": 1 - torch.cos(math.pi * x / 2),
    }[shape]
    assert torch.allclose(eps, 0.1 + 0.3 * h)
    assert eps[1].item() == pytest.approx(0.4) and eps[2].item() == pytest.approx(0.1)
    assert torch.allclose(label_aware_smoothing(torch.full((3,), 7.0)), torch.full((3,), 0.4))


def test_las_value_and_gradient_with_explicit_soft_targets(make_batch, make_stats):
    stats = make_stats()
    loss = build_loss({"type": "las", "shape": "linear"}, stats=stats).double()
    logits, labels = make_batch()
    n = stats.instance_count.double()
    eps_fg = 0.1 + 0.3 * (n - n.min()) / (n.max() - n.min())
    eps = torch.cat([torch.tensor([0.4]).double(), eps_fg])  # background smoothed as the head
    target = torch.zeros(len(labels), K, dtype=torch.float64)
    for i, y in enumerate(labels.tolist()):
        for j in range(K):
            target[i, j] = 1 - eps[y] if j == y else eps[y] / (K - 1)
    assert torch.allclose(smoothing_targets(labels, eps, K), target)
    assert torch.allclose(target.sum(1), torch.ones(len(labels), dtype=torch.float64))
    value = loss(logits, labels)
    expected = -(target * logits.detach().log_softmax(1)).sum() / len(labels)
    assert torch.allclose(value, expected)
    assert torch.allclose(_grad(value, logits), (logits.detach().softmax(1) - target) / len(labels))
    assert build_loss({"type": "las", "bg_eps": 0.0}, stats=stats).eps[0].item() == 0.0


def test_class_balanced_weights_modes():
    counts = torch.tensor([1000.0, 100.0, 10.0, 1.0, 0.0])
    beta = 0.99
    eff = torch.tensor(
        [(1 - beta) / (1 - beta ** max(c, 1)) for c in counts.tolist()], dtype=torch.float64
    )
    for mode, raw in (
        ("effective", eff),
        ("inverse", 1 / counts.double().clamp(min=1)),
        ("sqrt_inverse", counts.double().clamp(min=1) ** -0.5),
    ):
        w = class_balanced_weights(counts, mode=mode, beta=beta)
        assert w.sum().item() == pytest.approx(5.0, rel=1e-5)
        assert torch.allclose(w.double(), raw * 5 / raw.sum(), rtol=1e-5)
    # beta -> 0: effective number 1 for every class, i.e. no re-weighting
    assert torch.allclose(class_balanced_weights(counts, beta=0.0), torch.ones(5))
    with pytest.raises(ValueError, match="mode"):
        class_balanced_weights(counts, mode="log")


@pytest.mark.parametrize("base", ["ce", "sigmoid", "focal"])
def test_cb_loss_weights_each_sample_by_its_class(base, make_batch, make_stats, one_hot):
    stats = make_stats()
    beta = 0.999
    loss = build_loss({"type": "cb", "base": base, "beta": beta}, stats=stats).double()
    logits, labels = make_batch(n=16)
    n = stats.instance_count.double().clamp(min=1)
    w = (1 - beta) / (1 - beta**n)
    w = torch.cat([torch.ones(1).double(), w * C / w.sum()])
    wi = w[labels]
    z, y = logits.detach(), one_hot(labels, K)
    p = torch.sigmoid(z)
    if base == "ce":
        per_roi = -(z.log_softmax(1) * y).sum(1)
        grad = wi[:, None] * (z.softmax(1) - y)
    elif base == "sigmoid":
        per_roi = -(y * p.log() + (1 - y) * (1 - p).log())[:, 1:].sum(1)
        grad = wi[:, None] * (p - y)
        grad[:, 0] = 0
    else:
        per_roi = _focal_reference(z, y)[:, 1:].sum(1)
        grad = None
    value = loss(logits, labels)
    assert torch.allclose(value, (wi * per_roi).sum() / 16)
    if grad is not None:
        assert torch.allclose(_grad(value, logits), grad / 16)


# ----------------------------------------------------------------------------- sigmoid family


def _focal_reference(z, y, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(z)
    p_t = y * p + (1 - y) * (1 - p)
    alpha_t = y * alpha + (1 - y) * (1 - alpha)
    return -alpha_t * (1 - p_t) ** gamma * p_t.log()


def test_focal_value_and_hand_derived_gradient(build, make_batch, one_hot):
    alpha, gamma = 0.25, 2.0
    loss = build({"type": "focal"})
    logits, labels = make_batch(n=16)
    z, y = logits.detach(), one_hot(labels, K)
    value = loss(logits, labels)
    assert torch.allclose(value, _focal_reference(z, y)[:, 1:].sum() / 16)
    p = torch.sigmoid(z)
    d_pos = alpha * (1 - p) ** gamma * (gamma * p * p.log() + p - 1)
    d_neg = (1 - alpha) * p**gamma * (p - gamma * (1 - p) * (1 - p).log())
    expected = (y * d_pos + (1 - y) * d_neg) / 16
    expected[:, 0] = 0
    assert torch.allclose(_grad(value, logits), expected)


def test_eql_value_and_gradient(make_batch, make_stats, one_hot):
    stats = make_stats(image_count=(400.0, 90.0, 30.0, 8.0, 2.0, 0.0), num_images=500)
    lam = 0.05  # f = [0.8, 0.18, 0.06, 0.016, 0.004, 0]: the last three are tail classes
    loss = build_loss({"type": "eql", "lambda_": lam}, stats=stats).double()
    logits, labels = make_batch(n=16)
    z = logits.detach()
    f = [c / 500 for c in (400.0, 90.0, 30.0, 8.0, 2.0, 0.0)]
    w = torch.ones(16, C, dtype=torch.float64)
    for i, r in enumerate(labels.tolist()):
        for j in range(C):
            y_ij = 1.0 if r == j + 1 else 0.0
            e_r = 1.0 if r > 0 else 0.0
            t = 1.0 if f[j] < lam else 0.0
            w[i, j] = 1 - e_r * t * (1 - y_ij)
    assert (w == 0).any() and (w == 1).any()
    y = one_hot(labels, K)[:, 1:]
    p = torch.sigmoid(z[:, 1:])
    value = loss(logits, labels)
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    assert torch.allclose(value, (w * bce).sum() / 16)
    grad = _grad(value, logits)
    assert torch.allclose(grad[:, 1:], w * (p - y) / 16)


def test_federated_class_mask_contents_and_sampling_distribution():
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([9.0, 4.0, 1.0, 0.0, 16.0, 1.0, 4.0])  # f_c^power, one class never seen
    log_w = weights.log()
    labels = torch.tensor([0, 2, 2, 0, 5])  # classes 2 and 5 (columns 1, 4) present
    draws, runs = torch.zeros(7), 6000
    for _ in range(runs):
        mask = federated_class_mask(labels, log_w, 4, torch.rand(7, generator=gen))
        assert mask[1] and mask[4] and not mask[3] and mask.sum() == 4
        draws += mask.float()
    # two negatives drawn without replacement from the other classes, probability proportional
    # to w: inclusion probability P(c) = w_c / W + sum_{a != c} w_a / W * w_c / (W - w_a)
    rest = [0, 2, 5, 6]
    total = sum(weights[a].item() for a in rest)
    for c in rest:
        p = weights[c] / total + sum(
            weights[a] / total * weights[c] / (total - weights[a]) for a in rest if a != c
        )
        assert draws[c].item() / runs == pytest.approx(p.item(), abs=0.025)
    # more present classes than the budget: all of them are kept, nothing else
    many = torch.tensor([1, 2, 3, 5, 7])
    kept = federated_class_mask(many, log_w, 2, torch.rand(7, generator=gen))
    assert kept.nonzero().flatten().tolist() == [0, 1, 2, 4, 6]


def test_federated_loss_value_gradient_and_reproducibility(make_batch, make_stats, one_hot):
    stats = make_stats()
    cfg = {"type": "federated", "num_classes_sampled": 3, "power": 0.5, "seed": 7}
    loss = build_loss(cfg, stats=stats).double()
    logits, labels = make_batch(n=10)
    labels = torch.tensor([0, 0, 2, 0, 2, 0, 0, 0, 2, 0])
    value = loss(logits, labels)
    grad = _grad(value, logits)
    trained = grad[:, 1:].abs().sum(0) > 0
    assert trained[1] and trained.sum() == 3 and not trained[5]  # class 6 has zero images
    mask = trained.double()
    z, y = logits.detach()[:, 1:], one_hot(labels, K)[:, 1:]
    p = torch.sigmoid(z)
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    assert torch.allclose(value, (bce * mask).sum() / 10)
    assert torch.allclose(grad[:, 1:], mask * (p - y) / 10)
    again = build_loss(cfg, stats=stats).double()
    assert torch.equal(_grad(again(logits, labels), logits)[:, 1:].abs().sum(0) > 0, trained)


def test_ghmc_value_and_gradient(build, ghm_reference_weights, make_batch, one_hot):
    loss = build({"type": "ghmc", "bins": 10})
    logits, labels = make_batch(n=16)
    z, y = logits.detach()[:, 1:], one_hot(labels, K)[:, 1:]
    p = torch.sigmoid(z)
    w, _ = ghm_reference_weights((p - y).abs(), 16, 10)
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    value = loss(logits, labels)
    # reduction "mean" equals the paper's sum_i beta_i L_i / N_valid with beta = N_valid / GD
    n_valid = z.numel()
    beta = w * n_valid / 16
    assert torch.allclose(value, (beta * bce).sum() / n_valid)
    assert torch.allclose(_grad(value, logits)[:, 1:], w * (p - y) / 16)


def test_ghmc_zero_weight_elements_are_not_counted(build, make_batch):
    loss = build({"type": "ghmc", "bins": 5})
    logits, labels = make_batch(n=8)
    weight = torch.ones(8, dtype=torch.float64)
    weight[:3] = 0
    value = loss(logits, labels, weight=weight, reduction="sum")
    kept = loss(logits[3:], labels[3:], reduction="sum")
    assert torch.allclose(value, kept * 8 / 5)  # same bins, weight N / GD with N = 8 vs 5


# ----------------------------------------------------------------------------- regression


def test_smooth_l1_and_l1_value_and_gradient(build, make_deltas):
    pred, target = make_deltas(p=12)
    d = (pred - target).detach()
    beta = 1.0 / 9
    assert build({"type": "smooth_l1"}).beta == pytest.approx(beta)
    value = build({"type": "smooth_l1"})(pred, target, reduction="sum")
    expected = torch.where(d.abs() < beta, 0.5 * d**2 / beta, d.abs() - 0.5 * beta)
    assert (d.abs() < beta).any() and (d.abs() >= beta).any()
    assert torch.allclose(value, expected.sum())
    assert torch.allclose(_grad(value, pred), torch.where(d.abs() < beta, d / beta, d.sign()))
    value = build({"type": "l1"})(pred, target)
    assert torch.allclose(value, d.abs().sum() / 12)
    assert torch.allclose(_grad(value, pred), d.sign() / 12)


def _giou_reference(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    hull = (torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])) * (
        torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])
    )
    return 1 - (inter / union - (hull - union) / hull)


def test_giou_value_and_gradient_against_naive_implementation(build, make_boxes):
    loss = build({"type": "giou"})
    assert loss.needs_boxes
    pred, target = make_boxes(p=12)
    value = loss(pred, target, reduction="none")
    ref = _giou_reference(pred, target)
    assert (ref > 1).any() and (ref < 1).any()  # disjoint and overlapping pairs
    assert torch.allclose(value, ref)
    assert torch.allclose(_grad(value.sum(), pred), _grad(ref.sum(), pred))


def test_ghmr_value_and_gradient(build, ghm_reference_weights, make_deltas):
    mu = 0.02
    loss = build({"type": "ghmr", "mu": mu, "bins": 10})
    pred, target = make_deltas(p=12)
    d = (pred - target).detach()
    root = (d**2 + mu**2).sqrt()
    w, _ = ghm_reference_weights(d.abs() / root, 12, 10)
    value = loss(pred, target)
    assert torch.allclose(value, (w * (root - mu)).sum() / 12)
    assert torch.allclose(_grad(value, pred), w * d / root / 12)


@pytest.mark.parametrize("activate", ["sigmoid", "tanh"])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_focal_r_value_and_hand_derived_gradient(activate, gamma, build, make_deltas):
    beta = 0.2
    loss = build({"type": "focal_r", "beta": beta, "gamma": gamma, "activate": activate})
    pred, target = make_deltas(p=12)
    d = (pred - target).detach()
    e = d.abs()
    if activate == "sigmoid":
        s = torch.sigmoid(beta * e)
        m, dm = 2 * s - 1, 2 * beta * s * (1 - s)
    else:
        m, dm = torch.tanh(beta * e), beta * (1 - torch.tanh(beta * e) ** 2)
    value = loss(pred, target, reduction="sum")
    assert torch.allclose(value, (e * m**gamma).sum())
    expected = d.sign() * (m**gamma + e * gamma * m ** (gamma - 1) * dm)
    assert torch.allclose(_grad(value, pred), expected)


def test_balanced_l1_value_gradient_and_continuity(build, make_deltas):
    alpha, gamma, beta = 0.5, 1.5, 1.0
    loss = build({"type": "balanced_l1"})
    pred, target = make_deltas(p=12)
    d = (pred - target).detach()
    x = d.abs()
    b = math.exp(gamma / alpha) - 1
    assert alpha * math.log(b + 1) == pytest.approx(gamma)  # the paper's constraint on b
    value = loss(pred, target, reduction="sum")
    inner = alpha / b * (b * x + 1) * torch.log(b * x / beta + 1) - alpha * x
    outer = gamma * x + gamma / b - alpha * beta
    assert (x < beta).any() and (x >= beta).any()
    assert torch.allclose(value, torch.where(x < beta, inner, outer).sum())
    grad = torch.where(x < beta, alpha * torch.log(b * x / beta + 1), torch.full_like(x, gamma))
    assert torch.allclose(_grad(value, pred), d.sign() * grad)
    at_beta = [torch.full((1, 4), beta + s, dtype=torch.float64) for s in (-1e-9, 1e-9)]
    left, right = (loss(v, torch.zeros_like(v), reduction="sum").item() for v in at_beta)
    assert left == pytest.approx(right, abs=1e-6)


def test_federated_power_zero_samples_uniformly_among_seen_classes(make_batch, make_stats):
    # a budget of all C = 6 classes: the one without training images must still be left out
    loss = build_loss(
        {"type": "federated", "power": 0.0, "num_classes_sampled": 6}, stats=make_stats()
    )
    assert torch.equal(loss.log_weight[:5], torch.zeros(5))
    assert loss.log_weight[5].item() == float("-inf")  # never seen: never a sampled negative
    logits, labels = make_batch(n=6, dtype=torch.float32)
    grad = _grad(loss(logits, torch.zeros_like(labels)), logits)
    assert torch.equal(grad[:, 1:].abs().sum(0) > 0, torch.tensor([True] * 5 + [False]))
