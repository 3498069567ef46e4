"""Issue 10, points 3-6: ltdet against references written here from the authors' own code.

Each reference below is an independent re-statement of the authors' code (not of ltdet's):

- CARL: mmdetection, mmdet/models/losses/pisa_loss.py `carl_loss` and
  mmdet/models/roi_heads/pisa_roi_head.py `PISARoIHead._bbox_forward_train` (loss_bbox from the
  bbox head, then `loss_bbox.update(carl_loss(...))`), in mmdetection's own label layout
  (background = last class, class-agnostic of background deltas).
- LDS: YyzHarry/imbalanced-regression, agedb-dir/datasets.py `_prepare_weights` and
  agedb-dir/utils.py `get_lds_kernel_window`.
- tau-norm: facebookresearch/classifier-balancing, tau_norm.py (`pnorm`, `forward`, the sweep
  `np.linspace(0, 2, 21)`).
- RFS: facebookresearch/detectron2, detectron2/data/samplers/distributed_sampler.py
  `RepeatFactorTrainingSampler.repeat_factors_from_category_frequency` on the data set that
  detectron2/data/build.py has filtered of images without annotations
  (`filter_images_with_only_crowd_annotations`, `DATALOADER.FILTER_EMPTY_ANNOTATIONS`).
- Label-aware smoothing: dvlab-research/MiSLAS, methods.py `LabelAwareSmoothing.__init__`.
- avg_factor with reduction "sum": mmdetection, mmdet/models/losses/utils.py `weight_reduce_loss`.
"""

import inspect
import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from ltdet.data import LVISDetection, RepeatFactorSampler, build_train_sampler, repeat_factors
from ltdet.data.samplers import DATA_SAMPLER_KEYS
from ltdet.imbalance.las_factors import label_aware_smoothing
from ltdet.imbalance.lds import RoILDS
from ltdet.losses import LOSSES, build_loss
from ltdet.models.classifiers import tau_normalize
from ltdet.models.roi_heads import LTRoIHeads
from ltdet.models.roi_samplers import RoISamples

C = 5  # foreground classes of `_stage1_predictor` (the tau-norm tests)


# =============================================================================================
# 3. CARL (PISA): loss_bbox unweighted + loss_carl, mmdetection's carl_loss / PISARoIHead
# =============================================================================================


def _mm_smooth_l1(pred, target, beta):
    """mmdetection's smooth_l1_loss, element-wise (mmdet/models/losses/smooth_l1_loss.py)."""
    diff = torch.abs(pred - target)
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def _mm_pos(labels, num_classes):
    return ((labels >= 0) & (labels < num_classes)).nonzero().reshape(-1)


def _mm_loss_bbox(bbox_pred, labels, bbox_targets, num_classes, beta):
    """BBoxHead.loss's box term: positives' class-specific deltas, summed, / bbox_targets.size(0)
    (avg_factor = all sampled RoIs); bbox_weights are 1 on positives."""
    pos = _mm_pos(labels, num_classes)
    pred = bbox_pred.view(bbox_pred.size(0), -1, 4)[pos, labels[pos]]
    return _mm_smooth_l1(pred, bbox_targets[pos], beta).sum() / bbox_targets.size(0)


def _mm_carl_loss(cls_score, labels, bbox_pred, bbox_targets, num_classes, beta, k=1.0, bias=0.2):
    """mmdetection's carl_loss (softmax head, avg_factor None)."""
    pos = _mm_pos(labels, num_classes)
    pos_labels = labels[pos]
    pos_cls_score = cls_score.softmax(-1)[pos, pos_labels]
    carl_w = (bias + (1 - bias) * pos_cls_score).pow(k)
    carl_w = carl_w * (float(pos_cls_score.size(0)) / carl_w.sum())
    avg_factor = bbox_targets.size(0)
    pos_pred = bbox_pred.view(bbox_pred.size(0), -1, 4)[pos, pos_labels]
    ori = _mm_smooth_l1(pos_pred, bbox_targets[pos], beta) / avg_factor
    return (ori * carl_w[:, None].expand(-1, 4)).sum()


