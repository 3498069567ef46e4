"""Per-class loss weights from training counts (Cui et al., "Class-Balanced Loss Based on
Effective Number of Samples", CVPR 2019); the loss that applies them is
`ltdet.losses.class_balanced`.

`class_balanced_weights(counts)` turns per-class training counts `[C]` into per-class loss weights
`[C]` normalised so that they sum to C (Sec. 3-4 of the paper):

* `effective`:    `w_c = (1 - beta) / (1 - beta^{n_c})`  (inverse effective number of samples)
* `inverse`:      `w_c = 1 / n_c`
* `sqrt_inverse`: `w_c = 1 / sqrt(n_c)`

Model-agnostic: the same weights serve a classifier's loss or a sampler.
"""

import math

import torch
from torch import Tensor

__all__ = ["CB_MODES", "class_balanced_weights"]

CB_MODES = ("effective", "inverse", "sqrt_inverse")


def class_balanced_weights(counts: Tensor, mode: str = "effective", beta: float = 0.999) -> Tensor:
    """Per-class weights `[C]` (same dtype/device as `counts`, float), summing to C.

    Args:
        counts: per-class training counts `[C]` (instances or images). A class with zero count is
            treated as having one sample (the largest finite weight) rather than an infinite one.
        mode: one of "effective", "inverse", "sqrt_inverse".
        beta: hyper-parameter of the effective number, in [0, 1) (0.99, 0.999, 0.9999 in the paper).
    """
    if mode not in CB_MODES:
        raise ValueError(f"class-balanced mode must be one of {CB_MODES}, got {mode!r}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"class-balanced beta must be in [0, 1), got {beta}")
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"class counts must be a non-empty 1-D tensor [C], got shape {list(counts.shape)}"
        )
    out_dtype = counts.dtype if counts.is_floating_point() else torch.float32
    n = counts.to(torch.float64).clamp_min(1.0)
    if mode == "effective":
        # 1 - beta^n computed as -expm1(n log beta): exact for beta close to 1 and large n.
        weights = (
            (1.0 - beta) / -torch.expm1(n * math.log(beta)) if beta > 0 else torch.ones_like(n)
        )
    elif mode == "inverse":
        weights = 1.0 / n
    else:
        weights = n.rsqrt()
    weights = weights * (n.numel() / weights.sum())
    return weights.to(out_dtype)
