"""ltdet.evaluation against the official `lvis` package and pycocotools, plus input handling."""

import contextlib
import copy
import io
import json
import logging
import math

import numpy as np
import pytest
import torch

from ltdet.evaluation import evaluate_lvis, format_table, results_io, write_report
from ltdet.evaluation.lvis_eval import GroundTruthFormatError
from ltdet.evaluation.results_io import DetectionFormatError, load_detections

LVIS_KEYS = [
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "APr",
    "APc",
    "APf",
    "AR@300",
    "ARs@300",
    "ARm@300",
    "ARl@300",
]


def _strip_boxes(dets, iou_type):
    """Segm results without their boxes: with a ``bbox`` key, LVISResults / loadRes take the box
    area as a segm result's area (their scripts and detectron2 strip it, as here)."""
    dets = copy.deepcopy(dets)
    if iou_type == "segm":
        for d in dets:
            d.pop("bbox", None)
    return dets


def _lvis_reference(gt, dets, max_dets=300, iou_type="bbox"):
    """Official LVISEval on in-memory data; per-class AP from its precision array.
    ``max_dets=-1``: no per-image limit (LVISResults and LVISEval's params, as Fixed AP)."""
    if not hasattr(np, "float"):
        np.float = float  # the lvis package still calls np.float (removed in NumPy 1.24)
    from lvis import LVIS, LVISEval, LVISResults

    g = LVIS.__new__(LVIS)
    g.logger = logging.getLogger("lvis-ref")
    g.dataset = copy.deepcopy(gt)
    g._create_index()
    e = LVISEval(g, LVISResults(g, _strip_boxes(dets, iou_type), max_dets=max_dets), iou_type)
    if max_dets < 0:
        e.params.max_dets = max_dets  # names the AR keys AR@-1 (it caps nothing in LVISEval)
    e.run()
    res = dict(e.get_results())
    p = e.eval["precision"][:, :, :, 0]
    res["per_class"] = [
        float(p[:, :, k][p[:, :, k] > -1].mean()) if (p[:, :, k] > -1).any() else None
        for k in range(p.shape[2])
    ]
    # AP50 per class and per frequency group, from the same official precision array
    p50 = p[0]
    res["per_class_ap50"] = [
        float(p50[:, k].mean()) if (p50[:, k] > -1).any() else None for k in range(p50.shape[1])
    ]
    freq = [g.cats[c]["frequency"] for c in e.params.cat_ids]
    for grp in "rcf":
        vals = [a for a, f in zip(res["per_class_ap50"], freq) if f == grp and a is not None]
        res[f"AP50{grp}"] = float(np.mean(vals)) if vals else -1.0
    return res


def _coco_reference(gt, dets, max_dets, iou_type="bbox"):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = copy.deepcopy(gt)
        g.createIndex()
        e = COCOeval(g, g.loadRes(_strip_boxes(dets, iou_type)), iou_type)
        e.params.maxDets = [1, 2, max_dets]  # COCOeval sorts these and evaluates at the last
        e.evaluate()
        e.accumulate()
        e.summarize()
    s = e.stats
    p = e.eval["precision"][:, :, :, 0, -1]
    ref = {
        "AP": float(p[p > -1].mean()),
        "AP50": s[1],
        "AP75": s[2],
        "APs": s[3],
        "APm": s[4],
        "APl": s[5],
        f"AR@{max_dets}": s[8],
        f"ARs@{max_dets}": s[9],
        f"ARm@{max_dets}": s[10],
        f"ARl@{max_dets}": s[11],
    }
    ref["per_class"] = [
        float(p[:, :, k][p[:, :, k] > -1].mean()) if (p[:, :, k] > -1).any() else None
        for k in range(p.shape[2])
    ]
    return ref