def _to_mmdet_layout(logits, box_regression, labels):
    """torchvision layout (column 0 = background, (C+1)*4 deltas) -> mmdetection's (background
    = column C, labels 0..C-1 for classes and C for background, C*4 class-specific deltas)."""
    n, C = logits.shape[0], logits.shape[1] - 1
    mm_logits = torch.cat([logits[:, 1:], logits[:, :1]], dim=1)
    mm_labels = torch.where(labels > 0, labels - 1, torch.full_like(labels, C))
    mm_deltas = box_regression.view(n, C + 1, 4)[:, 1:].reshape(n, C * 4)
    return mm_logits, mm_deltas, mm_labels


@pytest.fixture
def carl_head(tiny_roi_heads):
    """`carl_head(**sampler)`: a PISA head on `tiny_roi_heads()` with CARL, in train mode."""

    def _carl_head(**sampler):
        # mmdetection's PISA Faster R-CNN config: SmoothL1Loss(beta=1.0), carl=dict(k=1, bias=0.2)
        cfg = {"type": "pisa", "k": 1.0, "bias": 0.2, "isr_p": False, "isr_n": False, **sampler}
        return LTRoIHeads.from_roi_heads(
            tiny_roi_heads(), sampler=cfg, box_loss={"type": "smooth_l1", "beta": 1.0}
        ).train()

    return _carl_head


def _carl_samples(seed=0):
    """Two images: 6 + 4 sampled RoIs, 4 + 2 positives; float64."""
    g = torch.Generator().manual_seed(seed)
    labels = [torch.tensor([1, 3, 3, 0, 5, 0]), torch.tensor([2, 0, 2, 0])]
    proposals = [torch.rand(len(x), 4, generator=g, dtype=torch.float64) for x in labels]
    targets = [torch.randn(len(x), 4, generator=g, dtype=torch.float64) for x in labels]
    zeros = [torch.zeros(len(x), dtype=torch.long) for x in labels]
    return RoISamples(
        proposals=proposals,
        labels=labels,
        matched_idxs=zeros,
        ious=[torch.rand(len(x), generator=g, dtype=torch.float64) for x in labels],
        regression_targets=targets,
        matched_gt_boxes=proposals,
        gt_boxes=[torch.rand(1, 4, dtype=torch.float64)] * 2,
    )


def test_carl_is_added_to_the_unweighted_box_loss_like_mmdetection(carl_head, tiny_num_classes):
    C = tiny_num_classes
    head = carl_head()
    samples = _carl_samples()
    n = sum(len(x) for x in samples.labels)
    g = torch.Generator().manual_seed(1)
    logits = (2 * torch.randn(n, C + 1, generator=g, dtype=torch.float64)).requires_grad_(True)
    deltas = torch.randn(n, (C + 1) * 4, generator=g, dtype=torch.float64).requires_grad_(True)
    losses = head.box_losses(logits, deltas, samples)

    labels = torch.cat(samples.labels)
    targets = torch.cat(samples.regression_targets)
    mm_logits, mm_deltas, mm_labels = _to_mmdet_layout(logits, deltas, labels)
    ref_bbox = _mm_loss_bbox(mm_deltas, mm_labels, targets, C, beta=1.0)
    ref_carl = _mm_carl_loss(mm_logits, mm_labels, mm_deltas, targets, C, beta=1.0)

    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_carl"}
    torch.testing.assert_close(losses["loss_box_reg"], ref_bbox, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses["loss_carl"], ref_carl, rtol=1e-12, atol=1e-12)
    # gradients of the box part of the objective (loss_bbox + loss_carl) into both branches
    ours = torch.autograd.grad(
        losses["loss_box_reg"] + losses["loss_carl"], (logits, deltas), retain_graph=True
    )
    theirs = torch.autograd.grad(ref_bbox + ref_carl, (logits, deltas))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the unweighted box loss sends nothing into the classifier; CARL does
    (g_cls,) = torch.autograd.grad(
        losses["loss_box_reg"], logits, retain_graph=True, allow_unused=True
    )
    assert g_cls is None or g_cls.abs().sum() == 0
    assert torch.autograd.grad(losses["loss_carl"], logits)[0].abs().sum() > 0


