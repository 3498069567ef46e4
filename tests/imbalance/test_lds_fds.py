"""LDS and FDS at RoI level, checked against independent NumPy computations."""

import numpy as np
import pytest
import torch

from ltdet.imbalance.fds import RoIFDS, build_fds
from ltdet.imbalance.lds import RoILDS, build_lds, smoothing_kernel

BINS, LO, HI = 10, 0.5, 1.0
WIDTH = (HI - LO) / BINS
CENTERS = LO + WIDTH * (np.arange(BINS) + 0.5)


def _values_for_counts(counts):
    return torch.tensor(np.repeat(CENTERS, counts), dtype=torch.float32)


def _np_kernel(kind, ks, sigma):
    x = np.arange(ks) - (ks - 1) // 2
    if kind == "gaussian":
        # the authors' window: scipy's gaussian_filter1d (radius int(4 sigma + 0.5), reflect
        # boundary = numpy 'symmetric') of a delta of length ks
        r = int(4 * sigma + 0.5)
        taps = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
        delta = (x == 0).astype(np.float64)
        w = np.correlate(np.pad(delta, r, mode="symmetric"), taps / taps.sum(), "valid")
    elif kind == "laplace":
        w = np.exp(-np.abs(x) / sigma)
    else:
        w = {3: [0.5, 1.0, 0.5], 5: [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]}[ks]  # scipy triang(ks)
        w = np.asarray(w)
    return w / w.max()


@pytest.mark.parametrize(
    "kind,ks,sigma",
    [("gaussian", 5, 2.0), ("triang", 5, 2.0), ("laplace", 3, 1.0), ("triang", 3, 1.0)],
)
def test_kernels_match_closed_forms(kind, ks, sigma):
    np.testing.assert_allclose(
        smoothing_kernel(kind, ks, sigma).numpy(), _np_kernel(kind, ks, sigma), rtol=1e-6
    )


def test_kernel_rejects_bad_args():
    with pytest.raises(ValueError, match="odd"):
        smoothing_kernel("gaussian", 4, 2.0)
    with pytest.raises(ValueError, match="unknown kernel"):
        smoothing_kernel("box", 5, 2.0)


