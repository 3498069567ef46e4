"""Label distribution smoothing (LDS) for the RoI box-regression loss.

Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021, Sec. 3.1, eq. (2): the
effective label density is the empirical histogram of a continuous target convolved with a
symmetric kernel, ``p~(y') = sum_y k(y, y') p(y)``; the loss of a sample is re-weighted by the
inverse of the effective density of its bin. The square-root variant follows the authors' code
(``_prepare_weights(reweight='sqrt_inv', lds=True)`` in YyzHarry/imbalanced-regression): square
root of the bin counts first, then the smoothing, then the inverse, ``1 / smooth(sqrt(n))``
(not ``1 / sqrt(smooth(n))``); the weights are scaled as theirs, to mean 1 over the training
samples (here: over the accumulated histogram).

At RoI level the continuous target of a positive RoI is its IoU with its matched ground truth
(``target="iou"``, range ``[fg_iou_thresh, 1]``; most positives sit just above the threshold),
or the L2 norm of its regression-target deltas (``target="delta"``, range ``[0, hi]``). Values
outside ``[lo, hi]`` fall in the first / last bin.

The histogram is accumulated over training (``update``, training mode only) in an int64 buffer,
so it survives checkpoint / resume; per-step counts are summed over ranks
(``ltdet.collectives.all_reduce_sum``), so every rank weights with the same density.

Shapes: ``values [P]`` (one per positive RoI) -> ``weights [P]``; the weights average to 1 over
the accumulated histogram (every positive seen in training), not over each batch.

Deliberate difference: for ``reweight="inverse"`` the authors clip the per-value counts to
``[5, 1000]`` before smoothing, a range tuned to their age data sets (a few thousand samples
per label). The RoI histogram grows without bound over a detector's schedule (millions of
positives on LVIS: ~2,000 per iteration at 16 images x 512 RoIs x 25%), so a fixed clip would
put every populated bin at 1000 within the first hundred iterations and make the weights
uniform; no clip is applied here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..collectives import all_reduce_sum
from ..spec import SpecError, build_from_spec, check_choice, check_number

__all__ = ["smoothing_kernel", "smooth_histogram", "bin_index", "RoILDS", "build_lds"]

KERNELS = ("gaussian", "triang", "laplace")
#: The continuous value ``RoILDS`` bins: a positive RoI's IoU with its ground truth, or the norm
#: of its regression-target deltas.
TARGETS = ("iou", "delta")
REWEIGHTS = ("sqrt_inv", "inverse")
# The norm of the standard-weighted Fast R-CNN deltas of positives rarely exceeds 3.
_DELTA_RANGE = (0.0, 3.0)


def smoothing_kernel(kind: str = "gaussian", ks: int = 5, sigma: float = 2.0) -> Tensor:
    """Symmetric smoothing window of odd length ``ks``, peak value 1 (Yang et al., ICML 2021).

    ``x = -(ks-1)/2 .. (ks-1)/2`` (bin offsets):

    - ``gaussian``: the authors' window (``get_lds_kernel_window``): scipy's
      ``gaussian_filter1d(delta, sigma)`` of a length-``ks`` delta, i.e. a normalised gaussian of
      radius ``int(4 sigma + 0.5)`` correlated with the delta under scipy's ``reflect`` boundary
      (numpy's ``symmetric``), which folds the tails back when the radius exceeds the window:
      at ks 5, sigma 2 it is [0.858, 0.946, 1, 0.946, 0.858], not the closed form's
      [0.607, 0.882, 1, 0.882, 0.607]. Computed here without scipy (bit-equal to it, 1e-16).
    - ``triang``: ``1 - |x| / ((ks+1)/2)`` (``scipy.signal.windows.triang``);
    - ``laplace``: ``exp(-|x| / sigma)``.
    """
    if kind not in KERNELS:
        raise ValueError(f"LDS/FDS kernel: unknown kernel {kind!r}; choose one of {list(KERNELS)}")
    if ks < 1 or ks % 2 == 0:
        raise ValueError(f"LDS/FDS kernel: ks must be a positive odd integer, got {ks}")
    if kind != "triang" and not sigma > 0:
        raise ValueError(f"LDS/FDS kernel: sigma must be > 0, got {sigma}")
    half = (ks - 1) // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    if kind == "gaussian":
        radius = int(4.0 * sigma + 0.5)  # scipy's truncate=4.0
        taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
        weights = torch.exp(-taps.square() / (2.0 * sigma * sigma))
        delta = torch.zeros(ks, dtype=torch.float64)
        delta[half] = 1.0
        # reflect (d c b a | a b c d | d c b a) repeated as often as the radius needs
        index = torch.arange(-radius, ks + radius)
        period = 2 * ks
        index = index % period
        index = torch.where(index >= ks, period - 1 - index, index)
        window = (delta[index].unfold(0, 2 * radius + 1, 1) * (weights / weights.sum())).sum(1)
    elif kind == "triang":
        window = 1.0 - x.abs() / (half + 1)
    else:
        window = torch.exp(-x.abs() / sigma)
    return (window / window.max()).float()


def smooth_histogram(hist: Tensor, kernel: Tensor) -> Tensor:
    """Effective density ``hist * kernel`` (1-D convolution, zero padding outside the range).

    ``hist [B]`` float, ``kernel [ks]`` symmetric -> ``[B]``. Zero ("constant") padding as in the
    authors' ``convolve1d(..., mode='constant')``.
    """
    half = (kernel.numel() - 1) // 2
    k = kernel.to(device=hist.device, dtype=hist.dtype).view(1, 1, -1)
    return F.conv1d(hist.view(1, 1, -1), k, padding=half).view(-1)


def bin_index(values: Tensor, lo: float, hi: float, bins: int) -> Tensor:
    """Equal-width bin of each value over ``[lo, hi]``; out-of-range values clamp to the end
    bins."""
    idx = torch.floor((values.float() - lo) * (bins / (hi - lo))).long()
    return idx.clamp_(0, bins - 1)


class RoILDS(nn.Module):
    """LDS re-weighting of the positive RoIs' box loss over bins of a continuous target.

    Args (keyword-only):
        bins: number of equal-width bins over ``[lo, hi]``.
        lo, hi: target range (IoU: ``[fg_iou_thresh, 1]``).
        target: ``"iou"`` or ``"delta"`` - which value the RoI head passes (documentation and
            dispatch for the caller; the module only bins the values it receives).
        kernel, ks, sigma: smoothing window (:func:`smoothing_kernel`).
        reweight: ``"sqrt_inv"`` (``1 / smooth(sqrt(counts))``, the authors' default) or
            ``"inverse"`` (``1 / smooth(counts)``).

    Use: ``lds.update(values)`` then ``w = lds.weights(values)``; multiply the per-RoI box loss
    of the positives by ``w``. Built from the config's ``model.lds`` by :func:`build_lds`
    (:meth:`from_config`); the defaults above are the config's.
    """

    # buffers (registered in __init__), annotated for type checkers
    kernel: Tensor
    counts: Tensor

    #: The keys of ``model.lds`` (``enabled`` and the constructor's arguments).
    SPEC_KEYS = ("enabled", "bins", "lo", "hi", "target", "kernel", "ks", "sigma", "reweight")

    def __init__(
        self,
        *,
        bins: int = 50,
        lo: float = 0.5,
        hi: float = 1.0,
        target: str = "iou",
        kernel: str = "gaussian",
        ks: int = 5,
        sigma: float = 2.0,
        reweight: str = "sqrt_inv",
    ):
        super().__init__()
        check_number("model.lds.bins", bins, integer=True)
        if bins < 1:  # the wording config errors have always used
            raise SpecError(f"model.lds.bins must be >= 1, got {bins}")
        check_number("model.lds.lo", lo)
        check_number("model.lds.hi", hi)
        if not hi > lo:
            raise SpecError(f"model.lds: need hi > lo, got lo={lo}, hi={hi}")
        check_choice("model.lds.target", target, TARGETS)
        check_choice("model.lds.reweight", reweight, REWEIGHTS)
        check_number("model.lds.ks", ks, integer=True)
        check_number("model.lds.sigma", sigma)
        self.bins, self.lo, self.hi = int(bins), float(lo), float(hi)
        self.target, self.reweight = target, reweight
        self.register_buffer(
            "kernel", smoothing_kernel(kernel, int(ks), float(sigma)), persistent=False
        )
        # Exact counts; int64 does not saturate over a long LVIS schedule as float32 would.
        self.register_buffer("counts", torch.zeros(self.bins, dtype=torch.long))

    def bin_index(self, values: Tensor) -> Tensor:
        return bin_index(values, self.lo, self.hi, self.bins)

    @torch.no_grad()
    def update(self, values: Tensor) -> None:
        """Add the values of this step's positives to the histogram (training mode only)."""
        if not self.training:
            return
        step = torch.bincount(self.bin_index(values.detach()).view(-1), minlength=self.bins)
        self.counts += all_reduce_sum(step.to(self.counts.device))

    def density(self) -> Tensor:
        """Effective density per bin ``[bins]`` (float64), the quantity that is inverted:
        ``smooth(sqrt(counts))`` for ``sqrt_inv``, ``smooth(counts)`` for ``inverse``.

        The order is the authors' (``_prepare_weights`` in YyzHarry/imbalanced-regression: the
        square root is taken of the bin counts *before* the kernel smoothing, then inverted), not
        ``sqrt(smooth(counts))``."""
        counts = self.counts.to(torch.float64)
        if self.reweight == "sqrt_inv":
            counts = counts.sqrt()
        return smooth_histogram(counts, self.kernel)

    @torch.no_grad()
    def per_bin_weights(self) -> Tensor:
        """Weight of each bin ``[bins]`` (float64): ``1 / density``, scaled as the authors scale
        their per-sample weights (``len(weights) / sum(weights)`` over the training samples): the
        mean weight over the samples in the histogram is 1, ``sum_b n_b w_b = sum_b n_b``.

        Empty histogram: all 1. A bin whose effective density is still 0 (queried before its
        first count) gets the smallest positive density, i.e. it is treated as the rarest region
        seen so far."""
        dens = self.density()
        positive = dens[dens > 0]
        if positive.numel() == 0:
            return torch.ones_like(dens)
        per_bin = torch.maximum(dens, positive.min()).reciprocal()
        counts = self.counts.to(torch.float64)
        return per_bin * (counts.sum() / (counts * per_bin).sum())

    @torch.no_grad()
    def weights(self, values: Tensor) -> Tensor:
        """Per-sample weights ``[P]`` (float32): the weight of each value's bin
        (:meth:`per_bin_weights`: inverse effective density, mean 1 over the accumulated
        histogram, so the weights of one batch need not average to 1)."""
        if values.numel() == 0:
            return values.new_zeros(0, dtype=torch.float32)
        per_bin = self.per_bin_weights().to(values.device)
        return per_bin[self.bin_index(values.detach()).to(values.device)].float()

    def extra_repr(self) -> str:
        return (
            f"bins={self.bins}, range=[{self.lo}, {self.hi}], target={self.target}, "
            f"reweight={self.reweight}"
        )

    @classmethod
    def from_config(cls, spec: Mapping, *, fg_iou_thresh: float | None = None) -> RoILDS:
        """``RoILDS`` from a ``model.lds`` spec: every key but ``enabled`` is a constructor
        argument; an unset range follows the target: ``iou`` -> ``[fg_iou_thresh, 1]`` (the
        constructor's ``[0.5, 1]`` without a threshold), ``delta`` -> ``[0, 3]``."""
        kwargs = {k: v for k, v in spec.items() if k not in ("type", "enabled")}
        target = kwargs.get("target", inspect.signature(cls).parameters["target"].default)
        if target == "delta":
            kwargs.setdefault("lo", _DELTA_RANGE[0])
            kwargs.setdefault("hi", _DELTA_RANGE[1])
        elif fg_iou_thresh is not None:
            kwargs.setdefault("lo", float(fg_iou_thresh))
        return cls(**kwargs)


def build_lds(cfg: Mapping | None, *, fg_iou_thresh: float | None = None) -> RoILDS | None:
    """``RoILDS`` from ``model.lds``, or ``None`` when absent or ``enabled: false``.

    Keys: ``enabled`` and the arguments of :class:`RoILDS` (with its defaults), the range as
    :meth:`RoILDS.from_config` sets it. Raises ``ltdet.spec.SpecError`` for an unknown key or
    value.
    """
    if not cfg or not cfg.get("enabled", False):
        return None
    return build_from_spec(
        {"lds": RoILDS}, "model", cfg, default_type="lds", fg_iou_thresh=fg_iou_thresh
    )