def _assert_close(res, ref, keys):
    for k in keys:
        assert abs(res[k] - ref[k]) <= 1e-4, (k, res[k], ref[k])
    ours = [c["AP"] for c in res["per_class"]]
    assert [a is None for a in ours] == [a is None for a in ref["per_class"]]
    diffs = [abs(a - b) for a, b in zip(ours, ref["per_class"]) if a is not None]
    assert max(diffs, default=0.0) <= 1e-4  # (no class with gt: the None patterns agree above)


def _assert_matches_reference(gt, dets, lvis, max_dets=300):
    """Every metric and per-class AP (and, for LVIS gt, AP50 per class / per group) against the
    official package: lvis.LVISEval for LVIS gt, pycocotools' COCOeval for COCO gt."""
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), max_dets=max_dets)
    if lvis:
        ref = _lvis_reference(gt, dets, max_dets=max_dets)
        _assert_close(res, ref, LVIS_KEYS + ["AP50r", "AP50c", "AP50f"])
        ours = [c["AP50"] for c in res["per_class"]]
        assert [a is None for a in ours] == [a is None for a in ref["per_class_ap50"]]
        assert (
            max(
                (abs(a - b) for a, b in zip(ours, ref["per_class_ap50"]) if a is not None),
                default=0.0,
            )
            <= 1e-4
        )
    else:
        ref = _coco_reference(gt, dets, max_dets)
        _assert_close(res, ref, [k for k in ref if k != "per_class"])
    return res, ref


def test_fixture_exercises_the_edge_cases(make_set):
    gt, dets = make_set(0)
    per_img = {}
    for d in dets:
        per_img[d["image_id"]] = per_img.get(d["image_id"], 0) + 1
    ann_imgs = {a["image_id"] for a in gt["annotations"]}
    img_ids = [im["id"] for im in gt["images"]]
    assert max(per_img.values()) > 300  # the per-image cap matters
    assert any(i not in per_img for i in img_ids)  # an image without detections
    assert any(i not in ann_imgs for i in img_ids)  # an image without annotations
    scores = [d["score"] for d in dets]
    assert len(set(scores)) < len(scores) / 4  # many score ties
    areas = [a["area"] for a in gt["annotations"]]
    assert 32.0**2 in areas and 96.0**2 in areas
    assert any(im["not_exhaustive_category_ids"] for im in gt["images"])
    annotated = {a["category_id"] for a in gt["annotations"]}
    neg_only = {c for im in gt["images"] for c in im["neg_category_ids"]} - annotated
    assert neg_only and len(annotated) < len(gt["categories"])
    assert any(a.get("ignore") for a in gt["annotations"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_lvis_package(seed, make_set):
    gt, dets = make_set(seed)
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets))
    ref = _lvis_reference(gt, dets)
    _assert_close(res, ref, LVIS_KEYS + ["AP50r", "AP50c", "AP50f"])
    assert res["AP"] > 0.05  # a meaningful comparison, not -1 == -1
    assert min(res[f"AP50{g}"] for g in "rcf") > 0  # every group is compared, not -1 == -1
    ours = [c["AP50"] for c in res["per_class"]]
    assert [a is None for a in ours] == [a is None for a in ref["per_class_ap50"]]
    assert max(abs(a - b) for a, b in zip(ours, ref["per_class_ap50"]) if a is not None) <= 1e-4


@pytest.mark.parametrize("lvis", [True, False], ids=["lvis", "coco"])
def test_degenerate_boxes_match_references(degenerate_case, lvis, degenerate_set):
    """Zero-width / zero-height detections, gts with json area 0, zero-size gt boxes and a gt with
    annotation id 0 (see the `degenerate_set` fixture), against lvis and pycocotools."""
    gt, dets = degenerate_set(degenerate_case, lvis=lvis)
    res, ref = _assert_matches_reference(gt, dets, lvis)
    if lvis and degenerate_case == "all_gt_area_0":
        # lvis evaluates no gt with area <= 0: every class is without gt, every metric -1.
        assert ref["AP"] == res["AP"] == -1 and all(a is None for a in ref["per_class"])
    else:
        assert ref["AP"] > 0.05  # a meaningful comparison, not -1 == -1


