"""Stateful losses (EQLv2, seesaw, GHM with momentum) over several training steps against naive
re-implementations of their papers, plus train/eval behaviour and state_dict round trips.

Seesaw here is `seesaw_softmax`, ltdet's single-softmax variant (background excluded from S);
the authors' `seesaw` with its objectness branch is checked against mmdetection in
tests/losses/test_seesaw_objectness.py, and takes part in the generic state tests below."""

import io
import math

import pytest
import torch

from ltdet.losses import build_loss
from ltdet.losses.eqlv2 import eqlv2_gradient_sums

C = 6  # foreground classes: the default of make_batch (tests/conftest.py)
K = C + 1


def _grad(value, x):
    (g,) = torch.autograd.grad(value, x)
    return g


class EQLv2Reference:
    """Tan et al. 2021, eqs. 5-9, with explicit loops over classes."""

    def __init__(self, gamma, mu, alpha):
        self.gamma, self.mu, self.alpha = gamma, mu, alpha
        self.pos = [0.0] * C
        self.neg = [0.0] * C
        self.ratio = [100.0] * C

    def step(self, z, labels):
        n = z.shape[0]
        y = torch.nn.functional.one_hot(labels, K).to(torch.float64)
        p = torch.sigmoid(z)
        w = torch.ones(n, K, dtype=torch.float64)
        for j in range(1, K):
            q = 1 / (1 + math.exp(-self.gamma * (self.ratio[j - 1] - self.mu)))
            r = 1 + self.alpha * (1 - q)
            w[:, j] = r * y[:, j] + q * (1 - y[:, j])
        bce = -(y * p.log() + (1 - y) * (1 - p).log())
        loss = (w * bce).sum() / n
        grad = w * (p - y) / n
        for j in range(1, K):
            g = (p[:, j] - y[:, j]).abs() * w[:, j]
            self.pos[j - 1] += float((g * y[:, j]).sum())
            self.neg[j - 1] += float((g * (1 - y[:, j])).sum())
            self.ratio[j - 1] = self.pos[j - 1] / (self.neg[j - 1] + 1e-10)
        return loss, grad


def test_eqlv2_several_steps_match_the_paper(make_batch, one_hot):
    gamma, mu, alpha = 12.0, 0.8, 4.0
    cfg = {"type": "eqlv2", "gamma": gamma, "mu": mu, "alpha": alpha}
    loss = build_loss(cfg, num_classes=C).double().train()
    ref = EQLv2Reference(gamma, mu, alpha)
    first_weights_all_one = True
    for step in range(4):
        # few RoIs with confident positives, so some classes reach g > mu and others do not
        logits, labels = make_batch(n=10, seed=step, bg_fraction=0.3)
        value = loss(logits, labels)
        expected, expected_grad = ref.step(logits.detach(), labels)
        assert torch.allclose(value, expected), step
        grad = _grad(value, logits)
        assert torch.allclose(grad, expected_grad), step
        if step == 0:
            plain_bce_grad = (torch.sigmoid(logits.detach()) - one_hot(labels, K)) / 10
            first_weights_all_one = torch.allclose(grad, plain_bce_grad)
        assert torch.allclose(loss.pos_grad, torch.tensor(ref.pos, dtype=loss.pos_grad.dtype))
        assert torch.allclose(loss.neg_grad, torch.tensor(ref.neg, dtype=loss.neg_grad.dtype))
        assert torch.allclose(loss.pos_neg, torch.tensor(ref.ratio, dtype=loss.pos_neg.dtype))
    assert first_weights_all_one
    assert loss.pos_grad.gt(0).any() and loss.neg_grad.gt(0).all()
    # the state changes the loss: same batch, fresh loss vs trained state
    logits, labels = make_batch(n=10, seed=9)
    fresh = build_loss({"type": "eqlv2"}, num_classes=C).double()
    assert not torch.allclose(loss(logits, labels), fresh(logits, labels))


def test_eqlv2_statistics_float32_with_confident_positives():
    """float32 gradient sums equal float64 ones when the true columns are confident: neither sum
    is a difference of large sums (1204 columns, 25 % foreground at p ~ 0.88)."""
    g = torch.Generator().manual_seed(0)
    n, k = 1024, 1204
    labels = torch.randint(1, 30, (n,), generator=g)
    labels[:768] = 0
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) - 6.0
    logits[torch.arange(n), labels] += 8.0
    ones = torch.ones(k, dtype=torch.float64)
    p64, n64 = eqlv2_gradient_sums(logits, labels, ones, ones)
    p32, n32 = eqlv2_gradient_sums(logits.float(), labels, ones.float(), ones.float())
    assert torch.allclose(n32.double(), n64, rtol=1e-5, atol=0)
    assert torch.allclose(p32.double(), p64, rtol=1e-5, atol=0)


