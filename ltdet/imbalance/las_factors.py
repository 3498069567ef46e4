"""Label-aware smoothing factors (MiSLAS: Zhong et al., "Improving Calibration for Long-Tailed
Recognition", CVPR 2021, Sec. 3, label-aware smoothing): per-class `eps_y` from training counts;
the loss that smooths with them is `ltdet.losses.label_smoothing`.

A class's smoothing factor grows with its training count, because head classes are the
over-confident ones:

    eps_y = eps_K + (eps_1 - eps_K) * h((n_y - n_K) / (n_1 - n_K)),   n_1 >= ... >= n_K

with `h(x) = sin(pi x / 2)` (concave), `x` (linear), `1 - cos(pi x / 2)` (convex) or `x^power`
(`exp`, the released MiSLAS code's fourth shape, `LabelAwareSmoothing(..., shape='exp',
power=p)`), and the soft target of a sample of class y over K classes is `1 - eps_y` on y and
`eps_y / (K - 1)` on every other class (the paper's formula; the released code spreads
`eps_y / K` over all K).
"""

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LAS_SHAPES", "label_aware_smoothing"]

LAS_SHAPES = ("concave", "linear", "convex", "exp")


def label_aware_smoothing(
    counts: Tensor,
    eps_head: float = 0.4,
    eps_tail: float = 0.1,
    shape: str = "concave",
    power: Optional[float] = None,
) -> Tensor:
    """Per-class smoothing factors `[C]` from per-class training counts `[C]`.

    The most frequent class gets `eps_head` (eps_1), the rarest `eps_tail` (eps_K). When all
    counts are equal every class is a head class and gets `eps_head` (MiSLAS's code divides by
    `n_1 - n_K = 0` there). `shape="exp"` needs `power > 0` (MiSLAS requires it too):
    `h(x) = x^power`; `power` is ignored by the other shapes, as in MiSLAS.
    """
    if shape not in LAS_SHAPES:
        raise ValueError(f"label-aware smoothing shape must be one of {LAS_SHAPES}, got {shape!r}")
    if shape == "exp":
        try:
            p = math.nan if power is None else float(power)
        except (TypeError, ValueError):
            p = math.nan
        if not (math.isfinite(p) and p > 0):
            raise ValueError(
                f"label-aware smoothing shape 'exp' needs a finite power > 0, got {power!r}"
            )
    for name, value in (("eps_head", eps_head), ("eps_tail", eps_tail)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"label-aware smoothing {name} must be in [0, 1), got {value}")
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"class counts must be a non-empty 1-D tensor [C], got shape {list(counts.shape)}"
        )
    n = counts.to(torch.float64)
    n_head, n_tail = n.max(), n.min()
    if n_head > n_tail:
        x = (n - n_tail) / (n_head - n_tail)
    else:
        x = torch.ones_like(n)
    if shape == "concave":
        h = torch.sin(x * (math.pi / 2))
    elif shape == "linear":
        h = x
    elif shape == "exp":
        h = x.pow(p)
    else:
        h = 1.0 - torch.cos(x * (math.pi / 2))
    eps = eps_tail + (eps_head - eps_tail) * h
    return eps.to(counts.dtype if counts.is_floating_point() else torch.float32)
