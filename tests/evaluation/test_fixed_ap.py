"""Fixed AP and pooled AP (Dave, Dollar, Ramanan, Kirillov, Girshick 2021, "Evaluating
Large-Vocabulary Object Detectors: The Devil is in the Details") against their procedure built on
the official `lvis` package: per-class top-K of the results as their scripts/evaluate_ap_fixed.py
does, then LVISEval with no per-image limit (LVISResults(max_dets=-1), params.max_dets = -1);
pooled AP as their LVISPooledEval accumulates it (written here on LVISEval's per-image results)."""

import contextlib
import copy
import io
import logging
from collections import defaultdict

import numpy as np
import pytest
import torch
from test_evaluation import _assert_close, _strip_boxes

from ltdet.evaluation import evaluate_lvis, format_table

FIXED_KEYS = [
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "APr",
    "APc",
    "APf",
    "AR@-1",
    "ARs@-1",
    "ARm@-1",
    "ARl@-1",
]


def _top_k_per_class(dets, k):
    """scripts/evaluate_ap_fixed.py: group by class, sorted by score (reverse, stable), [:k]."""
    by_cat = defaultdict(list)
    for ann in dets:
        by_cat[ann["category_id"]].append(ann)
    out = []
    for cat_anns in by_cat.values():
        out.extend(sorted(cat_anns, key=lambda x: x["score"], reverse=True)[:k])
    return out


def _pooled(e, cat_indices):
    """LVISPooledEval.accumulate for one pool, area 'all': the pool's per-(image, class) results
    (image outer, class inner) concatenated, a stable sort by score, one PR curve."""
    p = e.params
    n_img, n_area = len(p.img_ids), len(p.area_rng)
    E = [e.eval_imgs[c * n_area * n_img + i] for i in range(n_img) for c in cat_indices]
    E = [x for x in E if x is not None]
    if not E:
        return -1.0
    scores = np.concatenate([x["dt_scores"] for x in E], axis=0)
    idx = np.argsort(-scores, kind="mergesort")
    dt_m = np.concatenate([x["dt_matches"] for x in E], axis=1)[:, idx]
    dt_ig = np.concatenate([x["dt_ignore"] for x in E], axis=1)[:, idx]
    gt_ig = np.concatenate([x["gt_ignore"] for x in E])
    num_gt = np.count_nonzero(gt_ig == 0)
    if num_gt == 0:
        return -1.0
    tps = np.logical_and(dt_m, np.logical_not(dt_ig))
    fps = np.logical_and(np.logical_not(dt_m), np.logical_not(dt_ig))
    prec = []
    for tp, fp in zip(np.cumsum(tps, 1).astype(float), np.cumsum(fps, 1).astype(float)):
        rc = tp / num_gt
        pr = (tp / (fp + tp + np.spacing(1))).tolist()
        for i in range(len(tp) - 1, 0, -1):
            if pr[i] > pr[i - 1]:
                pr[i - 1] = pr[i]
        ins = np.searchsorted(rc, p.rec_thrs, side="left")
        prec.append([pr[j] if j < len(pr) else 0.0 for j in ins])
    return float(np.mean(prec))


def _fixed_reference(gt, dets, k, iou_type="bbox"):
    if not hasattr(np, "float"):
        np.float = float  # the lvis package still calls np.float (removed in NumPy 1.24)
    from lvis import LVIS, LVISEval, LVISResults

    g = LVIS.__new__(LVIS)
    g.logger = logging.getLogger("lvis-ref")
    g.dataset = copy.deepcopy(gt)
    g._create_index()
    results = _strip_boxes(_top_k_per_class(copy.deepcopy(dets), k), iou_type)
    e = LVISEval(g, LVISResults(g, results, max_dets=-1), iou_type)
    e.params.max_dets = -1  # no limit on detections per image
    e.run()
    res = dict(e.get_results())
    p = e.eval["precision"][:, :, :, 0]
    res["per_class"] = [
        float(p[:, :, c][p[:, :, c] > -1].mean()) if (p[:, :, c] > -1).any() else None
        for c in range(p.shape[2])
    ]
    res["APpool"] = _pooled(e, range(len(e.params.cat_ids)))
    for j, grp in enumerate(e.params.img_count_lbl):
        res[f"APpool{grp}"] = _pooled(e, e.freq_groups[j])
    return res


POOL_KEYS = ["APpool", "APpoolr", "APpoolc", "APpoolf"]