def test_carl_key_present_in_every_step_and_absent_when_disabled(carl_head, head_inputs):
    features, proposals, shapes, targets = head_inputs(gt_per_image=(3, 2))
    _, losses = carl_head()(features, proposals, shapes, targets)
    assert "loss_carl" in losses and losses["loss_carl"] > 0
    empty = head_inputs(gt_per_image=(0, 0))
    _, losses = carl_head(isr_n=True)(*empty)
    assert losses["loss_carl"] == 0 and losses["loss_box_reg"] == 0  # no positives: still logged
    _, losses = carl_head(carl=False)(features, proposals, shapes, targets)
    assert "loss_carl" not in losses


# =============================================================================================
# 4. LDS: sqrt of the bin counts, then smoothing, then inverse; scaled to mean 1 over samples
# =============================================================================================


def _authors_kernel(kind, ks, sigma):
    """get_lds_kernel_window: triang = scipy.signal.windows.triang(ks); laplace =
    exp(-|x|/sigma)/(2 sigma) / its max; gaussian = scipy's gaussian_filter1d of a delta
    (normalised taps of radius int(4 sigma + 0.5), reflect boundary = numpy 'symmetric' pad,
    then correlation) / its max."""
    half = (ks - 1) // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    if kind == "triang":
        n = np.arange(1, (ks + 1) // 2 + 1)
        w = 2.0 * n / (ks + 1)
        return np.concatenate([w, w[-2::-1]])
    if kind == "laplace":
        lap = np.exp(-np.abs(x) / sigma) / (2.0 * sigma)
        return lap / lap.max()
    r = int(4 * sigma + 0.5)
    taps = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    delta = np.zeros(ks)
    delta[half] = 1.0
    g = np.correlate(np.pad(delta, r, mode="symmetric"), taps / taps.sum(), "valid")
    return g / g.max()


@pytest.mark.parametrize(
    "ks,sigma,golden",
    [
        # scipy.ndimage.gaussian_filter1d(delta, sigma) / max, computed with scipy 1.x
        (5, 2.0, [0.8583, 0.9458, 1.0, 0.9458, 0.8583]),
        (5, 1.0, [0.1464, 0.6069, 1.0, 0.6069, 0.1464]),
        (7, 3.0, [0.9039, 0.9382, 0.9809, 1.0, 0.9809, 0.9382, 0.9039]),
        (3, 0.5, [0.1357, 1.0, 0.1357]),
    ],
)
def test_lds_gaussian_window_is_scipys(ks, sigma, golden):
    from ltdet.imbalance.lds import smoothing_kernel

    window = smoothing_kernel("gaussian", ks, sigma).double().numpy()
    assert np.allclose(window, golden, atol=1e-4)
    assert np.allclose(window, _authors_kernel("gaussian", ks, sigma), atol=1e-6)
    scipy_ndimage = pytest.importorskip("scipy.ndimage")  # exact check where scipy is installed
    delta = np.zeros(ks)
    delta[(ks - 1) // 2] = 1.0
    ref = scipy_ndimage.gaussian_filter1d(delta, sigma)
    assert np.allclose(window, ref / ref.max(), atol=1e-6)


def _convolve1d_constant(values, window):
    """scipy.ndimage.convolve1d(values, window, mode='constant') for a symmetric odd window."""
    half = (len(window) - 1) // 2
    padded = np.concatenate([np.zeros(half), values, np.zeros(half)])
    return np.array([np.dot(padded[i : i + len(window)], window[::-1]) for i in range(len(values))])


def _authors_lds_weights(bin_of_sample, num_bins, reweight, kernel, ks=5, sigma=2.0):
    """_prepare_weights(reweight, lds=True) with the bins as labels; no clip (see the docs)."""
    value_dict = {b: 0 for b in range(num_bins)}
    for b in bin_of_sample:
        value_dict[int(b)] += 1
    if reweight == "sqrt_inv":
        value_dict = {k: np.sqrt(v) for k, v in value_dict.items()}
    window = _authors_kernel(kernel, ks, sigma)
    smoothed = _convolve1d_constant(
        np.asarray([v for _, v in value_dict.items()], dtype=np.float64), window
    )
    num_per_label = [smoothed[int(b)] for b in bin_of_sample]
    weights = [1.0 / x for x in num_per_label]
    scaling = len(weights) / np.sum(weights)
    return np.array([scaling * w for w in weights])


def _skewed_ious(n, seed):
    """Positive RoI IoUs as a detector sees them: most just above the 0.5 threshold."""
    rng = np.random.default_rng(seed)
    return 0.5 + 0.5 * rng.beta(1.0, 4.0, size=n)


@pytest.mark.parametrize("kernel", ["triang", "laplace", "gaussian"])
@pytest.mark.parametrize("reweight", ["sqrt_inv", "inverse"])
def test_lds_weights_equal_the_authors_prepare_weights_over_several_steps(kernel, reweight):
    bins = 50
    lds = RoILDS(
        bins=bins, lo=0.5, hi=1.0, kernel=kernel, ks=5, sigma=2.0, reweight=reweight
    ).train()
    np.testing.assert_allclose(lds.kernel.numpy(), _authors_kernel(kernel, 5, 2.0), rtol=1e-6)
    seen = []
    for step in range(3):  # the histogram is state: the weights are those of all samples so far
        batch = torch.tensor(_skewed_ious(400, seed=step), dtype=torch.float32)
        lds.update(batch)
        seen.append(batch)
        values = torch.cat(seen)
        b = torch.floor((values.double() - 0.5) * (bins / 0.5)).long().clamp(0, bins - 1).numpy()
        want = _authors_lds_weights(b, bins, reweight, kernel)
        np.testing.assert_allclose(lds.weights(values).double().numpy(), want, rtol=2e-6)
        # a batch's weights are the authors' weights of those samples (not renormalised)
        np.testing.assert_allclose(lds.weights(batch).double().numpy(), want[-400:], rtol=2e-6)


# =============================================================================================
# 5. tau-norm: w / ||w||^tau without the bias, tau in linspace(0, 2, 21)
# =============================================================================================


def _authors_pnorm(weights, p):
    norm_b = torch.norm(weights, 2, 1)
    ws = weights.clone()
    for i in range(weights.size(0)):
        ws[i] = ws[i] / torch.pow(norm_b[i], p)
    return ws


def _stage1_predictor(d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = FastRCNNPredictor(d, C + 1).double()
    with torch.no_grad():
        p.cls_score.weight.copy_(
            torch.randn(C + 1, d, generator=g, dtype=torch.float64)
            * torch.logspace(0, -1, C + 1, dtype=torch.float64)[:, None]
        )
        p.cls_score.bias.copy_(torch.randn(C + 1, generator=g, dtype=torch.float64))
    return p


@pytest.mark.parametrize("tau", [float(t) for t in np.linspace(0, 2, 21)])
def test_tau_norm_scores_like_the_authors_without_bias(tau):
    stage1 = _stage1_predictor()
    w1, b1 = stage1.cls_score.weight.detach().clone(), stage1.cls_score.bias.detach().clone()
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    theirs = x @ _authors_pnorm(w1, tau).t()  # dotproduct_similarity(feat, pnorm(weights, p))

    # every row normalised, no bias: exactly the authors' logits
    p = _stage1_predictor()
    tau_normalize(p, tau, normalize_background=True)
    ours = p(x)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    r = torch.randn_like(ours)
    torch.testing.assert_close(
        torch.autograd.grad((ours * r).sum(), x)[0], torch.autograd.grad((theirs * r).sum(), x)[0]
    )

    # default: foreground columns are the authors'; background row 0 stays stage 1's (w and b)
    p = _stage1_predictor()
    tau_normalize(p, tau)
    ours = p(x)[0]
    torch.testing.assert_close(ours[:, 1:], theirs[:, 1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[:, 0], x @ w1[0] + b1[0], rtol=1e-12, atol=1e-12)

    # keep_bias (ltdet's option): the stage-1 biases are added back
    p = _stage1_predictor()
    tau_normalize(p, tau, keep_bias=True)
    torch.testing.assert_close(p(x)[0][:, 1:], theirs[:, 1:] + b1[1:], rtol=1e-12, atol=1e-12)


def test_tau_keep_bias_config_key_and_sweep_default():
    from ltdet.engine.refine import install_refine_head

    class _Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.roi_heads = torch.nn.Module()
            self.roi_heads.box_predictor = _stage1_predictor()

    base = {"head": "tau_norm", "tau": 1.0, "box": False, "shifted_bn": False}
    b1 = _stage1_predictor().cls_score.bias.detach().clone()
    dropped = install_refine_head(_Model(), {"refine": base})
    assert torch.equal(dropped.roi_heads.box_predictor.cls_score.bias[1:], torch.zeros(C).double())
    assert dropped.roi_heads.box_predictor.cls_score.bias[0] == b1[0]
    kept = install_refine_head(_Model(), {"refine": {**base, "tau_keep_bias": True}})
    assert torch.equal(kept.roi_heads.box_predictor.cls_score.bias, b1)

    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "tau_sweep.py"
    spec = importlib.util.spec_from_file_location("tau_sweep", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    taus = tool.parse_args(["cfg.yaml", "--ckpt", "x.pth"]).taus
    np.testing.assert_allclose(taus, np.linspace(0, 2, 21), atol=1e-12)


# =============================================================================================
# 6a. Repeat-factor sampling: f_c over annotated images (detectron2), linear option
# =============================================================================================


def _lvis_like(n_images=300, n_classes=20, seed=0, empty_every=7):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_classes + 1) ** 1.5
    p /= p.sum()
    images, anns, k = [], [], 1
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 64, "height": 48, "file_name": f"{i}.jpg"})
        if i % empty_every == 0:
            continue
        for c in rng.choice(n_classes, rng.integers(1, 5), p=p):
            anns.append(
                {
                    "id": k,
                    "image_id": i,
                    "category_id": int(c) + 1,
                    "bbox": [1.0, 1.0, 5.0, 6.0],
                    "area": 30.0,
                    "iscrowd": 0,
                }
            )
            k += 1
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(n_classes)],
    }