def test_zero_area_boxes_hand_computed():
    """lvis drops detections and gts whose area is not in (0, inf) (LVIS.get_ann_ids, called by
    LVISEval._prepare); COCOeval keeps them: a zero-area detection is a FP in 'all' / 'small'."""
    fp_zero_width = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 0, 40], "score": 0.9}
    tp = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.8}
    lvis_gt = _single_image_gt()
    coco_gt = copy.deepcopy(lvis_gt)
    for im in coco_gt["images"]:
        del im["neg_category_ids"], im["not_exhaustive_category_ids"]
    assert evaluate_lvis(lvis_gt, [fp_zero_width, tp])["AP"] == pytest.approx(1.0)
    res = evaluate_lvis(coco_gt, [fp_zero_width, tp])
    assert res["AP"] == pytest.approx(0.5) and res["APm"] == pytest.approx(1.0)
    # json area 0 (bbox intact): lvis has no gt left; COCOeval has a small gt the TP matches.
    lvis_gt["annotations"][0]["area"] = coco_gt["annotations"][0]["area"] = 0
    res = evaluate_lvis(lvis_gt, [tp])
    assert res["AP"] == -1 and res["per_class"][0]["AP"] is None
    res = evaluate_lvis(coco_gt, [tp])
    assert res["AP"] == pytest.approx(1.0) and res["APs"] == pytest.approx(1.0)
    # Annotation id 0: the references store a match as the gt's id and count "id != 0" as
    # matched, so the detection consumes the gt yet is a FP (precision 0 at every recall).
    for g in (_single_image_gt(), coco_gt):
        g["annotations"][0].update(id=0, area=1600.0)
        assert evaluate_lvis(g, [tp])["AP"] == 0.0


def test_matches_lvis_package_small_max_dets(make_set):
    gt, dets = make_set(3, n_images=20)
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), max_dets=20)
    ref = _lvis_reference(gt, dets, max_dets=20)
    # LVISEval names its AR keys after params.max_dets (300) whatever LVISResults capped at.
    _assert_close({**res, **{k: res[k.replace("300", "20")] for k in LVIS_KEYS}}, ref, LVIS_KEYS)


@pytest.mark.parametrize("seed,max_dets", [(0, 300), (1, 300), (2, 5)])
def test_matches_pycocotools(seed, max_dets, make_set):
    gt, dets = make_set(seed, lvis=False)
    assert any(a["iscrowd"] for a in gt["annotations"])
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), max_dets=max_dets)
    ref = _coco_reference(gt, dets, max_dets)
    _assert_close(res, ref, [k for k in ref if k != "per_class"])
    assert res["APr"] == res["APc"] == res["APf"] == -1  # no train= for a COCO gt


def test_coco_train_bins_and_groups(make_set):
    gt, dets = make_set(4, lvis=False)
    rng = np.random.default_rng(0)
    sizes = rng.choice([0, 3, 15, 30, 150, 500, 9000], len(gt["categories"]))
    counts = {c["id"]: int(n) for c, n in zip(gt["categories"], sizes)}
    train = {"images": [], "categories": gt["categories"], "annotations": []}
    aid = 0
    for cid, n in counts.items():
        for j in range(n):  # instance j on image j: image count == instance count
            train["annotations"].append({"id": aid, "image_id": j, "category_id": cid})
            aid += 1
    res = evaluate_lvis(gt, dets, train=train)
    per = {c["id"]: c for c in res["per_class"]}
    for lo, hi, key in [(1, 20, "AP1"), (20, 400, "AP2"), (400, 8000, "AP3"), (8000, 1e9, "AP4")]:
        aps = [per[c]["AP"] for c, n in counts.items() if lo <= n < hi and per[c]["AP"] is not None]
        assert res[key] == pytest.approx(np.mean(aps) if aps else -1, abs=1e-12)
    for g, (lo, hi) in {"r": (0, 10), "c": (11, 100), "f": (101, 1e9)}.items():
        aps = [
            per[c]["AP"] for c, n in counts.items() if lo <= n <= hi and per[c]["AP"] is not None
        ]
        assert res[f"AP{g}"] == pytest.approx(np.mean(aps) if aps else -1, abs=1e-12)
    assert all(
        per[c]["image_count"] == n and per[c]["instance_count"] == n for c, n in counts.items()
    )


