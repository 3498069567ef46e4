"""Shared inputs for the loss tests: a duck-typed ClassStats and small seeded batches."""

import types

import torch

from ltdet.losses import LOSSES, ClassificationLoss, RegressionLoss

NUM_CLASSES = 6

#: The registry's losses by kind, read from `LOSSES` (a new loss joins them without a test edit).
CLASSIFICATION = sorted(n for n, cls in LOSSES.items() if issubclass(cls, ClassificationLoss))
REGRESSION = sorted(n for n, cls in LOSSES.items() if issubclass(cls, RegressionLoss))
SIGMOID_FOREGROUND = [
    {"type": "focal"},
    {"type": "eql", "lambda_": 0.05},
    {"type": "federated"},
    {"type": "ghmc"},
    {"type": "cb", "base": "sigmoid"},
    {"type": "cb", "base": "focal"},
]


def make_stats(image_count=(400.0, 90.0, 30.0, 8.0, 2.0, 0.0), instance_count=None, num_images=500):
    """ClassStats stand-in (index i = label i+1); the library only reads these attributes."""
    image_count = torch.tensor(image_count, dtype=torch.float32)
    if instance_count is None:
        instance_count = image_count * 3
    return types.SimpleNamespace(
        image_count=image_count,
        instance_count=torch.as_tensor(instance_count, dtype=torch.float32),
        num_images=num_images,
        frequency=None,
    )


def make_batch(
    n=12, num_classes=NUM_CLASSES, seed=0, dtype=torch.float64, bg_fraction=0.5, num_columns=None
):
    """Logits `[n, C+1]` (`[n, num_columns]`, e.g. a loss's `cls_channels`: seesaw's C+2;
    requires grad) and labels in [0, C] with ~bg_fraction background."""
    g = torch.Generator().manual_seed(seed)
    width = num_classes + 1 if num_columns is None else num_columns
    logits = (2.0 * torch.randn(n, width, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(1, num_classes + 1, (n,), generator=g)
    labels[torch.rand(n, generator=g) < bg_fraction] = 0
    return logits, labels


def make_boxes(p=9, seed=0, dtype=torch.float64):
    """Valid xyxy boxes `[p, 4]` (pred requires grad) with overlapping and disjoint pairs."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(p, 2, generator=g) * 10
    wh = torch.rand(p, 2, generator=g) * 5 + 0.5
    target = torch.cat([xy, xy + wh], dim=1).to(dtype)
    shift = torch.randn(p, 4, generator=g) * 1.5
    pred = target + shift.to(dtype)
    pred = torch.cat([torch.minimum(pred[:, :2], pred[:, 2:] - 0.1), pred[:, 2:]], dim=1)
    return pred.detach().requires_grad_(True), target


def make_deltas(p=9, seed=0, dtype=torch.float64):
    """Box-delta predictions `[p, 4]` (requires grad) and targets, errors spanning 0.001 - 3."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(p, 4, generator=g).to(dtype)
    err = torch.randn(p, 4, generator=g).to(dtype) * torch.logspace(-3, 0.5, 4, dtype=dtype)
    return (target + err).detach().requires_grad_(True), target


def one_hot(labels, num_columns, dtype=torch.float64):
    return torch.nn.functional.one_hot(labels, num_columns).to(dtype)


def ghm_reference_weights(g, n_rows, bins, acc=None, momentum=0.0):
    """Li et al.'s binning written as a loop over bins; returns element weights N / GD and new acc."""
    edges = [i / bins for i in range(bins + 1)]
    edges[-1] += 1e-6
    weights = torch.zeros_like(g)
    n_nonempty = 0
    acc = None if acc is None else acc.clone()
    for b in range(bins):
        inside = (g >= edges[b]) & (g < edges[b + 1])
        count = int(inside.sum())
        if count:
            n_nonempty += 1
            if momentum > 0:
                acc[b] = momentum * acc[b] + (1 - momentum) * count
                weights[inside] = n_rows / acc[b]
            else:
                weights[inside] = n_rows / count
    return weights / max(n_nonempty, 1), acc
