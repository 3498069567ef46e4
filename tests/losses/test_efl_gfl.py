"""EFL / EQFL (Li et al., CVPR 2022; ModelTC/EOD) and GFL's QFL / DFL (Li et al., NeurIPS 2020;
implus/GFocal, mmdetection) against independent references written from the authors' code.

The references follow the authors' formulation, not ltdet's: EFL and EQFL see only the C
foreground columns (EOD's classifier has no background column; a background anchor is an
all-zero one-hot row), compute positives and negatives separately, and get their gradient
statistics the way EOD's backward hook does: `|dL/dz|` of the loss actually back-propagated
(autograd on the reference), split by the one-hot targets, summed and clipped to [0, 1]. QFL
overwrites the negatives' term at the positives as GFocal does; DFL takes the two cross-entropies
per side as the authors do. ltdet's versions use closed-form gradients, so the gradient
comparisons below also check those formulas. The RetinaNet part checks QFL's IoU targets, the
distribution head's loss against GFL's `loss_single` and its integral decoding, images without
boxes, TorchScript, and the synthetic / LVIS v1 configs against the authors' recipes.
"""

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchvision.ops import box_iou

from ltdet.config import load_config
from ltdet.losses import build_loss
from ltdet.losses.efl import EqualizedFocalLoss, EqualizedQualityFocalLoss
from ltdet.losses.focal import FocalLoss
from ltdet.losses.gfl import DistributionFocalLoss, QualityFocalLoss, distribution_integral
from ltdet.models import build_detector
from ltdet.models.build import build_torchvision_detector
from ltdet.models.retinanet import (
    LTRetinaNet,
    LTRetinaNetDistributionHead,
    LTRetinaNetHead,
    anchor_quality,
    decode_distribution,
    patch_retinanet,
)
from ltdet.models.retinanet_parts import dense_foreground_weights

C = 6  # foreground classes: the default of make_batch (tests/conftest.py)
K = C + 1
GAMMA_B, SCALE, ALPHA = 2.0, 8.0, 0.25


def _grad(value, x):
    (g,) = torch.autograd.grad(value, x)
    return g


def _quality(n, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(n, generator=g, dtype=torch.float64)


def _weights(n, seed):
    g = torch.Generator().manual_seed(2000 + seed)
    return (0.2 + torch.rand(n, generator=g)).to(torch.float64)


# ---------------------------------------------------------------- references (authors' algebra)


def efl_reference(z, labels, pos_neg, gamma_b=GAMMA_B, scale=SCALE, alpha=ALPHA):
    """EOD's EqualizedFocalLoss on the C foreground columns: `[N, C]`, column by column."""
    x = z[:, 1:]
    n = x.shape[0]
    out = []
    for j in range(C):
        y = (labels == j + 1).to(x.dtype)
        p = torch.sigmoid(x[:, j])
        pt = p * y + (1 - p) * (1 - y)
        ff = gamma_b + scale * (1 - float(pos_neg[j]))  # a constant: detached in EOD
        wf = ff / gamma_b
        loss = -torch.log(pt) * (1 - pt) ** ff * wf
        if alpha >= 0:
            loss = loss * (alpha * y + (1 - alpha) * (1 - y))
        out.append(loss)
    assert len(out) == C and out[0].shape == (n,)
    return torch.stack(out, dim=1)


def eqfl_reference(z, labels, quality, pos_neg, gamma_b=GAMMA_B, scale=SCALE):
    """EOD's EqualizedQualityFocalLoss: negatives first, then the positives overwritten."""
    x = z[:, 1:]
    p = torch.sigmoid(x)
    ff = torch.tensor([gamma_b + scale * (1 - float(g)) for g in pos_neg], dtype=x.dtype)
    wf = ff / gamma_b
    loss = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * p.pow(ff)
    loss = [list(row) for row in loss]
    for i in range(x.shape[0]):
        j = int(labels[i]) - 1
        if j >= 0:
            q = quality[i]
            loss[i][j] = F.binary_cross_entropy_with_logits(x[i, j], q) * (q - p[i, j]).abs().pow(
                ff[j]
            )
    return torch.stack([torch.stack(row) for row in loss]) * wf


def qfl_reference(z, labels, quality, beta=2.0):
    """GFocal's quality_focal_loss on the C foreground columns `[N, C]`."""
    x = z[:, 1:]
    p = torch.sigmoid(x)
    loss = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none") * p.pow(
        beta
    )
    rows = []
    for i in range(x.shape[0]):
        row = list(loss[i])
        j = int(labels[i]) - 1
        if j >= 0:
            row[j] = F.binary_cross_entropy_with_logits(x[i, j], quality[i]) * (
                quality[i] - p[i, j]
            ).abs().pow(beta)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def dfl_reference(pred, target):
    """GFocal's distribution_focal_loss per side, then the mean of a box's 4 sides `[P]`."""
    sides = []
    for k in range(4):
        y = target[:, k]
        left = y.long()
        right = left + 1
        w_left, w_right = right.to(y.dtype) - y, y - left.to(y.dtype)
        sides.append(
            F.cross_entropy(pred[:, k], left, reduction="none") * w_left
            + F.cross_entropy(pred[:, k], right, reduction="none") * w_right
        )
    return torch.stack(sides, dim=1).sum(dim=1) / 4