def _single_image_gt(nel=()):
    return {
        "images": [{"id": 1, "neg_category_ids": [2], "not_exhaustive_category_ids": list(nel)}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600.0}
        ],
        "categories": [
            {"id": 1, "name": "a", "frequency": "f"},
            {"id": 2, "name": "b", "frequency": "r"},
            {"id": 3, "name": "c", "frequency": "c"},
        ],
    }


def test_hand_computed_federated_rules():
    # FP (score 0.9, IoU 0) ranked above the TP (IoU 1): precision at any recall is 1/2.
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.8},
        # class 3 is neither positive nor negative on the image: dropped, never a FP
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 40], "score": 0.95},
    ]
    res = evaluate_lvis(_single_image_gt(), dets)
    assert res["AP"] == pytest.approx(0.5) and res["AR@300"] == pytest.approx(1.0)
    assert res["APm"] == pytest.approx(0.5) and res["APs"] == -1 and res["APl"] == -1
    assert res["APr"] == -1 and res["APc"] == -1  # classes 2, 3 have no gt
    # Not exhaustive: the unmatched class-1 box is ignored instead of counted as FP.
    assert evaluate_lvis(_single_image_gt(nel=[1]), dets)["AP"] == pytest.approx(1.0)


def test_empty_detections(tmp_path, make_set):
    gt, _ = make_set(0, n_images=10)
    path = tmp_path / "empty.json"
    path.write_text("[ ]")
    for dets in ([], str(path)):
        res = evaluate_lvis(gt, dets)
        assert res["AP"] == 0.0 and res["AR@300"] == 0.0
        assert {c["AP"] for c in res["per_class"]} == {None, 0.0}


def test_input_forms_agree(tmp_path, make_set):
    gt, dets = make_set(5, n_images=15)
    for d in dets:  # quarter-pixel boxes: xywh <-> xyxy round trips exactly
        d["bbox"] = [round(v * 4) / 4 for v in d["bbox"]]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    by_img = {}
    for d in dets:
        by_img.setdefault(d["image_id"], []).append(d)
    tensors = []
    for img_id, ds in by_img.items():
        b = torch.tensor([d["bbox"] for d in ds], dtype=torch.float64)
        b[:, 2:] += b[:, :2]
        tensors.append(
            {
                "image_id": img_id,
                "boxes": b,
                "scores": torch.tensor([d["score"] for d in ds], dtype=torch.float64),
                "category_ids": torch.tensor([d["category_id"] for d in ds]),
            }
        )
    no_dets = next(im["id"] for im in gt["images"] if im["id"] not in by_img)
    tensors.append(
        {
            "image_id": torch.tensor(no_dets),
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "category_ids": torch.zeros(0, dtype=torch.int64),
        }
    )
    a = evaluate_lvis(gt, str(path))
    b = evaluate_lvis(gt, dets)
    c = evaluate_lvis(json.loads(json.dumps(gt)), tensors)
    for k in LVIS_KEYS:
        assert a[k] == b[k] == c[k], k