def _detectron2_repeat_factors(data, repeat_thresh, sqrt=True):
    """detectron2: dataset dicts (images sorted by id) filtered of images without (non-crowd)
    annotations, then repeat_factors_from_category_frequency. Returns {image_id: r}."""
    by_image = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    dataset_dicts = [
        {"image_id": i, "annotations": by_image[i]}
        for i in sorted(by_image)
        if any(a.get("iscrowd", 0) == 0 for a in by_image[i])
    ]
    category_freq = {}
    for d in dataset_dicts:
        for cat_id in {a["category_id"] for a in d["annotations"]}:
            category_freq[cat_id] = category_freq.get(cat_id, 0) + 1
    num_images = len(dataset_dicts)
    category_freq = {k: v / num_images for k, v in category_freq.items()}
    category_rep = {
        c: max(1.0, math.sqrt(repeat_thresh / f) if sqrt else repeat_thresh / f)
        for c, f in category_freq.items()
    }
    return {
        d["image_id"]: max({category_rep[a["category_id"]] for a in d["annotations"]}, default=1.0)
        for d in dataset_dicts
    }


@pytest.mark.parametrize("sqrt", [True, False])
@pytest.mark.parametrize("t", [0.02, 0.05, 0.3])
def test_repeat_factors_equal_detectron2(t, sqrt):
    data = _lvis_like()
    got = repeat_factors(data, threshold=t, sqrt=sqrt)
    want = _detectron2_repeat_factors(data, t, sqrt)
    image_ids = sorted(im["id"] for im in data["images"])
    for index, image_id in enumerate(image_ids):
        if image_id in want:
            assert got[index].item() == pytest.approx(want[image_id], rel=1e-12)
        else:  # detectron2 never loads it; ltdet keeps it at r = 1 (see docs/data.md)
            assert got[index].item() == 1.0
    assert (got > 1).sum() > (30 if t == 0.3 else 0)  # non-trivial factors are exercised