class EFLStateReference:
    """EOD's gradient collector: `|dL/dz|` of the back-propagated loss, split by the one-hot
    targets, accumulated, ratio clipped to [0, 1]; the ratio starts at 1."""

    def __init__(self, quality_variant=False):
        self.pos = torch.zeros(C, dtype=torch.float64)
        self.neg = torch.zeros(C, dtype=torch.float64)
        self.ratio = torch.ones(C, dtype=torch.float64)
        self.quality_variant = quality_variant

    def elements(self, z, labels, quality=None):
        if self.quality_variant:
            return eqfl_reference(z, labels, quality, self.ratio)
        return efl_reference(z, labels, self.ratio)

    def step(self, z, labels, weight, quality=None):
        z = z.detach().requires_grad_(True)
        elements = self.elements(z, labels, quality)
        total = (elements * weight.view(-1, 1)).sum()
        grad = _grad(total, z)[:, 1:].abs()  # what a hook on the classifier's output sees
        target = F.one_hot(labels, K)[:, 1:].to(grad.dtype)
        self.pos += (grad * target).sum(dim=0)
        self.neg += (grad * (1 - target)).sum(dim=0)
        self.ratio = (self.pos / (self.neg + 1e-10)).clamp(0, 1)
        return elements.detach()


# ---------------------------------------------------------------- EFL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_efl_matches_reference_values_and_gradients(seed, make_batch):
    logits, labels = make_batch(n=20, seed=seed, bg_fraction=0.6)
    loss = EqualizedFocalLoss(num_classes=C).double().eval()
    g = torch.Generator().manual_seed(seed)
    loss.pos_neg.copy_(torch.rand(C, generator=g, dtype=torch.float64))  # a mid-training state
    ref = efl_reference(logits, labels, loss.pos_neg)
    elements = loss(logits, labels, reduction="none")
    assert elements.shape == (20, K)
    assert torch.all(elements[:, 0] == 0)
    assert torch.allclose(elements[:, 1:], ref, rtol=1e-10, atol=1e-12)
    weight = _weights(20, seed)
    value = loss(logits, labels, weight=weight, reduction="mean", avg_factor=7.0)
    ref_value = (ref * weight.view(-1, 1)).sum() / 7.0
    assert torch.allclose(value, ref_value, rtol=1e-10)
    grad, ref_grad = _grad(value, logits), _grad(ref_value, logits)
    assert torch.all(grad[:, 0] == 0)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_efl_fresh_state_is_the_focal_loss(make_batch):
    logits, labels = make_batch(n=16, seed=3)
    efl = EqualizedFocalLoss(num_classes=C).double().eval()
    focal = FocalLoss(num_classes=C, alpha=ALPHA, gamma=GAMMA_B)
    a, b = efl(logits, labels), focal(logits, labels)
    assert torch.allclose(a, b, rtol=1e-10)
    assert torch.allclose(_grad(a, logits), _grad(b, logits), rtol=1e-8, atol=1e-12)
    assert torch.equal(efl.pos_neg, torch.ones(C, dtype=torch.float64))