@pytest.mark.parametrize("digits", [None, 2])
def test_result_json_fast_path_is_exact(digits, tmp_path, monkeypatch):
    """Chunks decoded by msgspec must give bit-identical floats to the json module, full-precision
    and short decimals alike, exponents included; a valid file never takes the fallback."""
    rng = np.random.default_rng(0)
    n = 3000
    boxes = rng.random((n, 4)) * 500
    boxes[:, :2] -= 20  # some negative coordinates
    scores = rng.random(n)
    if digits is not None:
        boxes, scores = boxes.round(digits), scores.round(digits + 2)
    dets = [
        {
            "score": float(s),
            "bbox": [float(v) for v in b],
            "image_id": int(i),
            "category_id": int(c),
        }
        for s, b, i, c in zip(scores, boxes, rng.integers(1, 50, n), rng.integers(1, 9, n))
    ]
    dets[5]["score"] = 1e-7  # an exponent
    text = json.dumps(dets, indent=1)  # other key order, newlines
    path = tmp_path / "d.json"
    path.write_text(text)
    monkeypatch.setattr(results_io, "_CHUNK_BYTES", 20000)  # many chunks
    calls = {"chunks": 0, "whole": 0}
    chunk, whole = results_io._columns_from_structs, results_io._load_result_json_whole

    def counting_chunk(*a):
        calls["chunks"] += 1
        return chunk(*a)

    def counting_whole(*a):
        calls["whole"] += 1
        return whole(*a)

    monkeypatch.setattr(results_io, "_columns_from_structs", counting_chunk)
    monkeypatch.setattr(results_io, "_load_result_json_whole", counting_whole)
    cols = load_detections(str(path))
    assert calls["chunks"] > 5
    assert calls["whole"] == 0
    assert np.array_equal(cols.score, [d["score"] for d in dets])
    assert np.array_equal(cols.bbox, [d["bbox"] for d in dets])
    assert np.array_equal(cols.image_id, [d["image_id"] for d in dets])
    assert np.array_equal(cols.category_id, [d["category_id"] for d in dets])


def _result_file(tmp_path, numbers, image_id=b"1", category_id=b"2"):
    """A result json whose bbox / score tokens are written verbatim (four per bbox, then score)."""
    rows = [
        b'{"image_id": %s, "category_id": %s, "bbox": [%s], "score": %s}'
        % (image_id, category_id, b", ".join(numbers[i : i + 4]), numbers[i + 4])
        for i in range(0, len(numbers), 5)
    ]
    path = tmp_path / "tokens.json"
    path.write_bytes(b"[" + b", ".join(rows) + b"]")
    return str(path)


def test_result_number_tokens(tmp_path):
    """Plain, negative, long and signed-zero number tokens read exactly as float(token); tokens
    that are not json numbers are malformed json, named with the file."""
    tokens = [
        b"-2",
        b"-0.25",
        b"3.5",
        b"1",
        b"0.1",
        b"123456789012345",
        b"-0.0",
        b"7.0",
        b"-0",
        b"1234567890123456",
    ]
    cols = load_detections(_result_file(tmp_path, tokens))
    assert cols.bbox.ravel().tolist() + cols.score.tolist() == [
        -2.0,
        -0.25,
        3.5,
        1.0,
        123456789012345.0,
        -0.0,
        7.0,
        0.0,
        0.1,
        1234567890123456.0,
    ]
    # As the json module: "-0.0" is a negative zero, "-0" the integer 0.
    assert math.copysign(1, cols.bbox[1, 1]) == -1
    assert math.copysign(1, cols.bbox[1, 3]) == math.copysign(1, float(json.loads("-0"))) == 1
    for bad in (b"2.3.4", b"--2", b"2-3", b"", b"+2", b"7."):
        path = _result_file(tmp_path, [b"1", bad, b"3", b"4", b"0.5"])
        with pytest.raises(DetectionFormatError, match=r"tokens\.json: malformed json"):
            load_detections(path)


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ({"image_id": 99999}, r"detection #7 .*image_id 99999 is not in the ground truth"),
        ({"category_id": 2}, r"detection #7 .*category_id 2 is not in the ground truth"),
        ({"score": float("nan")}, r"detection #7 .*score must be a finite number"),
        ({"score": -0.5}, r"detection #7 .*score must be a finite number >= 0"),
        ({"bbox": [1.0, 2.0, -3.0, 4.0]}, r"detection #7 .*negative width or height"),
        ({"bbox": [1.0, 2.0, 3.0]}, r"detection #7 .*bbox must be \[x, y, w, h\]"),
        ({"image_id": 1.5}, r"detection #7 .*image_id must be an integer"),
    ],
)
def test_bad_detection_named(bad, pattern, tmp_path, make_set):
    gt, dets = make_set(0, n_images=10)
    dets = dets[:10]
    dets[7] = {**dets[7], **bad}
    with pytest.raises(DetectionFormatError, match=pattern):
        evaluate_lvis(gt, dets)
    if "bbox" not in bad or len(bad["bbox"]) == 4:
        path = tmp_path / "d.json"
        path.write_text(json.dumps(dets))
        with pytest.raises(DetectionFormatError, match=pattern):
            evaluate_lvis(gt, str(path))