def test_rfs_sqrt_option_through_the_config_and_the_checker(tmp_path):
    assert "sqrt" in DATA_SAMPLER_KEYS["repeat_factor"]
    data = _lvis_like(n_images=40)
    ds = LVISDetection(data, str(tmp_path))
    cfg = {"batch_size": 2, "aspect_ratio_grouping": False}
    for sqrt in (True, False):
        bs = build_train_sampler(
            {**cfg, "sampler": {"type": "repeat_factor", "threshold": 0.3, "sqrt": sqrt}},
            ds,
            1,
            0,
            seed=0,
        )
        assert torch.allclose(bs.sampler.repeat_factors, repeat_factors(ds, 0.3, sqrt=sqrt))
    linear = repeat_factors(ds, 0.3, sqrt=False)
    assert (linear > repeat_factors(ds, 0.3)).any()
    with pytest.raises(ValueError, match="sqrt"):
        build_train_sampler(
            {**cfg, "sampler": {"type": "repeat_factor", "sqrt": "yes"}}, ds, 1, 0, 0
        )
    # stochastic rounding per epoch (detectron2's _get_epoch_indices), not ceil(r) copies
    sampler = RepeatFactorSampler(linear, seed=0)
    counts = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        counts.append(torch.bincount(torch.tensor(list(sampler)), minlength=len(ds)))
    counts = torch.stack(counts).double()
    frac = linear - torch.floor(linear)
    assert ((counts == torch.floor(linear)) | (counts == torch.floor(linear) + 1)).all()
    assert (counts.mean(0) - linear).abs().max() < 0.2
    assert (counts[:, frac > 0.2] == torch.floor(linear)[frac > 0.2]).any()