@pytest.mark.parametrize(
    "kind,reweight", [("gaussian", "sqrt_inv"), ("laplace", "inverse"), ("triang", "sqrt_inv")]
)
def test_lds_weights_equal_independent_computation(kind, reweight):
    counts = np.array([50, 30, 20, 10, 5, 3, 2, 1, 0, 4])
    lds = RoILDS(bins=BINS, lo=LO, hi=HI, kernel=kind, ks=5, sigma=2.0, reweight=reweight).train()
    # Two updates (the histogram accumulates over steps).
    lds.update(_values_for_counts(counts // 2))
    lds.update(_values_for_counts(counts - counts // 2))
    assert lds.counts.tolist() == counts.tolist()

    # The authors' order (imbalanced-regression `_prepare_weights`): sqrt of the counts first
    # (sqrt_inv), then the smoothing, then the inverse; scaled to mean 1 over the samples seen.
    base = np.sqrt(counts) if reweight == "sqrt_inv" else counts.astype(np.float64)
    density = np.convolve(base, _np_kernel(kind, 5, 2.0), mode="same")
    per_bin = 1.0 / np.maximum(density, density[density > 0].min())
    per_bin = per_bin * counts.sum() / (counts * per_bin).sum()
    query_bins = np.array([0, 0, 1, 3, 5, 7, 8, 9, 9])
    query = torch.tensor(CENTERS[query_bins], dtype=torch.float32)
    expected = per_bin[query_bins]
    got = lds.weights(query)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # mean 1 over the accumulated histogram (the training samples), as the authors' scaling
    all_seen = lds.weights(_values_for_counts(counts))
    assert all_seen.double().mean().item() == pytest.approx(1.0, rel=1e-6)
    # Rarer IoU regions get larger weights than the crowded low-IoU bins.
    assert got[-1] > got[0]


def test_lds_update_only_in_training_and_state_in_buffer():
    lds = RoILDS(bins=BINS, lo=LO, hi=HI)
    lds.eval()
    lds.update(torch.tensor([0.6, 0.7]))
    assert lds.counts.sum().item() == 0
    assert "counts" in lds.state_dict() and "kernel" not in lds.state_dict()
    lds.train()
    # Out-of-range values clamp into the end bins.
    values = torch.tensor([0.2, 0.5, 0.99, 1.0, 1.7])
    lds.update(values)
    w = lds.weights(values)
    assert lds.counts[0].item() == 2 and lds.counts[-1].item() == 3
    assert w.shape == (5,) and w.mean().item() == pytest.approx(1.0)
    fresh = RoILDS(bins=BINS, lo=LO, hi=HI)
    fresh.load_state_dict(lds.state_dict())
    assert torch.equal(fresh.counts, lds.counts)


def test_lds_empty_and_before_update():
    lds = RoILDS(bins=BINS, lo=LO, hi=HI).train()
    assert lds.weights(torch.zeros(0)).shape == (0,)
    assert torch.equal(lds.weights(torch.tensor([0.55, 0.95])), torch.ones(2))
    lds.update(torch.zeros(0))
    assert lds.counts.sum().item() == 0
    # A bin that has no effective density yet counts as the rarest seen so far.
    lds.update(_values_for_counts([100, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    # sqrt_inv: smooth(sqrt(counts)), inverted, scaled to mean 1 over the 100 samples seen
    dens = np.convolve(
        np.sqrt(np.array([100.0] + [0] * 9)), _np_kernel("gaussian", 5, 2.0), mode="same"
    )
    w = lds.weights(torch.tensor([CENTERS[0], CENTERS[9]], dtype=torch.float32))
    per = 1.0 / np.array([dens[0], dens[2]])  # bin 9 -> smallest positive density (bin 2)
    np.testing.assert_allclose(w.numpy(), per * dens[0], rtol=1e-5)  # bin 0 holds every sample


def test_build_lds():
    assert build_lds(None) is None
    assert build_lds({"enabled": False}) is None
    lds = build_lds({"enabled": True, "bins": 20}, fg_iou_thresh=0.6)
    assert (lds.lo, lds.hi, lds.bins, lds.target) == (0.6, 1.0, 20, "iou")
    delta = build_lds({"enabled": True, "target": "delta", "reweight": "inverse"})
    assert (delta.lo, delta.hi, delta.reweight) == (0.0, 3.0, "inverse")
    with pytest.raises(ValueError, match="unknown key"):
        build_lds({"enabled": True, "bin": 20})
    with pytest.raises(ValueError, match="reweight"):
        build_lds({"enabled": True, "reweight": "log"})


# ---------------------------------------------------------------------------------------------
# FDS

D = 3
FDS_BINS = 5
FDS_CENTERS = LO + (HI - LO) / FDS_BINS * (np.arange(FDS_BINS) + 0.5)


def _bin_features(rng, n_per_bin, means, stds):
    feats, ious = [], []
    for b in range(FDS_BINS):
        if n_per_bin[b] == 0:
            continue
        z = rng.standard_normal((n_per_bin[b], D))
        z = (z - z.mean(0)) / z.std(0)  # exact population mean 0 / std 1
        feats.append(z * stds[b] + means[b])
        ious.append(np.full(n_per_bin[b], FDS_CENTERS[b]))
    return (
        torch.tensor(np.concatenate(feats), dtype=torch.float32),
        torch.tensor(np.concatenate(ious), dtype=torch.float32),
    )


def _np_smooth(stat, seen, kernel):
    """Normalised convolution over the seen bins (kernel renormalised at the edges)."""
    half = (len(kernel) - 1) // 2
    out = np.array(stat, dtype=np.float64)
    for b in range(len(stat)):
        num, den = 0.0, 0.0
        for k, kv in enumerate(kernel):
            j = b + k - half
            if 0 <= j < len(stat) and seen[j]:
                num = num + kv * stat[j]
                den += kv
        if den > 0:
            out[b] = num / den
    return out


def _stats(rng):
    means = rng.uniform(-2, 2, (FDS_BINS, D))
    stds = rng.uniform(0.6, 1.6, (FDS_BINS, D))  # variance ratios stay within the [0.1, 10] clip
    return means, stds


def test_fds_running_stats_and_recolouring_onto_smoothed_stats():
    rng = np.random.default_rng(0)
    means, stds = _stats(rng)
    n = [400, 300, 200, 100, 50]
    feats, ious = _bin_features(rng, n, means, stds)
    background = torch.randn(7, D)
    feats_all = torch.cat([feats, background])
    ious_all = torch.cat([ious, torch.full((7,), 0.3)])

    fds = RoIFDS(
        D, bins=FDS_BINS, lo=LO, hi=HI, kernel="gaussian", ks=5, sigma=2.0, start_smooth=0
    ).train()
    fds.update(feats_all, ious_all)
    # First update of a bin: the step's population statistics; background RoIs excluded.
    np.testing.assert_allclose(fds.running_mean.numpy(), means, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fds.running_var.numpy(), stds**2, rtol=1e-4)

    kernel = _np_kernel("gaussian", 5, 2.0)
    seen = np.ones(FDS_BINS, dtype=bool)
    smooth_mean = _np_smooth(means, seen, kernel)
    smooth_var = _np_smooth(stds**2, seen, kernel)
    sm, sv = fds.smoothed_stats()
    np.testing.assert_allclose(sm.numpy(), smooth_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sv.numpy(), smooth_var, rtol=1e-4)

    out = fds(feats_all, ious_all)
    assert torch.equal(out[-7:], background)  # below the foreground threshold: unchanged
    start = 0
    for b in range(FDS_BINS):
        z = out[start : start + n[b]].double().numpy()
        start += n[b]
        np.testing.assert_allclose(z.mean(0), smooth_mean[b], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(z.std(0), np.sqrt(smooth_var[b]), rtol=1e-4)
    # Training only.
    fds.eval()
    assert torch.equal(fds(feats_all, ious_all), feats_all)


def test_fds_momentum_unseen_bins_and_start_iterations():
    rng = np.random.default_rng(1)
    means, stds = _stats(rng)
    n1 = [50, 50, 0, 50, 50]  # bin 2 never seen
    f1, i1 = _bin_features(rng, n1, means, stds)
    f2, i2 = _bin_features(rng, n1, means + 1.0, stds * 1.2)
    fds = RoIFDS(
        D, bins=FDS_BINS, lo=LO, hi=HI, momentum=0.9, start_update=1, start_smooth=3
    ).train()
    fds.update(f1, i1)  # iteration 1 <= start_update: skipped
    assert fds.bin_updates.sum().item() == 0 and fds.steps.item() == 1
    fds.update(f1, i1)
    fds.update(f2, i2)
    seen = np.array([True, True, False, True, True])
    assert fds.bin_updates.tolist() == [2, 2, 0, 2, 2]
    exp_mean = 0.9 * means + 0.1 * (means + 1.0)
    exp_var = 0.9 * stds**2 + 0.1 * (stds * 1.2) ** 2
    np.testing.assert_allclose(fds.running_mean.numpy()[seen], exp_mean[seen], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fds.running_var.numpy()[seen], exp_var[seen], rtol=1e-4)
    # The unseen bin keeps its initial statistics and is ignored by the smoothing.
    assert torch.equal(fds.running_mean[2], torch.zeros(D))
    kernel = _np_kernel("gaussian", 5, 2.0)
    sm, _ = fds.smoothed_stats()
    np.testing.assert_allclose(
        sm.numpy(),
        _np_smooth(fds.running_mean.double().numpy(), seen, kernel),
        rtol=1e-4,
        atol=1e-5,
    )

    probe = torch.randn(4, D)
    probe_iou = torch.tensor([FDS_CENTERS[2]] * 2 + [FDS_CENTERS[0]] * 2, dtype=torch.float32)
    fds.steps.fill_(2)  # before start_smooth: identity
    assert torch.equal(fds(probe, probe_iou), probe)
    fds.steps.fill_(3)
    out = fds(probe, probe_iou)
    assert torch.equal(out[:2], probe[:2])  # RoIs of a bin without statistics pass unchanged
    assert not torch.allclose(out[2:], probe[2:])


def test_fds_empty_zero_variance_and_errors():
    fds = RoIFDS(D, bins=FDS_BINS, lo=LO, hi=HI, start_smooth=0).train()
    fds.update(torch.zeros(0, D), torch.zeros(0))
    assert fds.bin_updates.sum().item() == 0
    assert fds(torch.zeros(0, D), torch.zeros(0)).shape == (0, D)
    # One sample in a bin: zero variance in every dimension -> features pass unchanged.
    z = torch.randn(1, D)
    iou = torch.tensor([0.95])
    fds.update(z, iou)
    assert torch.equal(fds(z, iou), z)
    with pytest.raises(ValueError, match="features"):
        fds(torch.zeros(2, D + 1), torch.zeros(2))
    with pytest.raises(ValueError, match="ious"):
        fds(torch.zeros(2, D), torch.zeros(3))
    assert {"running_mean", "running_var", "bin_updates", "steps"} <= set(fds.state_dict())


def test_fds_gradient_flows_through_recolouring():
    rng = np.random.default_rng(2)
    means, stds = _stats(rng)
    feats, ious = _bin_features(rng, [20] * FDS_BINS, means, stds)
    fds = RoIFDS(D, bins=FDS_BINS, lo=LO, hi=HI, start_smooth=0).train()
    fds.update(feats, ious)
    x = feats.clone().requires_grad_(True)
    fds(x, ious).sum().backward()
    assert x.grad is not None and torch.all(x.grad > 0)


def test_build_fds():
    assert build_fds({"enabled": False}, 8) is None
    fds = build_fds({"enabled": True, "momentum": 0.8, "start_smooth": 5}, 8, fg_iou_thresh=0.6)
    assert (fds.feature_dim, fds.lo, fds.momentum, fds.start_smooth) == (8, 0.6, 0.8, 5)
    with pytest.raises(ValueError, match="unknown key"):
        build_fds({"enabled": True, "smoothing": 1}, 8)
    with pytest.raises(ValueError, match="momentum"):
        build_fds({"enabled": True, "momentum": 1.0}, 8)


# ---------------------------------------------------------------------------------------------
# Distributed: two gloo ranks, each with half of the RoIs, must hold the full-data statistics.


def _dist_worker(rank, world, port, feats, ious, out):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        fds = RoIFDS(D, bins=FDS_BINS, lo=LO, hi=HI, start_smooth=0).train()
        lds = RoILDS(bins=FDS_BINS, lo=LO, hi=HI).train()
        part = slice(rank, None, world)
        fds.update(feats[part], ious[part])
        lds.update(ious[part])
        out[rank] = (fds.running_mean.clone(), fds.running_var.clone(), lds.counts.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes (~10 s of CPU for the imports)
def test_statistics_are_all_reduced_across_ranks():
    import socket

    import torch.multiprocessing as mp

    rng = np.random.default_rng(3)
    means, stds = _stats(rng)
    feats, ious = _bin_features(rng, [40, 30, 20, 10, 6], means, stds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(2, port, feats, ious, out), nprocs=2, join=True)
    single = RoIFDS(D, bins=FDS_BINS, lo=LO, hi=HI).train()
    single.update(feats, ious)
    for rank in range(2):
        mean, var, counts = out[rank]
        torch.testing.assert_close(mean, single.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, single.running_var, rtol=1e-5, atol=1e-6)
        assert counts.tolist() == [40, 30, 20, 10, 6]