def test_efl_gradcheck(make_batch):
    logits, labels = make_batch(n=6, seed=4)
    loss = EqualizedFocalLoss(num_classes=C).double().eval()
    loss.pos_neg.copy_(torch.linspace(0, 1, C, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda z: loss(z, labels, reduction="sum"), (logits,))


@pytest.mark.parametrize("quality_variant", [False, True], ids=["efl", "eqfl"])
def test_efl_state_over_four_steps(quality_variant, make_batch):
    cls = EqualizedQualityFocalLoss if quality_variant else EqualizedFocalLoss
    loss = cls(num_classes=C).double().train()
    ref = EFLStateReference(quality_variant)
    for step in range(4):
        logits, labels = make_batch(n=24, seed=10 + step, bg_fraction=0.5)
        weight = _weights(24, step)
        quality = _quality(24, step)
        target = (labels, quality) if quality_variant else labels
        ref_elements = ref.elements(logits, labels, quality)
        value = loss(logits, target, weight=weight, reduction="sum")
        ref_value = (ref_elements * weight.view(-1, 1)).sum()
        # the loss of the step uses the state before the step
        assert torch.allclose(value, ref_value, rtol=1e-10), step
        assert torch.allclose(
            _grad(value, logits), _grad(ref_value, logits), rtol=1e-9, atol=1e-12
        ), step
        ref.step(logits, labels, weight, quality)
        assert torch.allclose(loss.pos_grad, ref.pos, rtol=1e-10, atol=1e-14), step
        assert torch.allclose(loss.neg_grad, ref.neg, rtol=1e-10, atol=1e-14), step
        assert torch.allclose(loss.pos_neg, ref.ratio, rtol=1e-10, atol=1e-14), step
    assert torch.all((loss.pos_neg >= 0) & (loss.pos_neg <= 1))
    assert loss.pos_neg.min() < 1  # the factors really moved


def test_efl_element_weights_enter_the_statistics(make_batch):
    """A `[N, C+1]` weight (zero = an ignored element) weights `|dL/dz|` like a `[N]` one."""
    logits, labels = make_batch(n=18, seed=5)
    row = _weights(18, 5)
    a = EqualizedFocalLoss(num_classes=C).double().train()
    b = EqualizedFocalLoss(num_classes=C).double().train()
    a(logits, labels, weight=row, reduction="sum")
    b(logits, labels, weight=row.view(-1, 1).expand(18, K).clone(), reduction="sum")
    for key in ("pos_grad", "neg_grad", "pos_neg"):
        assert torch.allclose(getattr(a, key), getattr(b, key), rtol=1e-12), key
    zero_first = row.clone()
    zero_first[0] = 0
    c = EqualizedFocalLoss(num_classes=C).double().train()
    c(logits[1:], labels[1:], weight=row[1:], reduction="sum")
    d = EqualizedFocalLoss(num_classes=C).double().train()
    d(logits, labels, weight=zero_first, reduction="sum")
    assert torch.allclose(c.neg_grad, d.neg_grad, rtol=1e-12)


def test_efl_state_only_in_training_mode_from_detached_values(make_batch):
    logits, labels = make_batch(n=20, seed=6)
    loss = EqualizedFocalLoss(num_classes=C).double()
    fresh = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.eval()
    value = loss(logits, labels)
    value.backward()
    for key, v in loss.state_dict().items():
        assert torch.equal(v, fresh[key]), key  # eval: nothing stored
    loss.train()
    value = loss(logits, labels)
    after_forward = {k: v.clone() for k, v in loss.state_dict().items()}
    assert not torch.equal(after_forward["pos_neg"], fresh["pos_neg"])
    for v in loss.buffers():
        assert not v.requires_grad and v.grad_fn is None
    value.backward()  # the backward pass does not touch the state again
    for key, v in loss.state_dict().items():
        assert torch.equal(v, after_forward[key]), key
    assert sorted(loss.state_dict()) == ["neg_grad", "pos_grad", "pos_neg"]


def test_efl_background_only_batch(make_batch):
    """A batch without a foreground anchor (images without boxes): a finite loss, only negative
    statistics, and the ratio of classes never seen positive drops to 0 (gamma_j = 10)."""
    logits, _ = make_batch(n=15, seed=7)
    labels = torch.zeros(15, dtype=torch.long)
    loss = EqualizedFocalLoss(num_classes=C).double().train()
    value = loss(logits, labels, reduction="sum")
    assert torch.isfinite(value)
    assert torch.all(torch.isfinite(_grad(value, logits)))
    assert torch.all(loss.pos_grad == 0) and torch.all(loss.neg_grad > 0)
    assert torch.all(loss.pos_neg == 0)
    again = loss(logits, labels, reduction="none")
    ref = efl_reference(logits, labels, torch.zeros(C))
    assert torch.allclose(again[:, 1:], ref, rtol=1e-10, atol=1e-14)
    empty = loss(logits[:0], labels[:0], reduction="sum")
    assert empty.item() == 0


def test_efl_float32_matches_float64(make_batch):
    logits, labels = make_batch(n=30, seed=8)
    a = EqualizedFocalLoss(num_classes=C).double().train()
    b = EqualizedFocalLoss(num_classes=C).train()
    for _ in range(2):
        va = a(logits, labels, reduction="sum")
        vb = b(logits.detach().float(), labels, reduction="sum")
        assert torch.allclose(va.float(), vb, rtol=1e-5)
    assert torch.allclose(a.pos_neg.float(), b.pos_neg, rtol=1e-4, atol=1e-6)


def _dense_batch(n=6000, k=K, seed=3):
    """A dense-head batch early in training: 90 % background anchors, easy negatives (p ~ 1e-3,
    focal gradient ~1e-6) and hard positives (p ~ 0.01 on the true column, gradient ~0.25)."""
    g = torch.Generator().manual_seed(seed)
    logits = 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64) - 7.0
    labels = torch.randint(1, k, (n,), generator=g)
    labels[: n * 9 // 10] = 0
    fg = labels > 0
    logits[fg, labels[fg]] += 2.5
    return logits, labels


def test_efl_statistics_float32_on_a_dense_batch():
    """float32 statistics equal float64 ones on a dense batch, where a negative's focal gradient
    is ~1e-5 of a positive's (column sum minus positives would cancel)."""
    logits, labels = _dense_batch()
    a = EqualizedFocalLoss(num_classes=C).double().train()
    b = EqualizedFocalLoss(num_classes=C).train()
    a(logits, labels, reduction="sum")
    b(logits.float(), labels, reduction="sum")
    assert torch.allclose(b.neg_grad.double(), a.neg_grad, rtol=1e-5)
    assert torch.allclose(b.pos_grad.double(), a.pos_grad, rtol=1e-5)


# ---------------------------------------------------------------- QFL and EQFL


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_qfl_matches_reference_values_and_gradients(seed, beta, make_batch):
    logits, labels = make_batch(n=20, seed=seed, bg_fraction=0.5)
    quality = _quality(20, seed)
    loss = QualityFocalLoss(num_classes=C, beta=beta)
    elements = loss(logits, (labels, quality), reduction="none")
    ref = qfl_reference(logits, labels, quality, beta)
    assert torch.all(elements[:, 0] == 0)
    assert torch.allclose(elements[:, 1:], ref, rtol=1e-10, atol=1e-14)
    weight = _weights(20, seed)
    value = loss(logits, (labels, quality), weight=weight, reduction="sum")
    ref_value = (ref * weight.view(-1, 1)).sum()
    assert torch.allclose(value, ref_value, rtol=1e-10)
    grad = _grad(value, logits)
    assert torch.all(grad[:, 0] == 0)
    assert torch.allclose(grad, _grad(ref_value, logits), rtol=1e-9, atol=1e-12)
    # no gradient flows into the quality target (the authors detach the IoU)
    q = quality.clone().requires_grad_(True)
    assert not loss(logits.detach(), (labels, q)).requires_grad


def test_qfl_plain_labels_mean_quality_one_and_background_rows_ignore_quality(make_batch):
    logits, labels = make_batch(n=14, seed=2)
    loss = QualityFocalLoss(num_classes=C)
    ones = torch.ones(14, dtype=torch.float64)
    assert torch.allclose(
        loss(logits, labels, reduction="none"), loss(logits, (labels, ones), reduction="none")
    )
    junk = torch.where(labels == 0, torch.full_like(ones, 0.7), ones)
    assert torch.allclose(
        loss(logits, (labels, junk), reduction="none"),
        loss(logits, (labels, ones), reduction="none"),
    )
    assert torch.autograd.gradcheck(
        lambda z: loss(z, (labels, _quality(14, 2)), reduction="sum"), (logits,)
    )
    with pytest.raises(ValueError, match="quality must be"):
        loss(logits, (labels, ones[:3]))


def test_eqfl_matches_reference_values_and_gradients(make_batch):
    logits, labels = make_batch(n=20, seed=9)
    quality = _quality(20, 9)
    loss = EqualizedQualityFocalLoss(num_classes=C).double().eval()
    loss.pos_neg.copy_(torch.linspace(0.05, 1, C, dtype=torch.float64))
    elements = loss(logits, (labels, quality), reduction="none")
    ref = eqfl_reference(logits, labels, quality, loss.pos_neg)
    assert torch.all(elements[:, 0] == 0)
    assert torch.allclose(elements[:, 1:], ref, rtol=1e-10, atol=1e-14)
    assert torch.allclose(
        _grad(elements.sum(), logits), _grad(ref.sum(), logits), rtol=1e-9, atol=1e-12
    )
    # fresh state: EQFL is QFL with beta = gamma_b
    fresh = EqualizedQualityFocalLoss(num_classes=C).double().eval()
    assert torch.allclose(
        fresh(logits, (labels, quality), reduction="none"),
        QualityFocalLoss(num_classes=C)(logits, (labels, quality), reduction="none"),
    )


# ---------------------------------------------------------------- DFL


def _distances(p, n, seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(p, 4, generator=g, dtype=torch.float64) * (n - 0.01)
    target[0, 0] = 0.0
    target[1, 2] = 3.0  # an integer target: all weight on one bin
    pred = torch.randn(p, 4, n + 1, generator=g, dtype=torch.float64).requires_grad_(True)
    return pred, target


def test_dfl_matches_reference_values_and_gradients():
    n = 16
    pred, target = _distances(11, n, 0)
    loss = DistributionFocalLoss(reg_max=n)
    elements = loss(pred, target, reduction="none")
    ref = dfl_reference(pred, target)
    assert elements.shape == (11,)
    assert torch.allclose(elements, ref, rtol=1e-10)
    weight = _weights(11, 0)
    value = loss(pred, target, weight=weight, reduction="mean", avg_factor=3.0)
    ref_value = (ref * weight).sum() / 3.0
    assert torch.allclose(value, ref_value, rtol=1e-10)
    assert torch.allclose(_grad(value, pred), _grad(ref_value, pred), rtol=1e-9, atol=1e-12)
    # the top of the range: the authors clamp below n; target n puts its weight on bin n
    top = torch.full((2, 4), float(n), dtype=torch.float64)
    log_prob = pred[:2].log_softmax(-1)[..., n]
    assert torch.allclose(loss(pred[:2], top, reduction="none"), -log_prob.mean(dim=1))
    with pytest.raises(ValueError, match="reg_max"):
        loss(pred[:, :, :5], target)


def test_distribution_integral_decodes_the_expectation():
    n = 16
    logits = torch.full((3, 4, n + 1), -1e4, dtype=torch.float64)
    for i, k in enumerate([0, 5, 16]):
        logits[i, :, k] = 0.0
    expected = torch.tensor([0.0, 5.0, 16.0], dtype=torch.float64).view(3, 1).expand(3, 4)
    assert torch.allclose(distribution_integral(logits), expected)
    half = torch.full((1, 4, n + 1), -1e4, dtype=torch.float64)
    half[..., 3] = half[..., 4] = 0.0  # equal mass on 3 and 4
    assert torch.allclose(distribution_integral(half), torch.full((1, 4), 3.5, dtype=torch.float64))
    uniform = torch.zeros(2, 4, n + 1)
    assert torch.allclose(distribution_integral(uniform), torch.full((2, 4), n / 2))
    # a DFL-trained distribution around y decodes to y
    y = torch.tensor([[2.3, 7.0, 0.4, 15.9]], dtype=torch.float64)
    pred = torch.zeros(1, 4, n + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([pred], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        DistributionFocalLoss(reg_max=n)(pred, y).backward()
        opt.step()
    assert torch.allclose(distribution_integral(pred.detach()), y, atol=0.05)


# ---------------------------------------------------------------- two gloo processes

DIST_STEPS = 3
DIST_ROWS = 14
DIST_SPLIT = 9  # unequal on purpose


def _dist_losses():
    return {
        "efl": EqualizedFocalLoss(num_classes=C).double().train(),
        "eqfl": EqualizedQualityFocalLoss(num_classes=C).double().train(),
    }


def _dist_batches(make_batch):
    """(logits, labels) of each step: built in the test's process and handed to the spawned
    ranks (which see no fixtures)."""
    batches = []
    for step in range(DIST_STEPS):
        logits, labels = make_batch(n=DIST_ROWS, seed=300 + step, bg_fraction=0.5)
        batches.append((logits.detach(), labels))
    return batches


def _dist_run(rows, batches):
    losses = _dist_losses()
    per_step = {name: [] for name in losses}
    for step in range(DIST_STEPS):
        logits, labels = batches[step]
        weight = _weights(DIST_ROWS, step)
        quality = _quality(DIST_ROWS, step)
        for name, loss in losses.items():
            target = (labels[rows], quality[rows]) if name == "eqfl" else labels[rows]
            per_step[name].append(
                loss(logits[rows], target, weight=weight[rows], reduction="none").detach()
            )
    return (
        {
            name: {k: v.clone() for k, v in loss.state_dict().items()}
            for name, loss in losses.items()
        },
        per_step,
    )


@contextlib.contextmanager
def _gloo_group(rank, world_size, port):
    """One spawned rank's gloo process group on 127.0.0.1:`port`, one thread; destroyed after."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _dist_worker(rank, world_size, port, out_dir, batches):
    with _gloo_group(rank, world_size, port):
        rows = slice(0, DIST_SPLIT) if rank == 0 else slice(DIST_SPLIT, DIST_ROWS)
        torch.save(_dist_run(rows, batches), os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_on_the_joined_batch(tmp_path, make_batch):
    batches = _dist_batches(make_batch)
    mp.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path), batches), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    state, per_step = _dist_run(slice(0, DIST_ROWS), batches)
    for name in state:
        assert state[name]["pos_neg"].min() < 1, name
        for r in range(2):
            for key, value in state[name].items():
                assert torch.allclose(ranks[r][0][name][key], value, rtol=1e-10, atol=1e-14), (
                    name,
                    key,
                    r,
                )
        for step in range(DIST_STEPS):
            joined = torch.cat([ranks[0][1][name][step], ranks[1][1][name][step]])
            assert torch.allclose(joined, per_step[name][step], rtol=1e-10, atol=1e-14), (
                name,
                step,
            )
    alone, _ = _dist_run(slice(0, DIST_SPLIT), batches)
    assert not torch.allclose(alone["efl"]["pos_grad"], ranks[0][0]["efl"]["pos_grad"])


# ---------------------------------------------------------------- RetinaNet: QFL targets, DFL head

RC = 3  # RetinaNet foreground classes
GFL = dict(
    cls_loss={"type": "qfl"},
    box_loss={"type": "giou", "loss_weight": 2.0},
    dfl={"reg_max": 16, "loss_weight": 0.25, "score_weighted": True},
)
RETINA_CONFIGS = {
    "efl": dict(cls_loss={"type": "efl"}),
    "qfl": dict(cls_loss={"type": "qfl"}),
    "eqfl": dict(cls_loss={"type": "eqfl"}),
    "gfl": GFL,
}


def _tiny_retinanet():
    torch.manual_seed(0)
    cfg = {
        "model": {
            "arch": "retinanet",
            "backbone": "resnet18",
            "norm": "bn",
            "detections_per_img": 100,
            "score_thresh": 1e-4,
        }
    }
    return build_torchvision_detector(cfg, RC)


def _images_and_targets(empty_second=False):
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[30.0, 30.0, 50.0, 52.0]]), "labels": torch.tensor([2])},
    ]
    if empty_second:
        targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    return images, targets


def _capture(model, images, targets):
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


@pytest.mark.parametrize("name", sorted(RETINA_CONFIGS))
@pytest.mark.parametrize("empty_second", [False, True], ids=["boxes", "image-without-boxes"])
def test_retinanet_trains_a_step(name, empty_second):
    model = patch_retinanet(_tiny_retinanet(), **RETINA_CONFIGS[name]).train()
    images, targets = _images_and_targets(empty_second)
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det in detections:
        assert det["boxes"].shape[1] == 4 and (det["labels"] >= 1).all()
        assert (det["labels"] <= RC).all()


def test_retinanet_all_images_without_boxes_train():
    model = patch_retinanet(_tiny_retinanet(), **GFL).train()
    images, _ = _images_and_targets()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, [dict(empty), dict(empty)])
    assert losses["bbox_regression"].item() == 0
    sum(losses.values()).backward()


def _efl_head_statistics_reference(z, labels, num_fg_norm):
    """EOD's statistics after one step from the fresh state (g = 1: EFL is the focal loss,
    gamma_b = 2, alpha = 0.25): `|dL/dz|` of `sum(focal) / num_fg_norm` (the gradient its hook
    reads), summed per class over positives / negatives; and that loss."""
    zf = z[:, 1:].double().detach().requires_grad_(True)
    onehot = F.one_hot(labels, RC + 1)[:, 1:].double()
    p = zf.sigmoid()
    ce = F.binary_cross_entropy_with_logits(zf, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    loss = (alpha_t * (1 - p_t) ** 2 * ce).sum() / num_fg_norm
    magnitude = _grad(loss, zf).abs()
    return (magnitude * onehot).sum(0), (magnitude * (1 - onehot)).sum(0), loss


def test_efl_head_statistics_use_the_authors_batch_normaliser():
    """RetinaNet + EFL: the loss and the gradient statistics are those of EOD's
    `sum / max(1, N_fg of the step)`, not torchvision's per-image normalisation, on a batch whose
    images have very different foreground counts."""
    model = patch_retinanet(_tiny_retinanet(), cls_loss={"type": "efl"}).train()
    efl = model.head.classification_head.loss
    assert efl.dense_normaliser == "batch"
    images, targets = _images_and_targets()
    targets[1] = {"boxes": torch.tensor([[30.0, 30.0, 44.0, 41.0]]), "labels": torch.tensor([2])}
    losses, out, _, matched = _capture(model, images, targets)
    fg = [int((m >= 0).sum()) for m in matched]
    assert fg[0] >= 4 * fg[1] > 0  # unbalanced on purpose
    rows, labels, per_image = [], [], []
    for b, (t, m) in enumerate(zip(targets, matched)):
        valid = m != -2
        rows.append(out["cls_logits"][b][valid])
        lab = torch.where(m >= 0, t["labels"][m.clamp_min(0)], torch.zeros_like(m))[valid]
        labels.append(lab)
        per_image.append(_efl_head_statistics_reference(rows[-1], lab, 2 * fg[b]))
    pos, neg, value = _efl_head_statistics_reference(torch.cat(rows), torch.cat(labels), sum(fg))
    assert torch.allclose(losses["classification"].double(), value, rtol=1e-5)
    assert torch.allclose(efl.pos_grad.double(), pos, rtol=1e-4, atol=1e-9)
    assert torch.allclose(efl.neg_grad.double(), neg, rtol=1e-4, atol=1e-9)
    assert torch.allclose(efl.pos_neg.double(), (pos / (neg + 1e-10)).clamp(0, 1), rtol=1e-4)
    # torchvision's per-image weights would give other statistics: the test can tell them apart
    pos_image = per_image[0][0] + per_image[1][0]
    assert not torch.allclose(pos_image, pos, rtol=1e-2)


def test_batch_normaliser_is_the_rank_mean_of_the_foreground_count():
    matched = torch.tensor([[0, -1, 1, -2], [-1, -1, -1, -1]])
    batch = dense_foreground_weights(matched, 2, "batch")
    assert batch.shape == matched.shape and torch.all(batch == 0.5)
    image = dense_foreground_weights(matched, 2, "image")
    assert torch.equal(image, torch.tensor([[0.25] * 4, [0.5] * 4]))
    assert torch.all(dense_foreground_weights(torch.full((1, 3), -1), 1, "batch") == 1.0)
    with pytest.raises(ValueError, match="dense_normaliser"):
        dense_foreground_weights(matched, 2, "anchor")


def test_patch_refuses_an_unknown_dense_normaliser():
    loss = build_loss({"type": "efl"}, num_classes=RC)
    loss.dense_normaliser = "anchor"
    with pytest.raises(ValueError, match="dense_normaliser must be one of"):
        patch_retinanet(_tiny_retinanet(), cls_loss=loss)


def _rank_mean_worker(rank, world_size, port, out_dir):
    with _gloo_group(rank, world_size, port):
        # rank 0: 3 foreground anchors, rank 1: 7 -> each divides by 10 / 2 = 5
        matched = torch.tensor([[0, 1, 2, -1]]) if rank == 0 else torch.arange(7).view(1, 7)
        torch.save(dense_foreground_weights(matched, 1, "batch"), f"{out_dir}/w{rank}.pt")
        # a rank without foreground still takes part: 0 + 4 -> max(1, 4 / 2) = 2 on both
        matched = torch.full((1, 5), -1) if rank == 0 else torch.arange(4).view(1, 4)
        torch.save(dense_foreground_weights(matched, 1, "batch"), f"{out_dir}/z{rank}.pt")


def test_batch_normaliser_under_two_gloo_processes(tmp_path):
    """Per rank `1 / (N_all / W)`; DDP's gradient mean over W makes it `1 / N_all`, the
    single-process weight of the joined batch."""
    mp.spawn(_rank_mean_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    joined = dense_foreground_weights(torch.arange(10).view(1, 10), 1, "batch")
    for r in range(2):
        w = torch.load(tmp_path / f"w{r}.pt")
        assert torch.allclose(w, torch.full_like(w, 0.2))
        assert torch.allclose(w / 2, joined[:, : w.shape[1]])
        z = torch.load(tmp_path / f"z{r}.pt")
        assert torch.allclose(z, torch.full_like(z, 0.5))


def _head_run(name, image_ids):
    """One training forward of a frozen-BN RetinaNet (seed 0: the same weights in every process)
    with `name`'s losses on the images `image_ids` of `_images_and_targets`: the loss values and
    the classification loss's buffers."""
    torch.manual_seed(0)
    cfg = {"model": {"arch": "retinanet", "backbone": "resnet18", "norm": "frozen_bn"}}
    model = patch_retinanet(build_torchvision_detector(cfg, RC), **RETINA_CONFIGS[name]).train()
    images, targets = _images_and_targets()
    targets[1] = {"boxes": torch.tensor([[30.0, 30.0, 44.0, 41.0]]), "labels": torch.tensor([2])}
    images.append(torch.rand(3, 96, 128))
    targets.append({"boxes": torch.tensor([[5.0, 40.0, 70.0, 92.0]]), "labels": torch.tensor([3])})
    losses = model([images[i] for i in image_ids], [dict(targets[i]) for i in image_ids])
    state = model.head.classification_head.loss.state_dict()
    return {k: v.detach() for k, v in losses.items()}, {k: v.clone() for k, v in state.items()}


def _head_worker(rank, world_size, port, out_dir):
    with _gloo_group(rank, world_size, port):
        out = {name: _head_run(name, [0, 1] if rank == 0 else [2]) for name in ("efl", "gfl")}
        torch.save(out, f"{out_dir}/head{rank}.pt")


def test_efl_and_gfl_heads_under_two_gloo_processes_equal_the_joined_batch(tmp_path):
    """The whole head, images 0 and 1 on rank 0 and image 2 on rank 1: the mean of the ranks'
    losses (what DDP's gradient mean optimises) equals one process's loss on the 3 images, for
    every term of GFL (QFL, GIoU and DFL with their batch foreground / score normalisers) and
    for EFL's classification term. EFL's buffers: each rank adds the gradient of its own loss
    (sum / (N_all / W)), summed over ranks as EOD's hook and allreduce do, so `pos_grad` /
    `neg_grad` are W = 2 times the joined batch's on every rank and `pos_neg`, what the loss
    reads, is equal. torchvision's per-image normaliser would not pass: with unequal images per
    rank and unequal foreground counts it weights the ranks unequally (with one image on each
    rank it would, which is why rank 0 has two)."""
    mp.spawn(_head_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"head{r}.pt") for r in range(2)]
    for name in ("efl", "gfl"):
        joined_losses, joined_state = _head_run(name, [0, 1, 2])
        # efl's box term is torchvision's (per image, the documented departure of its configs)
        keys = ["classification"] if name == "efl" else sorted(joined_losses)
        for key in keys:
            value = joined_losses[key]
            mean = (ranks[0][name][0][key] + ranks[1][name][0][key]) / 2
            assert torch.allclose(mean, value, rtol=1e-5, atol=1e-7), (name, key, mean, value)
            # a per-rank normaliser would make rank means differ from the joined value
            assert value > 0, (name, key)
        for r in range(2):
            for key, value in joined_state.items():
                scale = 2.0 if key in ("pos_grad", "neg_grad") else 1.0
                got = ranks[r][name][1][key]
                assert torch.allclose(got, scale * value, rtol=1e-4, atol=1e-9), (name, key, r)
        if name == "efl":  # every class has positives and negatives: no 0 == 0 comparison
            assert (joined_state["pos_grad"] > 0).all() and (joined_state["neg_grad"] > 0).all()


def test_qfl_head_passes_the_iou_of_the_regressed_box():
    """The classification loss equals QFL with targets = IoU(decoded prediction, matched gt),
    computed here from scratch per anchor."""
    model = patch_retinanet(_tiny_retinanet(), cls_loss={"type": "qfl"}).train()
    assert isinstance(model.head, LTRetinaNetHead)
    images, targets = _images_and_targets()
    losses, out, anchors, matched = _capture(model, images, targets)
    coder = model.head.regression_head.box_coder
    expected = 0.0
    for b, (t, m) in enumerate(zip(targets, matched)):
        fg = torch.where(m >= 0)[0]
        quality = torch.zeros(m.shape[0])
        boxes = coder.decode_single(out["bbox_regression"][b, fg].detach(), anchors[b][fg])
        for k, i in enumerate(fg.tolist()):
            quality[i] = box_iou(boxes[k : k + 1], t["boxes"][m[i]].view(1, 4))[0, 0]
        labels = torch.where(m >= 0, t["labels"][m.clamp_min(0)], torch.zeros_like(m))
        valid = m != -2
        per = qfl_reference(
            out["cls_logits"][b][valid].double(), labels[valid], quality[valid].double()
        )
        expected = expected + per.sum()
    # GFocal's normaliser: num_total_samples = the batch's foreground count (not per image)
    expected = expected / max(1, sum(int((m >= 0).sum()) for m in matched))
    assert torch.allclose(losses["classification"].double(), expected, rtol=1e-5)
    got = anchor_quality(targets, out["bbox_regression"], anchors, matched, coder)
    assert got.shape == out["bbox_regression"].shape[:2]
    assert (got[torch.stack(matched) < 0] == 0).all() and (got >= 0).all() and (got <= 1).all()


def test_distribution_head_shapes_loss_and_decoding():
    model = patch_retinanet(_tiny_retinanet(), **GFL).train()
    reg = model.head.regression_head
    assert isinstance(reg, LTRetinaNetDistributionHead) and isinstance(model, LTRetinaNet)
    assert reg.bbox_reg.out_channels == 9 * 4 * 17
    images, targets = _images_and_targets()
    losses, out, anchors, matched = _capture(model, images, targets)
    assert out["bbox_regression"].shape[-1] == 4 * 17
    # reference: GFL's loss_single with ltdet's unit (anchor size / 8) and one batch normaliser
    preds, boxes_gt, anc, scores = [], [], [], []
    for b, (t, m) in enumerate(zip(targets, matched)):
        fg = torch.where(m >= 0)[0]
        preds.append(out["bbox_regression"][b, fg])
        boxes_gt.append(t["boxes"][m[fg]])
        anc.append(anchors[b][fg])
        scores.append(out["cls_logits"][b, fg, 1:].detach().sigmoid().max(dim=1).values)
    pred, gt, anc, score = map(torch.cat, (preds, boxes_gt, anc, scores))
    w = score / score.sum()
    cx, cy = (anc[:, 0] + anc[:, 2]) / 2, (anc[:, 1] + anc[:, 3]) / 2
    unit = ((anc[:, 2] - anc[:, 0]) * (anc[:, 3] - anc[:, 1])).sqrt() / 8
    dist = torch.stack([cx - gt[:, 0], cy - gt[:, 1], gt[:, 2] - cx, gt[:, 3] - cy], 1)
    dist = (dist / unit[:, None]).clamp(0, 16 - 0.1)  # GFocal's bbox2distance(dt=0.1)
    prob = pred.view(-1, 4, 17).softmax(-1)
    side = (prob * torch.arange(17.0)).sum(-1) * unit[:, None]
    decoded = torch.stack([cx - side[:, 0], cy - side[:, 1], cx + side[:, 2], cy + side[:, 3]], 1)
    assert torch.allclose(decode_distribution(pred, anc), decoded, atol=1e-4)
    giou = build_loss({"type": "giou"})(decoded, gt, reduction="none")
    dfl = dfl_reference(pred.view(-1, 4, 17).double(), dist.double())
    expected = 2.0 * (w * giou).sum() + 0.25 * (w.double() * dfl).sum()
    assert torch.allclose(losses["bbox_regression"].double(), expected, rtol=1e-4)


def test_gfl_postprocess_decodes_the_distributions_and_scripts():
    model = patch_retinanet(_tiny_retinanet(), **GFL).eval()
    images, _ = _images_and_targets()
    with torch.no_grad():
        eager = model(images)
        scripted = torch.jit.script(model)
        _, scripted_dets = scripted(images)
    for a, b in zip(eager, scripted_dets):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])
        assert a["boxes"].numel() > 0