# =============================================================================================
# 6b. Label-aware smoothing: MiSLAS's four shapes, 'exp' with a power
# =============================================================================================


def _mislas_smooth(cls_num_list, smooth_head, smooth_tail, shape, power=None):
    n = np.array(cls_num_list, dtype=np.float64)
    n_1, n_k = n.max(), n.min()
    if shape == "concave":
        return smooth_tail + (smooth_head - smooth_tail) * np.sin(
            (n - n_k) * np.pi / (2 * (n_1 - n_k))
        )
    if shape == "linear":
        return smooth_tail + (smooth_head - smooth_tail) * (n - n_k) / (n_1 - n_k)
    if shape == "convex":
        return smooth_head + (smooth_head - smooth_tail) * np.sin(
            1.5 * np.pi + (n - n_k) * np.pi / (2 * (n_1 - n_k))
        )
    assert shape == "exp" and power is not None
    return smooth_tail + (smooth_head - smooth_tail) * np.power((n - n_k) / (n_1 - n_k), power)


@pytest.mark.parametrize(
    "shape,power",
    [
        ("concave", None),
        ("linear", None),
        ("convex", None),
        ("exp", 0.5),
        ("exp", 2.0),
        ("exp", 3.0),
    ],
)
def test_label_aware_smoothing_factors_equal_mislas(shape, power):
    counts = [1200.0, 800.0, 310.0, 90.0, 40.0, 7.0, 3.0]
    got = label_aware_smoothing(
        torch.tensor(counts, dtype=torch.float64), 0.4, 0.1, shape, power=power
    )
    np.testing.assert_allclose(
        got.numpy(), _mislas_smooth(counts, 0.4, 0.1, shape, power), rtol=1e-12, atol=1e-15
    )