@pytest.mark.parametrize("seed,k", [(0, 10000), (1, 12), (2, 40)])
def test_fixed_ap_matches_authors_procedure(seed, k, make_set):
    gt, dets = make_set(seed)
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), protocol="fixed", dets_per_class=k)
    ref = _fixed_reference(gt, dets, k)
    _assert_close(res, ref, FIXED_KEYS + POOL_KEYS)
    assert res["protocol"] == "fixed" and res["dets_per_class"] == k
    assert res["AP"] > 0.02 and res["APpool"] > 0.02  # a real comparison, not -1 == -1
    if k == 10000:
        # No cap at all: the image with > 300 detections keeps them all, unlike standard AP.
        std = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets))
        assert res["AP"] != std["AP"]


def test_fixed_ap_ties_at_the_class_cut(make_set):
    """Scores with 2 decimals: many ties at the K-th detection of a class, resolved by input
    order as the authors' stable sort does."""
    gt, dets = make_set(5, n_images=30)
    k = 7
    by_cat = defaultdict(list)
    for d in dets:
        by_cat[d["category_id"]].append(d["score"])
    assert any(
        len(s) > k and sorted(s, reverse=True)[k - 1] == sorted(s, reverse=True)[k]
        for s in by_cat.values()
    )
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), protocol="fixed", dets_per_class=k)
    _assert_close(res, _fixed_reference(gt, dets, k), FIXED_KEYS + POOL_KEYS)


def test_fixed_ap_segm_matches_authors_procedure(make_segm_set):
    gt, dets = make_segm_set(1, n_images=24)
    res = evaluate_lvis(
        copy.deepcopy(gt), copy.deepcopy(dets), iou_type="segm", protocol="fixed", dets_per_class=25
    )
    _assert_close(res, _fixed_reference(gt, dets, 25, "segm"), FIXED_KEYS + POOL_KEYS)


def test_fixed_ap_coco_gt_matches_pycocotools_without_cap(make_set):
    """COCO gt: top-K per class, then COCOeval with no per-(image, class) limit."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = make_set(3, lvis=False)
    k = 20
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), protocol="fixed", dets_per_class=k)
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        e = COCOeval(g, g.loadRes(_top_k_per_class(copy.deepcopy(dets), k)), "bbox")
        e.params.maxDets = [1, 10, 10**9]
        e.evaluate()
        e.accumulate()
        e.summarize()
    p = e.eval["precision"][:, :, :, 0, -1]
    assert res["AP"] == pytest.approx(float(p[p > -1].mean()), abs=1e-4)
    assert res["AP50"] == pytest.approx(e.stats[1], abs=1e-4)
    assert res["APs"] == pytest.approx(e.stats[3], abs=1e-4)
    assert res["AR@-1"] == pytest.approx(e.stats[8], abs=1e-4)


def test_pooled_ap_rewards_comparable_scores(make_set):
    """Pooled AP ranks all classes together: scaling one class's scores down changes APpool but
    not the per-class (Fixed) AP."""
    gt, dets = make_set(0)
    a = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), protocol="fixed")
    c0 = gt["categories"][1]["id"]
    scaled = copy.deepcopy(dets)
    for d in scaled:
        if d["category_id"] != c0:
            d["score"] = d["score"] * 0.5
    b = evaluate_lvis(copy.deepcopy(gt), scaled, protocol="fixed")
    assert a["AP"] == pytest.approx(b["AP"], abs=1e-12)
    assert a["APpool"] != b["APpool"]


def test_fixed_protocol_in_report_and_errors(make_set):
    gt, dets = make_set(0, n_images=10)
    res = evaluate_lvis(gt, dets, protocol="fixed", dets_per_class=50)
    table = format_table(res)
    assert "Fixed AP protocol: top 50" in table and "APpool" in table
    assert "dets_per_class" not in table
    std = evaluate_lvis(gt, dets)
    assert std["protocol"] == "standard" and "APpool" not in std and "AR@300" in std
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_lvis(gt, dets, protocol="pooled")
    with pytest.raises(ValueError, match="dets_per_class must be a positive int"):
        evaluate_lvis(gt, dets, protocol="fixed", dets_per_class=0)


@pytest.mark.slow
def test_fixed_ap_matches_authors_procedure_larger(make_set):
    gt, dets = make_set(13, n_images=300, n_cats=120)
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), protocol="fixed", dets_per_class=60)
    _assert_close(res, _fixed_reference(gt, dets, 60), FIXED_KEYS + POOL_KEYS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fixed_ap_cuda_matches_cpu(make_set):
    gt, dets = make_set(1)
    a = evaluate_lvis(gt, dets, protocol="fixed", dets_per_class=12)
    b = evaluate_lvis(gt, dets, protocol="fixed", dets_per_class=12, device="cuda")
    for k in FIXED_KEYS + POOL_KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-12)