def test_dfl_options_are_validated():
    with pytest.raises(ValueError, match="needs_boxes"):
        patch_retinanet(_tiny_retinanet(), cls_loss={"type": "qfl"}, dfl={"reg_max": 16})
    with pytest.raises(ValueError, match="needs_boxes"):
        patch_retinanet(_tiny_retinanet(), box_loss={"type": "l1"}, dfl={"reg_max": 8})
    with pytest.raises(ValueError, match="distribution regression head"):
        patch_retinanet(_tiny_retinanet(), box_loss={"type": "dfl"})
    with pytest.raises(ValueError, match="unknown key"):
        patch_retinanet(_tiny_retinanet(), box_loss={"type": "giou"}, dfl={"bins": 8})
    model = patch_retinanet(
        _tiny_retinanet(), box_loss={"type": "giou"}, dfl={"enabled": False, "reg_max": 16}
    )
    assert not isinstance(model.head.regression_head, LTRetinaNetDistributionHead)


# ---------------------------------------------------------------- configs

ROOT = Path(__file__).resolve().parents[2]  # tests/losses/ -> the repository


def test_lvis_efl_config_follows_the_eod_recipe():
    cfg = load_config(ROOT / "configs/lvis_v1/retinanet_r50_fpn_efl_rfs_2x.yaml")
    model, data, solver = cfg["model"], cfg["data"], cfg["solver"]
    assert model["arch"] == "retinanet_v2" and model["backbone"] == "resnet50"
    assert model["cls_loss"] == {"type": "efl", "gamma_b": 2.0, "scale": 8.0, "alpha": 0.25}
    assert model["box_loss"] == {"type": "giou", "loss_weight": 1.0}
    assert not model["dfl"]["enabled"]
    assert data["sampler"] == {"type": "repeat_factor", "threshold": 0.001}
    assert data["filter_empty"] and data["min_size"] == [640, 672, 704, 736, 768, 800]
    per_epoch = -(-99388 // 16)  # 6,212 iterations (the last one partial)
    assert solver["max_iter"] == 24 * per_epoch and solver["warmup_iters"] == per_epoch
    assert solver["steps"] == [16 * per_epoch, 22 * per_epoch]
    assert solver["lr"] == 0.02 and solver["warmup_factor"] == 0.001
    assert solver["clip_grad_norm"] == 35.0


@pytest.mark.parametrize("name", ["gfl", "qfl"])
def test_lvis_gfl_configs_follow_the_gfocal_recipe(name):
    cfg = load_config(ROOT / f"configs/lvis_v1/retinanet_r50_fpn_{name}_rfs_1x.yaml")
    model, solver = cfg["model"], cfg["solver"]
    assert model["arch"] == "retinanet_v2"
    assert model["cls_loss"] == {"type": "qfl", "beta": 2.0}
    assert model["box_loss"] == {"type": "giou", "loss_weight": 2.0}
    assert model["dfl"] == {
        "enabled": name == "gfl",
        "reg_max": 16,
        "loss_weight": 0.25,
        "score_weighted": True,
    }
    assert model["nms_thresh"] == 0.6  # gfl_r50_1x.py test_cfg nms iou_thr
    assert solver["lr"] == 0.01 and solver["max_iter"] == 12 * 6212
    assert solver["steps"] == [8 * 6212, 11 * 6212]
    assert solver["warmup_iters"] == 500 and abs(solver["warmup_factor"] - 1 / 3) < 1e-3


@pytest.mark.parametrize("name", ["efl", "qfl", "gfl"])
def test_synthetic_configs_build_their_losses(name):
    cfg = load_config(
        ROOT / f"configs/synthetic/retinanet_{name}.yaml", ["model.backbone=resnet18"]
    )
    model = build_detector(cfg, 5)
    head = model.head
    cls = {"efl": EqualizedFocalLoss, "qfl": QualityFocalLoss, "gfl": QualityFocalLoss}[name]
    assert type(head.classification_head.loss) is cls
    assert isinstance(model, LTRetinaNet)
    assert isinstance(head, LTRetinaNetHead) == (name != "efl")
    assert isinstance(head.regression_head, LTRetinaNetDistributionHead) == (name == "gfl")
    if name == "gfl":
        assert head.regression_head.loss.loss_weight == 2.0
        assert head.regression_head.dfl.loss_weight == 0.25
        assert head.regression_head.dfl.reg_max == 16


def test_dfl_on_a_two_stage_detector_is_refused():
    cfg = load_config(
        ROOT / "configs/synthetic/faster_rcnn_r18_fpn.yaml", ["model.dfl.enabled=true"]
    )
    with pytest.raises(ValueError, match="dense-head option"):
        build_detector(cfg, 5)