def test_eqlv2_objectness_column_targets_background_and_keeps_unit_weights(make_batch):
    loss = build_loss({"type": "eqlv2"}, num_classes=C).double().train()
    loss.pos_neg.fill_(0.1)  # strongly suppressed negatives for every class
    logits, labels = make_batch(n=8)
    grad = _grad(loss(logits, labels), logits)
    p0 = torch.sigmoid(logits.detach()[:, 0])
    assert torch.allclose(grad[:, 0], (p0 - (labels == 0).double()) / 8)  # weight 1, target = is-bg


def test_eqlv2_weight_masks_gradient_statistics(make_batch):
    loss = build_loss({"type": "eqlv2"}, num_classes=C).double().train()
    logits, labels = make_batch(n=8)
    weight = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1], dtype=torch.float64)
    loss(logits, labels, weight=weight)
    other = build_loss({"type": "eqlv2"}, num_classes=C).double().train()
    keep = weight.bool()
    other(logits[keep], labels[keep])
    assert torch.allclose(loss.pos_grad, other.pos_grad) and torch.allclose(
        loss.neg_grad, other.neg_grad
    )


class SeesawReference:
    """Wang et al. 2021, eqs. 2-5, per RoI and per class, background excluded from S (the
    `seesaw_softmax` variant)."""

    def __init__(self, p, q, eps):
        self.p, self.q, self.eps = p, q, eps
        self.counts = [0.0] * C

    def step(self, z, labels):
        for y in labels.tolist():
            if y > 0:
                self.counts[y - 1] += 1
        sigma = z.softmax(1)
        n = z.shape[0]
        total, grad = 0.0, torch.zeros_like(z)
        for r in range(n):
            i = int(labels[r])
            s = [1.0] * K
            if i > 0:
                for j in range(1, K):
                    if j == i:
                        continue
                    ni, nj = max(self.counts[i - 1], 1.0), max(self.counts[j - 1], 1.0)
                    m = (nj / ni) ** self.p if nj < ni else 1.0
                    ratio = sigma[r, j].item() / max(sigma[r, i].item(), self.eps)
                    c = ratio**self.q if ratio > 1 else 1.0
                    s[j] = m * c
            e = z[r].exp()
            denom = sum(s[j] * e[j] for j in range(K) if j != i) + e[i]
            total += -math.log(e[i] / denom)
            for j in range(K):
                grad[r, j] = (e[i] / denom - 1) if j == i else s[j] * e[j] / denom
        return total / n, grad / n


def test_seesaw_softmax_several_steps_match_the_paper():
    p, q, eps = 0.8, 2.0, 1e-2
    loss = (
        build_loss({"type": "seesaw_softmax", "p": p, "q": q, "eps": eps}, num_classes=C)
        .double()
        .train()
    )
    ref = SeesawReference(p, q, eps)
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        logits = (2 * torch.randn(10, K, generator=g)).double().requires_grad_(True)
        # skewed labels: class 1 frequent, class 5 rare, so the mitigation factor matters
        labels = torch.tensor([0, 1, 1, 1, 2, 0, 1, 5 if step % 2 else 3, 2, 0])
        value = loss(logits, labels)
        expected, expected_grad = ref.step(logits.detach(), labels)
        assert value.item() == pytest.approx(expected, rel=1e-9)
        assert torch.allclose(_grad(value, logits), expected_grad)
        assert torch.equal(loss.cum_samples, torch.tensor(ref.counts, dtype=torch.float64))
    assert loss.cum_samples.tolist() == [16.0, 8.0, 2.0, 0.0, 2.0, 0.0]
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert not torch.allclose(loss(logits, labels), plain)


def test_seesaw_softmax_background_rows_are_plain_cross_entropy(make_batch):
    loss = build_loss({"type": "seesaw_softmax"}, num_classes=C).double().train()
    loss.cum_samples.copy_(torch.tensor([1000.0, 1, 1, 1, 1, 1]))
    logits, _ = make_batch(n=6)
    labels = torch.zeros(6, dtype=torch.long)
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(loss(logits, labels, reduction="none"), expected)


