"""Feature distribution smoothing (FDS) for the RoI features that feed the box regressor.

Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021, Sec. 3.2, eqs. (3)-(5): keep,
per bin of the continuous target, the running mean ``mu_b`` and variance ``sigma_b^2`` of the
features; smooth both across bins with a symmetric kernel to get ``mu~_b``, ``sigma~_b^2``; in
training re-colour each feature of bin ``b``:

    z' = (z - mu_b) / sigma_b * sigma~_b + mu~_b          (per feature dimension)

At RoI level the target is the IoU of a positive RoI with its ground truth, binned over
``[fg_iou_thresh, 1]``; RoIs below the foreground threshold (background) pass unchanged.

Differences from the authors' code, each for a reason:

- statistics are updated every step (exponential moving average, ``momentum`` 0.9, the first
  update of a bin takes the step's statistics as is) instead of once per epoch, because a
  detector trains for iterations, not a few epochs; per-step sums are all-reduced across ranks
  (``ltdet.collectives.all_reduce_sum``), so all ranks hold the same statistics;
- smoothing is a normalised convolution over the bins that have statistics (the kernel is
  renormalised at the ends of the range and around bins never seen), instead of reflect
  padding over bins initialised to mean 0 / variance 1, so empty bins never pull the statistics;
- as in the authors' ``calibrate_mean_var``, the variance ratio ``sigma~^2 / sigma^2`` is clipped to
  ``clip`` (default ``[0.1, 10]``) and dimensions with zero variance are left unchanged.

Statistics live in buffers (checkpointed); ``start_update`` / ``start_smooth`` count calls to
``update`` in training mode (iterations).

Shapes: ``features [R, D]``, ``ious [R]`` -> ``[R, D]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..collectives import all_reduce_sum
from ..spec import SpecError, build_from_spec, check_number
from .lds import bin_index, smoothing_kernel

__all__ = ["RoIFDS", "build_fds"]


class RoIFDS(nn.Module):
    """FDS layer over IoU bins (see module docstring).

    Args:
        feature_dim: ``D``.
        bins, lo, hi: equal-width IoU bins over ``[lo, hi]`` (``lo`` = foreground IoU threshold).
        kernel, ks, sigma: smoothing window (:func:`ltdet.imbalance.lds.smoothing_kernel`).
        momentum: EMA factor of the running statistics (``running = m * running + (1 - m) * step``).
        start_update: number of training iterations before statistics start updating.
        start_smooth: number of training iterations before features are re-coloured.
        clip: bounds of the variance ratio ``sigma~^2 / sigma^2``.
        eps: variances at or below ``eps`` count as zero (dimension left unchanged).

    Built from the config's ``model.fds`` by :func:`build_fds` (:meth:`from_config`); the
    defaults above are the config's.
    """

    # buffers (registered in __init__), annotated for type checkers
    kernel: Tensor
    running_mean: Tensor
    running_var: Tensor
    bin_updates: Tensor
    steps: Tensor

    #: The keys of ``model.fds`` (``enabled`` and the constructor's keyword arguments but eps).
    SPEC_KEYS = (
        "enabled",
        "bins",
        "lo",
        "hi",
        "kernel",
        "ks",
        "sigma",
        "momentum",
        "start_update",
        "start_smooth",
        "clip",
    )

    def __init__(
        self,
        feature_dim: int,
        *,
        bins: int = 50,
        lo: float = 0.5,
        hi: float = 1.0,
        kernel: str = "gaussian",
        ks: int = 5,
        sigma: float = 2.0,
        momentum: float = 0.9,
        start_update: int = 0,
        start_smooth: int = 100,
        clip: Sequence[float] = (0.1, 10.0),
        eps: float = 1e-6,
    ):
        super().__init__()
        check_number("model.fds feature_dim", feature_dim, low=1, integer=True)
        check_number("model.fds.bins", bins, low=1, integer=True)
        check_number("model.fds.lo", lo)
        check_number("model.fds.hi", hi)
        if not hi > lo:
            raise SpecError(f"model.fds: need hi > lo, got lo={lo}, hi={hi}")
        check_number("model.fds.momentum", momentum, low=0.0, high=1.0, high_open=True)
        check_number("model.fds.ks", ks, integer=True)
        check_number("model.fds.sigma", sigma)
        check_number("model.fds.start_update", start_update, integer=True)
        check_number("model.fds.start_smooth", start_smooth, integer=True)
        if (
            not isinstance(clip, Sequence)
            or len(clip) != 2
            or any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in clip)
            or not 0 < clip[0] <= clip[1]
        ):
            raise SpecError(f"model.fds.clip must be [low, high] with 0 < low <= high, got {clip}")
        self.feature_dim, self.bins = int(feature_dim), int(bins)
        self.lo, self.hi = float(lo), float(hi)
        self.momentum = float(momentum)
        self.start_update, self.start_smooth = int(start_update), int(start_smooth)
        self.clip = (float(clip[0]), float(clip[1]))
        self.eps = float(eps)
        self.register_buffer(
            "kernel", smoothing_kernel(kernel, int(ks), float(sigma)), persistent=False
        )
        self.register_buffer("running_mean", torch.zeros(self.bins, self.feature_dim))
        self.register_buffer("running_var", torch.ones(self.bins, self.feature_dim))
        self.register_buffer("bin_updates", torch.zeros(self.bins, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _positive_bins(self, features: Tensor, ious: Tensor) -> tuple[Tensor, Tensor]:
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"RoIFDS expects features [R, {self.feature_dim}], got {list(features.shape)}; "
                "model.fds must sit on the flattened box-head output"
            )
        if ious.shape != features.shape[:1]:
            raise ValueError(
                f"RoIFDS: ious {list(ious.shape)} must be [R] for features {list(features.shape)}"
            )
        positive = ious >= self.lo
        return positive, bin_index(ious, self.lo, self.hi, self.bins)

    def smoothed_stats(self) -> tuple[Tensor, Tensor]:
        """``(mu~ [bins, D], var~ [bins, D])``: kernel-smoothed statistics over the seen bins.

        Bins without statistics keep their (unused) running values.
        """
        seen = (self.bin_updates > 0).to(self.running_mean.dtype)
        k = self.kernel.to(self.running_mean).view(1, 1, -1)
        half = (self.kernel.numel() - 1) // 2

        def conv(x: Tensor) -> Tensor:  # [bins, D] -> [bins, D], convolved along bins
            return F.conv1d(x.t().unsqueeze(1), k, padding=half).squeeze(1).t()

        seen = seen.view(-1, 1)
        norm = conv(seen)  # [bins, 1]: kernel mass over the seen neighbours of each bin
        has = norm > 0
        safe = torch.where(has, norm, torch.ones_like(norm))
        mean = torch.where(has, conv(self.running_mean * seen) / safe, self.running_mean)
        var = torch.where(has, conv(self.running_var * seen) / safe, self.running_var)
        return mean, var

    def forward(self, features: Tensor, ious: Tensor) -> Tensor:
        """Re-colour the positive RoIs' features (training, after ``start_smooth`` iterations)."""
        if not self.training or int(self.steps) < self.start_smooth or features.numel() == 0:
            return features
        positive, idx = self._positive_bins(features, ious)
        valid = positive & (self.bin_updates[idx] > 0)
        smooth_mean, smooth_var = self.smoothed_stats()
        mu, var = self.running_mean[idx], self.running_var[idx]
        mu_s, var_s = smooth_mean[idx], smooth_var[idx]
        live = var > self.eps
        ratio = (var_s / torch.where(live, var, torch.ones_like(var))).clamp(*self.clip)
        z = features.float()
        recoloured = (z - mu) * ratio.sqrt() + mu_s
        recoloured = torch.where(live & valid.unsqueeze(1), recoloured, z)
        return recoloured.to(features.dtype)

    @torch.no_grad()
    def update(self, features: Tensor, ious: Tensor) -> None:
        """EMA update of the per-bin statistics from this step's positive RoIs (training only).

        Pass the features *before* re-colouring. Every rank must call it every step (collective).
        """
        if not self.training:
            return
        self.steps += 1
        if int(self.steps) <= self.start_update:
            return
        positive, idx = self._positive_bins(features, ious)
        z = features.detach().float()[positive]
        idx = idx[positive].to(self.running_mean.device)
        z = z.to(self.running_mean.device)
        d = self.feature_dim
        # Two passes (mean, then centred squares): accurate variances in float32.
        sums = torch.zeros(self.bins, d + 1, device=z.device)
        sums[:, :d].index_add_(0, idx, z)
        sums[:, d].index_add_(0, idx, torch.ones_like(idx, dtype=sums.dtype))
        all_reduce_sum(sums)
        count = sums[:, d:]
        present = count.squeeze(1) > 0
        mean = sums[:, :d] / count.clamp(min=1)
        sq = torch.zeros(self.bins, d, device=z.device).index_add_(0, idx, (z - mean[idx]).square())
        all_reduce_sum(sq)
        var = sq / count.clamp(min=1)
        # First statistics of a bin replace the initial values rather than blend with them.
        m = torch.where(self.bin_updates > 0, self.momentum, 0.0).to(mean).view(-1, 1)
        new_mean = m * self.running_mean + (1 - m) * mean
        new_var = m * self.running_var + (1 - m) * var
        keep = present.view(-1, 1)
        self.running_mean.copy_(torch.where(keep, new_mean, self.running_mean))
        self.running_var.copy_(torch.where(keep, new_var, self.running_var))
        self.bin_updates += present.long()

    def extra_repr(self) -> str:
        return (
            f"feature_dim={self.feature_dim}, bins={self.bins}, range=[{self.lo}, {self.hi}], "
            f"momentum={self.momentum}, start_update={self.start_update}, "
            f"start_smooth={self.start_smooth}"
        )

    @classmethod
    def from_config(
        cls, spec: Mapping, *, feature_dim: int, fg_iou_thresh: float | None = None
    ) -> RoIFDS:
        """``RoIFDS`` from a ``model.fds`` spec: every key but ``enabled`` is a constructor
        argument; an unset ``lo`` is the RoI head's foreground IoU threshold when given."""
        kwargs = {k: v for k, v in spec.items() if k not in ("type", "enabled")}
        if fg_iou_thresh is not None:
            kwargs.setdefault("lo", float(fg_iou_thresh))
        return cls(feature_dim, **kwargs)


def build_fds(
    cfg: Mapping | None, feature_dim: int, *, fg_iou_thresh: float | None = None
) -> RoIFDS | None:
    """``RoIFDS`` from ``model.fds``, or ``None`` when absent or ``enabled: false``.

    Keys: ``enabled`` and the keyword arguments of :class:`RoIFDS` but ``eps`` (with its
    defaults); ``lo`` defaults to ``fg_iou_thresh`` when given. Raises ``ltdet.spec.SpecError``
    for an unknown key or value.
    """
    if not cfg or not cfg.get("enabled", False):
        return None
    return build_from_spec(
        {"fds": RoIFDS},
        "model",
        cfg,
        default_type="fds",
        feature_dim=feature_dim,
        fg_iou_thresh=fg_iou_thresh,
    )