def test_las_loss_exp_shape_value_and_gradient(make_batch, make_stats):
    stats = make_stats(instance_count=(1200.0, 800.0, 310.0, 90.0, 7.0, 3.0))
    loss = build_loss(
        {"type": "las", "shape": "exp", "power": 2.0, "eps_head": 0.4, "eps_tail": 0.1},
        num_classes=6,
        stats=stats,
    ).double()
    logits, labels = make_batch(n=12, num_classes=6)
    eps_fg = _mislas_smooth(stats.instance_count.tolist(), 0.4, 0.1, "exp", 2.0)
    eps = torch.tensor([0.4] + list(eps_fg), dtype=torch.float64)  # background: eps_head
    torch.testing.assert_close(loss.eps, eps.to(loss.eps.dtype))
    # soft target of the paper's eq. (docs/losses.md): 1 - eps on y, eps / C on the others
    k = logits.shape[1]
    e = eps[labels][:, None]
    target = (e / (k - 1)).expand(-1, k).clone()
    target.scatter_(1, labels[:, None], 1 - e)
    ref = -(target * logits.log_softmax(1)).sum(1).mean()
    value = loss(logits, labels)
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(
        torch.autograd.grad(value, logits)[0],
        torch.autograd.grad(ref, logits)[0],
        rtol=1e-6,
        atol=1e-9,
    )
    with pytest.raises(ValueError, match="power"):
        build_loss({"type": "las", "shape": "exp"}, num_classes=6, stats=stats)
    with pytest.raises(ValueError, match="power"):
        label_aware_smoothing(torch.tensor([3.0, 1.0]), shape="exp", power=-1.0)


# =============================================================================================
# 6c. avg_factor with reduction "sum" is an error (mmdetection's weight_reduce_loss)
# =============================================================================================


def _accepts_avg_factor(cls):
    return "avg_factor" in inspect.signature(cls.forward).parameters


@pytest.mark.parametrize("name", sorted(n for n, cls in LOSSES.items() if _accepts_avg_factor(cls)))
def test_avg_factor_with_sum_raises_for_every_loss(
    name, make_batch, make_boxes, make_deltas, make_stats, regression_losses
):
    loss = build_loss({"type": name}, num_classes=6, stats=make_stats()).double().eval()
    if name == "dfl":  # side distributions [P, 4, reg_max + 1], distances [P, 4]
        x = torch.randn(9, 4, loss.reg_max + 1, dtype=torch.float64).requires_grad_(True)
        y = torch.rand(9, 4, dtype=torch.float64) * loss.reg_max
    elif name in regression_losses:
        x, y = make_boxes() if loss.needs_boxes else make_deltas()
    else:
        x, y = make_batch(num_columns=loss.cls_channels)  # seesaw: C+2 logits
    if name == "federated":
        loss._generator = None
    with pytest.raises(ValueError, match="avg_factor"):
        loss(x, y, reduction="sum", avg_factor=10.0)
    with pytest.raises(ValueError, match="avg_factor"):
        loss(x, y, reduction="sum", avg_factor=torch.tensor(10.0))
    if name == "federated":
        loss._generator = None
    total = loss(x, y, reduction="sum")
    if name == "federated":
        loss._generator = None
    assert torch.allclose(loss(x, y, reduction="mean", avg_factor=10.0), total / 10.0)
    if name == "federated":
        loss._generator = None
    none = loss(x, y, reduction="none")
    if name == "federated":
        loss._generator = None
    assert torch.allclose(loss(x, y, reduction="none", avg_factor=10.0), none)  # ignored, as mmdet
