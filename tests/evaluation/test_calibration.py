"""D-ECE / MCE by frequency group, the post-hoc calibrators and tools/calibrate.py."""

import copy
import json
import logging

import numpy as np
import pytest
import torch

from ltdet.evaluation.calibration import (
    IGNORED,
    TP,
    calibration_error,
    dece_metrics,
    detection_outcomes,
    evaluate_calibration,
)
from ltdet.evaluation.calibrators import (
    PlattScaling,
    TemperatureScaling,
    apply_calibrator,
    calibrator_from_state,
    fit_calibrator,
    load_calibrator,
    save_calibrator,
)
from ltdet.evaluation.reliability_plot import plot_reliability


def _loop_dece(conf, correct, num_bins, binning="uniform"):
    """Reference: plain Python loops over bins and detections."""
    conf, correct = [float(c) for c in conf], [bool(c) for c in correct]
    n = len(conf)
    if n == 0:
        return -1.0, -1.0
    bins = [[] for _ in range(num_bins)]
    if binning == "uniform":
        edges = np.linspace(0.0, 1.0, num_bins + 1).tolist()
        for s, y in zip(conf, correct):
            m = 0
            while m < num_bins - 1 and not s <= edges[m + 1]:
                m += 1
            bins[m].append((s, y))
    else:
        srt = sorted(conf)
        for s, y in zip(conf, correct):
            first = srt.index(s)  # equal scores share the bin of their first rank
            bins[first * num_bins // n].append((s, y))
    dece, mce = 0.0, 0.0
    for b in bins:
        if not b:
            continue
        acc = sum(y for _, y in b) / len(b)
        cf = sum(s for s, _ in b) / len(b)
        dece += len(b) / n * abs(acc - cf)
        mce = max(mce, abs(acc - cf))
    return dece, mce


# ---------------------------------------------------------------------------------------------
# hand-built LVIS ground truth


def _lvis_gt(images, freq=("r", "c", "f")):
    """images: list of dicts {boxes: [(cat, xywh, ignore?)], neg: [...], nel: [...]};
    categories 1..3 with frequency r, c, f."""
    imgs, anns = [], []
    for i, im in enumerate(images):
        imgs.append(
            {
                "id": i + 1,
                "width": 400,
                "height": 400,
                "neg_category_ids": list(im.get("neg", [])),
                "not_exhaustive_category_ids": list(im.get("nel", [])),
            }
        )
        for box in im.get("boxes", []):
            c, b = box[0], box[1]
            a = {
                "id": len(anns) + 1,
                "image_id": i + 1,
                "category_id": c,
                "bbox": list(b),
                "area": float(b[2] * b[3]),
            }
            if len(box) > 2 and box[2]:
                a["ignore"] = 1
            anns.append(a)
    cats = [
        {"id": k + 1, "name": f"c{k + 1}", "frequency": f, "image_count": 5, "instance_count": 5}
        for k, f in enumerate(freq)
    ]
    return {"images": imgs, "annotations": anns, "categories": cats}


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


def _far(k):
    """A box that overlaps no gt of the hand-built sets."""
    return (300.0 + (k % 5) * 15, 300.0 + (k // 5 % 5) * 15, 10.0, 10.0)


def _calibrated_set(score_tp):
    """One image per (score, #TP, #FP): class 2 (common) gts at distinct places, TPs on them."""
    images, dets = [], []
    for score, n_tp, n_fp in score_tp:
        boxes = [(2, (10.0 + 40 * j, 10.0, 30.0, 30.0)) for j in range(n_tp)]
        # without a gt the class must be negative on the image, else its detections are dropped
        images.append({"boxes": boxes, "neg": [] if n_tp else [2]})
        i = len(images)
        dets += [_det(i, 2, b, score) for _, b in boxes]
        dets += [_det(i, 2, _far(k), score) for k in range(n_fp)]
    return _lvis_gt(images), dets


def test_calibration_error_equals_loop_reference():
    rng = np.random.default_rng(0)
    for n, bins in [(1, 10), (7, 10), (200, 10), (500, 15), (50, 3)]:
        conf = np.round(rng.random(n), 2)  # ties and values on bin edges
        conf[: min(3, n)] = [0.0, 1.0, 0.3][: min(3, n)]
        correct = rng.random(n) < conf
        for binning in ("uniform", "equal_mass"):
            ce = calibration_error(conf, correct, bins, binning)
            ref = _loop_dece(conf, correct, bins, binning)
            assert ce["D-ECE"] == pytest.approx(ref[0], abs=1e-12)
            assert ce["MCE"] == pytest.approx(ref[1], abs=1e-12)
            assert sum(ce["count"]) == n
    empty = calibration_error([], [], 10)
    assert (empty["D-ECE"], empty["MCE"]) == (-1.0, -1.0)
    assert empty["count"] == [0] * 10 and empty["precision"] == [None] * 10


def test_equal_mass_bins():
    conf = np.arange(1, 101) / 101.0
    ce = calibration_error(conf, np.zeros(100), 10, "equal_mass")
    assert ce["count"] == [10] * 10
    assert ce["lo"][0] == pytest.approx(1 / 101) and ce["hi"][-1] == pytest.approx(100 / 101)
    # equal scores never straddle two bins
    tied = np.array([0.2] * 6 + [0.9] * 4)
    ce = calibration_error(tied, np.zeros(10), 4, "equal_mass")
    assert sorted(c for c in ce["count"] if c) == [4, 6]
    # fewer detections than bins: empty bins are skipped
    ce = calibration_error([0.1, 0.5, 0.9], [0, 1, 1], 10, "equal_mass")
    assert sum(1 for c in ce["count"] if c) == 3
    assert ce["D-ECE"] == pytest.approx(_loop_dece([0.1, 0.5, 0.9], [0, 1, 1], 10, "equal_mass")[0])


def test_perfectly_calibrated_scores_give_zero():
    gt, dets = _calibrated_set([(0.25, 1, 3), (0.75, 3, 1), (0.5, 2, 2), (1.0, 2, 0)])
    for binning in ("uniform", "equal_mass"):
        cal = evaluate_calibration(gt, dets, num_bins=10, binning=binning)
        assert cal["D-ECE"] == pytest.approx(0.0, abs=1e-12)
        assert cal["MCE"] == pytest.approx(0.0, abs=1e-12)
        assert cal["num_dets"]["all"] == 14 and cal["num_tp"]["all"] == 8


def test_confident_and_always_wrong_gives_known_value():
    gt, dets = _calibrated_set([(0.9, 0, 5)])
    cal = evaluate_calibration(gt, dets)
    assert cal["D-ECE"] == pytest.approx(0.9) and cal["MCE"] == pytest.approx(0.9)
    assert cal["D-ECE_c"] == pytest.approx(0.9)
    # mixed: 5 FPs at 0.9, and 5 dets at 0.2 of which 1 TP: (5 * 0.9 + 5 * 0) / 10
    gt, dets = _calibrated_set([(0.9, 0, 5), (0.2, 1, 4)])
    cal = evaluate_calibration(gt, dets)
    assert cal["D-ECE"] == pytest.approx(0.45) and cal["MCE"] == pytest.approx(0.9)


def test_federated_rules_are_respected():
    box = (10.0, 10.0, 30.0, 30.0)
    images = [
        # image 1: class 2 annotated; class 3 negative; class 1 neither (unverified)
        {"boxes": [(2, box)], "neg": [3]},
        # image 2: class 2 annotated but not exhaustive; one ignored gt of class 2
        {"boxes": [(2, box), (2, (100.0, 100.0, 30.0, 30.0), True)], "nel": [2]},
    ]
    gt = _lvis_gt(images)
    dets = [
        _det(1, 2, box, 0.8),  # TP
        _det(1, 2, _far(0), 0.7),  # FP (class annotated, exhaustive)
        _det(1, 3, _far(1), 0.9),  # FP (negative class)
        _det(1, 1, box, 0.95),  # unverified class: dropped, counts for nothing
        _det(2, 2, box, 0.6),  # TP
        _det(2, 2, _far(2), 0.99),  # unmatched on a not-exhaustive class: ignored
        _det(2, 2, (100.0, 100.0, 30.0, 30.0), 0.4),  # matched to an ignored gt: ignored
    ]
    out = detection_outcomes(gt, dets)
    status = dict(zip(out["index"].tolist(), out["status"].tolist()))
    assert status == {0: TP, 1: 0, 2: 0, 4: TP, 5: IGNORED, 6: IGNORED}
    cal = evaluate_calibration(gt, dets, num_bins=10)
    assert cal["num_dets"]["all"] == 4 and cal["num_ignored"] == 2
    ref = _loop_dece([0.8, 0.7, 0.9, 0.6], [1, 0, 0, 1], 10)
    assert cal["D-ECE"] == pytest.approx(ref[0]) and cal["MCE"] == pytest.approx(ref[1])
    # the unverified detection changes nothing, whatever its score
    more = dets + [_det(2, 3, _far(3), 0.99), _det(1, 1, _far(4), 0.01)]
    assert dece_metrics(evaluate_calibration(gt, more)) == dece_metrics(cal)
    # groups: class 3 is f (one FP at 0.9), class 2 is c; no rare detection counted
    assert cal["D-ECE_f"] == pytest.approx(0.9)
    assert cal["D-ECE_r"] == -1 and cal["MCE_r"] == -1 and cal["num_dets"]["r"] == 0


def _lvis_statuses(gt, dets, max_dets=300):
    """(category, score, status) of every detection, from the official LVISEval at IoU 0.5."""
    if not hasattr(np, "float"):
        np.float = float  # the lvis package still calls np.float (removed in NumPy 1.24)
    from lvis import LVIS, LVISEval, LVISResults

    g = LVIS.__new__(LVIS)
    g.logger = logging.getLogger("lvis-ref")
    g.dataset = copy.deepcopy(gt)
    g._create_index()
    e = LVISEval(g, LVISResults(g, copy.deepcopy(dets), max_dets=max_dets), "bbox")
    e.evaluate()
    out = []
    for ev in e.eval_imgs:
        if ev is None or list(ev["area_rng"]) != list(e.params.area_rng[0]):
            continue
        for s, m, ig in zip(ev["dt_scores"], ev["dt_matches"][0], ev["dt_ignore"][0]):
            out.append((ev["category_id"], round(s, 6), -1 if ig else int(m != 0)))
    return sorted(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_status_matches_lvis_package(seed, make_set):
    gt, dets = make_set(seed, n_images=25)
    out = detection_outcomes(gt, dets)
    cat_ids = np.array([c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])])
    mine = sorted(
        zip(
            cat_ids[out["category"]].tolist(),
            np.round(out["score"], 6).tolist(),
            out["status"].tolist(),
        )
    )
    assert mine == _lvis_statuses(gt, dets)


def test_input_forms_and_empty(tmp_path, make_set):
    gt, dets = make_set(2, n_images=15)
    cal = evaluate_calibration(gt, dets)
    p = tmp_path / "dets.json"
    p.write_text(json.dumps(dets))
    assert dece_metrics(evaluate_calibration(gt, str(p))) == dece_metrics(cal)
    by_img = {}
    for d in dets:
        by_img.setdefault(d["image_id"], []).append(d)
    tens = [
        {
            "image_id": i,
            "boxes": torch.tensor(
                [
                    [
                        d["bbox"][0],
                        d["bbox"][1],
                        d["bbox"][0] + d["bbox"][2],
                        d["bbox"][1] + d["bbox"][3],
                    ]
                    for d in ds
                ],
                dtype=torch.float64,
            ),
            "scores": torch.tensor([d["score"] for d in ds], dtype=torch.float64),
            "category_ids": torch.tensor([d["category_id"] for d in ds]),
        }
        for i, ds in by_img.items()
    ]
    tc = dece_metrics(evaluate_calibration(gt, tens))
    assert tc == pytest.approx(dece_metrics(cal), abs=1e-9)
    # COCO-LT bins from the json's instance counts
    assert {"D-ECE_1", "D-ECE_2", "D-ECE_3"} <= set(cal)
    empty = evaluate_calibration(gt, [])
    assert all(v == -1 for v in dece_metrics(empty).values())
    assert empty["num_dets"]["all"] == 0
    with pytest.raises(ValueError, match="iou_thr"):
        evaluate_calibration(gt, dets, iou_thr=0.42)
    with pytest.raises(ValueError, match="binning"):
        evaluate_calibration(gt, dets, binning="quantile")
    # min_score: detections at or below it are not binned; statuses do not change
    hi = evaluate_calibration(gt, dets, min_score=0.5)
    assert hi["num_dets"]["all"] == sum(
        1
        for s, st in zip(*[detection_outcomes(gt, dets)[k] for k in ("score", "status")])
        if s > 0.5 and st != -1
    )


def test_temperature_scaling_recovers_known_temperature():
    rng = np.random.default_rng(0)
    n, t_true = 40000, 2.5
    z = rng.normal(0, 3, n)
    y = rng.random(n) < 1 / (1 + np.exp(-z / t_true))
    scores = 1 / (1 + np.exp(-z))  # over-confident by t_true
    cal = TemperatureScaling().fit(scores, np.ones(n, np.int64), y)
    assert cal.temperature["all"] == pytest.approx(t_true, rel=0.05)
    before = calibration_error(scores, y, 15)["D-ECE"]
    after = calibration_error(cal.transform(scores, np.ones(n, np.int64)), y, 15)["D-ECE"]
    assert after < before / 3
    # one temperature per group: r / c / f classes with 0.5 / 1 / 3
    temps = {"r": 0.5, "c": 1.0, "f": 3.0}
    groups = {1: "r", 2: "c", 3: "f"}
    cid = rng.integers(1, 4, n)
    tz = np.array([temps[groups[c]] for c in cid])
    y = rng.random(n) < 1 / (1 + np.exp(-z / tz))
    cal = TemperatureScaling(per_group=True, groups=groups).fit(scores, cid, y)
    for g, t in temps.items():
        assert cal.temperature[g] == pytest.approx(t, rel=0.08)
    # a class of no known group keeps T = 1; a state round trip keeps the mapping
    back = calibrator_from_state(json.loads(json.dumps(cal.state_dict())))
    s = np.array([0.3, 0.8, 0.6])
    assert torch.allclose(back.transform(s, [1, 3, 99]), cal.transform(s, [1, 3, 99]))
    assert float(cal.transform(np.array([0.8]), [99])[0]) == pytest.approx(0.8)


def test_platt_scaling_per_class(tmp_path):
    rng = np.random.default_rng(1)
    n = 30000
    cid = rng.integers(1, 3, n)
    z = rng.normal(0, 2, n)
    a_true, b_true = {1: 0.5, 2: 1.5}, {1: -1.0, 2: 0.5}
    zt = np.array([a_true[c] for c in cid]) * z + np.array([b_true[c] for c in cid])
    y = rng.random(n) < 1 / (1 + np.exp(-zt))
    # class 3 only false positives, class 4 absent from the fit data
    cid = np.concatenate([cid, [3, 3]])
    z = np.concatenate([z, [0.0, 1.0]])
    y = np.concatenate([y, [False, False]])
    cal = PlattScaling().fit(1 / (1 + np.exp(-z)), cid, y, category_ids=[1, 2, 3, 4])
    for c in (1, 2):
        assert cal.params[c][0] == pytest.approx(a_true[c], abs=0.05)
        assert cal.params[c][1] == pytest.approx(b_true[c], abs=0.05)
    assert cal.zero == [3, 4]  # as Dave et al.: no TP / no detection -> score 0
    s = cal.transform(np.array([0.7, 0.7, 0.7, 0.7]), [1, 2, 3, 4])
    assert s[2] == 0 and s[3] == 0 and 0 < s[0] < s[1] < 1
    keep = PlattScaling(missing="keep").fit(1 / (1 + np.exp(-z)), cid, y)
    assert float(keep.transform(np.array([0.7]), [3])[0]) == pytest.approx(0.7)
    path = tmp_path / "cal.json"
    save_calibrator(cal, path, fit_images=10)
    assert torch.equal(
        load_calibrator(path).transform(s.numpy(), [1, 2, 3, 4]),
        cal.transform(s.numpy(), [1, 2, 3, 4]),
    )


def test_fit_and_apply_on_detections(tmp_path, make_set):
    gt, dets = make_set(3, n_images=30)
    for method in ("temperature", "temperature_group", "platt"):
        cal = fit_calibrator(method, gt, dets)
        cols = apply_calibrator(cal, dets)
        assert cols.score.shape[0] == len(dets) and ((cols.score >= 0) & (cols.score <= 1)).all()
        before = evaluate_calibration(gt, dets)["D-ECE"]
        after = evaluate_calibration(gt, cols)["D-ECE"]
        # fitted and evaluated on the same detections: NLL-optimal scores are not worse
        assert after <= before + 1e-6, method
    res = evaluate_calibration(gt, dets)
    png = tmp_path / "rel.png"
    plot_reliability(res, png)
    assert png.stat().st_size > 1000
    plot_reliability(evaluate_calibration(gt, dets, binning="equal_mass"), tmp_path / "em.png")
    plot_reliability(evaluate_calibration(gt, []), tmp_path / "empty.png")


def test_tools_calibrate_json_form(tmp_path, capsys, make_set, load_tool):
    calibrate = load_tool("calibrate")

    gt, dets = make_set(4, n_images=30)
    gtv, detsv = make_set(5, n_images=20)
    files = {}
    for name, obj in (("fit_gt", gt), ("fit_dets", dets), ("gt", gtv), ("dets", detsv)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    rc = calibrate.main(
        [
            "--fit-gt",
            str(files["fit_gt"]),
            "--fit-dets",
            str(files["fit_dets"]),
            "--gt",
            str(files["gt"]),
            "--dets",
            str(files["dets"]),
            "--method",
            "temperature_group",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "calibration_summary.json").read_text())
    assert set(summary["before"]) >= {"AP", "APr", "D-ECE", "D-ECE_r", "D-ECE_c", "D-ECE_f"}
    assert set(summary["after"]) == set(summary["before"])
    assert (tmp_path / "out" / "calibrator.json").is_file()
    assert (tmp_path / "out" / "reliability_before.png").is_file()
    assert "D-ECE" in capsys.readouterr().out


def test_validation_report_has_dece(tmp_path, make_set):
    from ltdet.engine.validation import evaluate_detections

    gt, dets = make_set(6, n_images=12)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    by_img = {}
    for d in dets:
        by_img.setdefault(d["image_id"], []).append(d)
    tens = [
        {
            "image_id": i,
            "boxes": torch.tensor(
                [
                    [
                        d["bbox"][0],
                        d["bbox"][1],
                        d["bbox"][0] + d["bbox"][2],
                        d["bbox"][1] + d["bbox"][3],
                    ]
                    for d in ds
                ]
            ),
            "scores": torch.tensor([d["score"] for d in ds]),
            "category_ids": torch.tensor([d["category_id"] for d in ds]),
        }
        for i, ds in by_img.items()
    ]
    res = evaluate_detections(tens, val_json=tmp_path / "gt.json", out_dir=tmp_path / "ev")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for k in ("D-ECE", "D-ECE_r", "D-ECE_c", "D-ECE_f", "MCE"):
        assert metrics[k] == pytest.approx(res[k])
    assert (tmp_path / "ev" / "reliability.png").stat().st_size > 1000


def test_tools_test_prints_dece(tmp_path, capsys, make_set, load_tool):
    test_tool = load_tool("test")

    gt, dets = make_set(7, n_images=10)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "d.json").write_text(json.dumps(dets))
    assert (
        test_tool.main(
            [
                "--gt",
                str(tmp_path / "gt.json"),
                "--dets",
                str(tmp_path / "d.json"),
                "--out",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    ref = evaluate_calibration(gt, dets)
    assert metrics["D-ECE_r"] == pytest.approx(ref["D-ECE_r"])
    assert f"D-ECE_f  {metrics['D-ECE_f']:.4f}" in out or f"{metrics['D-ECE_f']:.4f}" in out
    assert (tmp_path / "rep" / "reliability.png").is_file()
