"""Fixtures of the loss tests alone (shared inputs such as `make_batch` are tests/conftest.py's)."""

import pytest
import torch


def _one_hot(labels, num_columns, dtype=torch.float64):
    return torch.nn.functional.one_hot(labels, num_columns).to(dtype)


def _ghm_reference_weights(g, n_rows, bins, acc=None, momentum=0.0):
    """Li et al.'s binning written as a loop over bins; returns element weights N / GD and the
    new acc."""
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


@pytest.fixture
def one_hot():
    """`one_hot(labels, num_columns, dtype=float64)`: float one-hot targets."""
    return _one_hot


@pytest.fixture
def ghm_reference_weights():
    """`ghm_reference_weights(g, n_rows, bins, acc=None, momentum=0.0) -> (weights, acc)`."""
    return _ghm_reference_weights