@pytest.mark.parametrize("kind", ["ghmc", "ghmr"])
def test_ghm_momentum_state_evolution(
    kind, ghm_reference_weights, make_batch, make_deltas, one_hot
):
    bins, momentum = 5, 0.75
    loss = (
        build_loss({"type": kind, "bins": bins, "momentum": momentum}, num_classes=C)
        .double()
        .train()
    )
    acc = torch.zeros(bins, dtype=torch.float64)
    for step in range(4):
        if kind == "ghmc":
            x, labels = make_batch(n=8, seed=step)
            y = one_hot(labels, K)[:, 1:]
            p = torch.sigmoid(x.detach()[:, 1:])
            g, elem, dloss = (p - y).abs(), -(y * p.log() + (1 - y) * (1 - p).log()), p - y
        else:
            x, labels = make_deltas(p=8, seed=step)
            d = (x - labels).detach()
            root = (d**2 + 0.02**2).sqrt()
            g, elem, dloss = d.abs() / root, root - 0.02, d / root
        w, acc = ghm_reference_weights(g, 8, bins, acc, momentum)
        value = loss(x, labels)
        assert torch.allclose(value, (w * elem).sum() / 8), step
        grad = _grad(value, x)
        assert torch.allclose(grad if kind == "ghmr" else grad[:, 1:], w * dloss / 8), step
        assert torch.allclose(loss.density.acc_sum.double(), acc), step
    assert (acc > 0).sum() >= 2
    # eval mode: the EMA is used but not advanced
    loss.eval()
    before = loss.density.acc_sum.clone()
    loss(x, labels)
    assert torch.equal(loss.density.acc_sum, before)


@pytest.fixture
def run_steps(make_batch, make_deltas):
    """`run_steps(loss, steps=3)`: train-mode forwards on seeded batches."""

    def _run_steps(loss, steps=3):
        for step in range(steps):
            if loss.__class__.__name__ == "GHMRLoss":
                loss(*make_deltas(p=8, seed=step))
            else:
                loss(*make_batch(n=10, seed=step, num_columns=loss.cls_channels))

    return _run_steps


@pytest.mark.parametrize(
    "cfg",
    [
        {"type": "eqlv2"},
        {"type": "seesaw"},
        {"type": "seesaw_softmax"},
        {"type": "ghmc", "momentum": 0.75},
        {"type": "ghmr", "momentum": 0.7},
    ],
    ids=lambda c: c["type"],
)
def test_state_survives_state_dict_round_trip(cfg, make_batch, make_deltas, run_steps):
    loss = build_loss(cfg, num_classes=C).double().train()
    run_steps(loss)
    buf = io.BytesIO()
    torch.save(loss.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert state and all(v.abs().sum() > 0 for k, v in state.items() if k != "pos_neg")
    restored = build_loss(cfg, num_classes=C).double().train()
    restored.load_state_dict(state)
    for name, value in loss.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    if cfg["type"] == "ghmr":
        batch = make_deltas(p=8, seed=11)
    else:
        batch = make_batch(n=10, seed=11, num_columns=loss.cls_channels)
    assert torch.equal(loss(*batch), restored(*batch))


@pytest.mark.parametrize(
    "cfg",
    [
        {"type": "eqlv2"},
        {"type": "seesaw"},
        {"type": "seesaw_softmax"},
        {"type": "ghmc", "momentum": 0.75},
    ],
    ids=lambda c: c["type"],
)
def test_eval_mode_does_not_update_state(cfg, run_steps):
    loss = build_loss(cfg, num_classes=C).double().eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    run_steps(loss)
    for k, v in loss.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stateful_losses_accept_half_precision_logits(make_batch):
    for cfg in (
        {"type": "eqlv2"},
        {"type": "seesaw"},
        {"type": "seesaw_softmax"},
        {"type": "ghmc", "momentum": 0.75},
    ):
        loss = build_loss(cfg, num_classes=C).train()
        reference = build_loss(cfg, num_classes=C).train()
        logits, labels = make_batch(n=10, dtype=torch.float16, num_columns=loss.cls_channels)
        value = loss(logits, labels)
        expected = reference(logits.detach().float(), labels)
        assert torch.isfinite(value) and value.item() == pytest.approx(expected.item(), rel=2e-2)
        value.backward()
        for name, buf in loss.state_dict().items():
            assert torch.allclose(buf.double(), reference.state_dict()[name].double(), rtol=2e-2), (
                name
            )