@pytest.mark.parametrize(
    "field,convert,typename",
    [
        ("image_id", float, "float"),  # 1000.0: an integral float is not an id either
        ("category_id", float, "float"),
        ("image_id", lambda v: v + 0.5, "float"),
        ("image_id", str, "str"),
        ("category_id", str, "str"),
        ("category_id", lambda v: True, "bool"),  # category 1 exists: True must not pass as 1
    ],
)
def test_non_integer_result_ids_named(field, convert, typename, tmp_path, monkeypatch, make_set):
    gt, dets = make_set(0, n_images=10)
    dets = dets[:400]
    i = 337
    dets[i][field] = convert(dets[i][field])
    pattern = rf"detection #{i} .*{field} must be an integer, got .* \({typename}\); ids are"
    with pytest.raises(DetectionFormatError, match=pattern):
        evaluate_lvis(gt, dets)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    monkeypatch.setattr(results_io, "_CHUNK_BYTES", 3000)  # the entry sits in a later chunk
    with pytest.raises(DetectionFormatError, match=pattern):
        evaluate_lvis(gt, str(path))


def test_result_reader_refuses_float_ids(tmp_path):
    """The typed decoder reads ids as integers only: an id written with a '.' or an exponent must
    take the json path (which names the entry) instead of being read as an integer, and an id
    beyond 2^53 must not be rounded."""

    def read(image_id, category_id):
        return load_detections(
            _result_file(tmp_path, [b"1.5", b"2", b"3", b"4.25", b"0.5"], image_id, category_id)
        )

    cols = read(b"12", b"-3")
    assert cols.image_id.tolist() == [12] and cols.category_id.tolist() == [-3]
    assert read(b"9007199254740993", b"2").image_id.tolist() == [9007199254740993]
    for image_id, category_id, field in (
        (b"12.0", b"2", "image_id"),
        (b"2299.5", b"2", "image_id"),
        (b"1", b"3.0", "category_id"),
        (b"1", b" -3.0", "category_id"),
        (b"1e3", b"2", "image_id"),
    ):
        with pytest.raises(
            DetectionFormatError,
            match=rf"detection #0 .*{field} must be an "
            r"integer, got .* \(float\); ids are",
        ):
            read(image_id, category_id)


def test_large_ids_are_exact(tmp_path):
    """Ids above 2^53 are not exact in float64; they must neither be rounded nor mismatched."""
    big = (1 << 60) + 1
    gt = _single_image_gt()
    gt["images"][0]["id"] = big
    gt["images"].append({"id": big + 2, "neg_category_ids": [], "not_exhaustive_category_ids": []})
    gt["annotations"][0]["image_id"] = big
    dets = [{"image_id": big, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.8}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    for d in (dets, str(path)):
        assert evaluate_lvis(gt, d)["AP"] == pytest.approx(1.0)
        assert load_detections(d).image_id.tolist() == [big]


def test_non_integer_ids_in_tensor_dicts():
    good = {
        "image_id": 1,
        "boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]]),
        "scores": torch.tensor([0.9]),
        "category_ids": torch.tensor([1]),
    }
    assert evaluate_lvis(_single_image_gt(), [good])["AP"] == pytest.approx(1.0)
    assert evaluate_lvis(_single_image_gt(), [{**good, "image_id": torch.tensor(1)}])[
        "AP"
    ] == pytest.approx(1.0)
    for bad in (
        {"image_id": 1.0},
        {"image_id": 1.5},
        {"image_id": torch.tensor(1.0)},
        {"image_id": True},
        {"image_id": "1"},
        {"category_ids": torch.tensor([1.0])},
        {"category_ids": torch.tensor([True])},
    ):
        with pytest.raises(DetectionFormatError, match=r"detections\[0\].*ids are integers"):
            evaluate_lvis(_single_image_gt(), [{**good, **bad}])


def _set_value(doc, path, value):
    *head, last = path
    for k in head:
        doc = doc[k]
    doc[last] = value(doc[last]) if callable(value) else value


@pytest.mark.parametrize(
    "path,value,pattern",
    [
        # the example: an image id 2299.5 read as 2299 matched detections of image 2299
        (
            ("annotations", 7, "image_id"),
            lambda v: v + 0.5,
            r"annotation id 8 in gt has image_id 1000\.5 \(float\); ids are integers",
        ),
        (
            ("annotations", 7, "category_id"),
            float,
            r"annotation id 8 in gt has category_id \d+\.0 \(float\); ids are integers",
        ),
        (
            ("annotations", 7, "category_id"),
            str,
            r"annotation id 8 in gt has category_id '\d+' \(str\)",
        ),
        (
            ("annotations", 7, "category_id"),
            True,
            r"annotation id 8 in gt has category_id True \(bool\)",
        ),
        (("annotations", 7, "id"), float, r"annotation #7 in gt has id 8\.0 \(float\)"),
        (("annotations", 7, "id"), None, r"annotation #7 in gt has id None \(NoneType\)"),
        (("images", 3, "id"), lambda v: v + 0.5, r"image #3 in gt has id 1021\.5 \(float\)"),
        (("images", 3, "id"), float, r"image #3 in gt has id 1021\.0 \(float\)"),
        (("images", 3, "id"), str, r"image #3 in gt has id '1021' \(str\)"),
        (("images", 3, "id"), False, r"image #3 in gt has id False \(bool\)"),
        (("categories", 2, "id"), float, r"category #2 \('cls2'\) in gt has id 7\.0 \(float\)"),
        (
            ("images", 1, "neg_category_ids", 0),
            lambda v: v + 0.5,
            r"image 1007 in gt has neg_category_ids entry \d+\.5 \(float\)",
        ),
        (
            ("images", 2, "not_exhaustive_category_ids"),
            [4.0],
            r"image 1014 in gt has not_exhaustive_category_ids entry 4\.0 \(float\)",
        ),
        (("annotations", 7, "id"), 3, r"annotation id 3 occurs 2 times"),
    ],
)
def test_non_integer_gt_ids_named(path, value, pattern, make_set):
    gt, _ = make_set(0, n_images=10)
    assert gt["annotations"][7]["id"] == 8 and gt["images"][3]["id"] == 1021
    _set_value(gt, path, value)
    with pytest.raises(GroundTruthFormatError, match=pattern):
        evaluate_lvis(gt, [])


def test_non_integer_ids_name_the_file(tmp_path, make_set):
    gt, dets = make_set(0, n_images=10)
    gt["annotations"][7]["image_id"] += 0.5
    (tmp_path / "val.json").write_text(json.dumps(gt))
    with pytest.raises(
        GroundTruthFormatError,
        match=r"annotation id 8 in .*val\.json has image_id 1000\.5 \(float\)",
    ):
        evaluate_lvis(str(tmp_path / "val.json"), dets)
    gt, dets = make_set(0, n_images=10, lvis=False)
    train = {
        "images": [],
        "categories": gt["categories"],
        "annotations": [{"id": 1, "image_id": 1.5, "category_id": 1}],
    }
    with pytest.raises(GroundTruthFormatError, match=r"annotation id 1 in train has image_id 1\.5"):
        evaluate_lvis(gt, dets, train=train)


def test_missing_key_and_malformed_json(tmp_path, make_set):
    gt, dets = make_set(0, n_images=10)
    dets = dets[:10]
    del dets[4]["score"]
    with pytest.raises(DetectionFormatError, match=r"detection #4 .*misses key\(s\) \['score'\]"):
        evaluate_lvis(gt, dets)
    path = tmp_path / "bad.json"
    path.write_text('[{"image_id": 1000, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},')
    with pytest.raises(DetectionFormatError, match=r"bad.json: malformed json"):
        evaluate_lvis(gt, str(path))
    path.write_text('{"image_id": 1000}')
    with pytest.raises(DetectionFormatError, match=r"must hold a json list"):
        evaluate_lvis(gt, str(path))
    bad_gt = copy.deepcopy(gt)
    bad_gt["annotations"][3]["category_id"] = 777
    with pytest.raises(GroundTruthFormatError, match=r"annotation #3 .*category_id 777"):
        evaluate_lvis(bad_gt, [])
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_lvis(gt, [], iou_type="segm")


def test_report_files(tmp_path, make_set):
    gt, dets = make_set(1, n_images=12)
    res = evaluate_lvis(gt, dets)
    table = format_table(res)
    assert f"AP       {res['AP']:.4f}" in table and "classes with gt:" in table
    paths = write_report(res, str(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["AP"] == res["AP"] and set(LVIS_KEYS) <= set(metrics)
    rows = (tmp_path / "per_class_ap.csv").read_text().strip().splitlines()
    assert rows[0] == "id,class,frequency,training_images,training_instances,AP"
    assert len(rows) == 1 + len(gt["categories"])
    first = rows[1].split(",")
    cat0 = gt["categories"][0]
    assert first[:5] == [
        str(cat0["id"]),
        cat0["name"],
        cat0["frequency"],
        str(cat0["image_count"]),
        str(cat0["instance_count"]),
    ]
    assert (tmp_path / "ap_vs_frequency.png").stat().st_size > 1000
    assert set(paths) == {"metrics", "per_class", "plot"}


def test_tools_test_cli(tmp_path, capsys, make_set, load_tool):
    cli = load_tool("test")
    gt, dets = make_set(2, n_images=10)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "d.json").write_text(json.dumps(dets))
    # main() returns the exit code (tools/test.py, one-line CLI errors); the metrics are on disk.
    assert (
        cli.main(
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
    res = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert f"{res['AP']:.4f}" in out
    assert (tmp_path / "rep" / "per_class_ap.csv").exists()
    with pytest.raises(SystemExit):
        cli.parse_args(["--gt", "x.json"])
    with pytest.raises(SystemExit):
        cli.parse_args(["cfg.yaml", "--gt", "x.json", "--dets", "d.json"])
    args = cli.parse_args(["cfg.yaml", "--ckpt", "m.pth", "--opts", "test.max_dets=100"])
    assert (args.config, args.ckpt, args.opts) == ("cfg.yaml", "m.pth", ["test.max_dets=100"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(make_set):
    gt, dets = make_set(0)
    a = evaluate_lvis(gt, dets)
    b = evaluate_lvis(gt, dets, device="cuda")
    for k in LVIS_KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-12)


@pytest.mark.slow
def test_matches_lvis_package_larger(make_set):
    gt, dets = make_set(11, n_images=300, n_cats=120)
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets))
    _assert_close(res, _lvis_reference(gt, dets), LVIS_KEYS)
    assert not math.isnan(res["AP"])
