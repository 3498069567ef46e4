"""Mask AP (``evaluate_lvis(iou_type="segm")``) against the official `lvis` package and
pycocotools, the mask input forms (RLE json, result dicts, model tensors) and bad mask input."""

import copy
import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from test_evaluation import LVIS_KEYS, _assert_close, _coco_reference, _lvis_reference

from ltdet.evaluation import evaluate_lvis
from ltdet.evaluation.lvis_eval import GroundTruthFormatError
from ltdet.evaluation.masks import encode_masks, mask_column, rle_stats
from ltdet.evaluation.results_io import DetectionFormatError, load_detections


def _check_lvis(gt, dets, **kw):
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), iou_type="segm", **kw)
    ref = _lvis_reference(gt, dets, iou_type="segm", **kw)
    _assert_close(res, ref, LVIS_KEYS + ["AP50r", "AP50c", "AP50f"])
    ours = [c["AP50"] for c in res["per_class"]]
    assert [a is None for a in ours] == [a is None for a in ref["per_class_ap50"]]
    assert max(abs(a - b) for a, b in zip(ours, ref["per_class_ap50"]) if a is not None) <= 1e-4
    return res, ref


def test_segm_fixture_exercises_the_edge_cases(make_segm_set):
    gt, dets = make_segm_set(0)
    assert any(
        isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str)
        for a in gt["annotations"]
    )  # compressed RLE
    assert any(
        isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], list)
        for a in gt["annotations"]
    )  # uncompressed RLE
    assert any(
        isinstance(a["segmentation"], list) and len(a["segmentation"]) == 2
        for a in gt["annotations"]
    )  # multi-part polygons, merged
    det_areas = [int(mask_utils.area(d["segmentation"])) for d in dets]
    assert 32**2 in det_areas and 96**2 in det_areas and 0 in det_areas
    assert any("\\" in d["segmentation"]["counts"] for d in dets)  # json escapes in counts
    assert any("bbox" in d for d in dets) and any("bbox" not in d for d in dets)
    per_img = {}
    for d in dets:
        per_img[d["image_id"]] = per_img.get(d["image_id"], 0) + 1
    assert max(per_img.values()) > 300
    assert len(per_img) < len(gt["images"])  # an image without detections


@pytest.mark.parametrize("seed", [0, 1])
def test_segm_matches_lvis_package(seed, make_segm_set):
    res, _ = _check_lvis(*make_segm_set(seed))
    assert res["AP"] > 0.05 and min(res[f"AP{g}"] for g in "rcf") > 0
    assert res["iou_type"] == "segm"


def test_segm_matches_lvis_package_small_max_dets(make_segm_set):
    gt, dets = make_segm_set(3, n_images=16)
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), iou_type="segm", max_dets=20)
    ref = _lvis_reference(gt, dets, max_dets=20, iou_type="segm")
    _assert_close({**res, **{k: res[k.replace("300", "20")] for k in LVIS_KEYS}}, ref, LVIS_KEYS)


@pytest.mark.parametrize("seed,max_dets", [(0, 300), (2, 5)])
def test_segm_matches_pycocotools(seed, max_dets, make_segm_set):
    gt, dets = make_segm_set(seed, lvis=False)
    assert any(a["iscrowd"] for a in gt["annotations"])
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), iou_type="segm", max_dets=max_dets)
    ref = _coco_reference(gt, dets, max_dets, iou_type="segm")
    _assert_close(res, ref, [k for k in ref if k != "per_class"])


def test_segm_uses_mask_area_not_box_area(make_segm_set):
    """A result's box never sets its area: a tiny mask in a large box is 'small'."""
    gt, dets = make_segm_set(1, n_images=12)
    for d in dets:
        d["bbox"] = [0.0, 0.0, 500.0, 500.0]
    res = evaluate_lvis(copy.deepcopy(gt), copy.deepcopy(dets), iou_type="segm")
    ref = _lvis_reference(gt, dets, iou_type="segm")  # boxes stripped
    _assert_close(res, ref, LVIS_KEYS)


def test_segm_input_forms_agree(tmp_path, make_segm_set, segm_hw):
    gt, dets = make_segm_set(2, n_images=12)
    ref = evaluate_lvis(gt, dets, iou_type="segm")
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    from_file = evaluate_lvis(gt, str(path), iou_type="segm")
    as_bytes = copy.deepcopy(dets)
    for d in as_bytes:
        d["segmentation"]["counts"] = d["segmentation"]["counts"].encode()
    from_bytes = evaluate_lvis(gt, as_bytes, iou_type="segm")
    # Per-image tensors: decode every result mask to a float "probability" map.
    by_img = {im["id"]: [] for im in gt["images"]}
    for d in dets:
        by_img[d["image_id"]].append(d)
    tensors = []
    for img_id, ds in by_img.items():
        H, W = segm_hw
        m = (
            np.stack([mask_utils.decode(d["segmentation"]) for d in ds])
            if ds
            else np.zeros((0, H, W), np.uint8)
        )
        prob = torch.from_numpy(m).float()[:, None] * 0.6 + 0.2  # 0.8 in, 0.2 out
        tensors.append(
            {
                "image_id": img_id,
                "masks": prob,
                "scores": torch.tensor([d["score"] for d in ds], dtype=torch.float64),
                "category_ids": torch.tensor([d["category_id"] for d in ds], dtype=torch.int64),
            }
        )
    from_tensors = evaluate_lvis(gt, tensors, iou_type="segm")
    for other in (from_file, from_bytes, from_tensors):
        for k in LVIS_KEYS:
            assert other[k] == pytest.approx(ref[k], abs=1e-12), k


def test_json_reader_chunks_nested_masks(tmp_path, monkeypatch, make_segm_set):
    """The chunked reader cuts between top-level objects only (a segmentation dict inside an
    object is followed by ',' too); columns equal the dict path's, bytes for bytes."""
    from ltdet.evaluation import results_io

    gt, dets = make_segm_set(0, n_images=10)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    monkeypatch.setattr(results_io, "_CHUNK_BYTES", 300)
    calls = []
    orig = results_io._load_result_json_whole
    monkeypatch.setattr(
        results_io, "_load_result_json_whole", lambda *a: calls.append(1) or orig(*a)
    )
    a = load_detections(str(path), iou_type="segm")
    assert not calls  # no fallback to the json module
    b = load_detections(dets, iou_type="segm")
    assert np.array_equal(a.score, b.score) and np.array_equal(a.image_id, b.image_id)
    assert np.array_equal(a.segm.counts, b.segm.counts)
    assert np.array_equal(a.segm.offsets, b.segm.offsets)
    assert np.array_equal(a.segm.size, b.segm.size)


def test_rle_stats_match_pycocotools():
    rng = np.random.default_rng(0)
    strings, sizes, areas = [], [], []
    for i in range(200):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        m = (rng.random((h, w)) < [0.0, 1.0, 0.5, 0.02][i % 4]).astype(np.uint8)
        r = mask_utils.encode(np.asfortranarray(m))
        strings.append(r["counts"].decode())
        sizes.append(r["size"])
        areas.append(int(mask_utils.area(r)))
    area, ok = rle_stats(mask_column(strings, sizes), np.arange(200))
    assert ok.all() and area.tolist() == areas
    broken = list(strings)
    broken[3] = broken[3][:-1]  # counts no longer add up to h * w
    broken[7] = broken[7] + "0"
    _, ok = rle_stats(mask_column(broken, sizes), np.arange(200))
    assert np.flatnonzero(~ok).tolist() == [3, 7]


def test_encode_masks_matches_torchvision_reference():
    """torchvision references/detection/coco_eval.py: masks > 0.5, Fortran uint8, encode."""
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.random((5, 1, 33, 47)).astype(np.float32))
    ours = encode_masks(probs)
    ref = [
        mask_utils.encode(np.array(m[0, :, :, np.newaxis], dtype=np.uint8, order="F"))[0]
        for m in (probs > 0.5).numpy()
    ]
    assert [o["counts"] for o in ours] == [r["counts"].decode() for r in ref]
    assert all(o["size"] == [33, 47] for o in ours)


# ------------------------------------------------------------------------------------------------
# Bad input: the error names the entry and the fix.

# Stands for the images' [height, width] (the `segm_hw` fixture) in the parameters below.
IMAGE_HW = "image [height, width]"


def _at_image_size(bad, segm_hw):
    if isinstance(bad, dict) and bad.get("size") == IMAGE_HW:
        return {**bad, "size": list(segm_hw)}
    return bad


@pytest.fixture
def small_segm_set(make_segm_set):
    """A small segm set, built anew for each test (the tests edit it)."""
    return make_segm_set(4, n_images=8)


def test_results_mixing_boxes_and_masks_named(tmp_path, small_segm_set):
    gt, dets = small_segm_set
    dets[5].pop("segmentation")
    dets[5]["bbox"] = [1.0, 2.0, 3.0, 4.0]
    want = (
        rf"detection #5 \(image_id {dets[5]['image_id']}, category_id "
        rf"{dets[5]['category_id']}\) has no 'segmentation'.*iou_type='bbox'"
    )
    with pytest.raises(DetectionFormatError, match=want):
        evaluate_lvis(gt, dets, iou_type="segm")
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    with pytest.raises(DetectionFormatError, match=want):
        evaluate_lvis(gt, str(path), iou_type="segm")
    # bbox-only per-image tensors for segm
    with pytest.raises(DetectionFormatError, match=r"misses key\(s\) \['masks'\]"):
        evaluate_lvis(
            gt,
            [
                {
                    "image_id": 1000,
                    "boxes": torch.zeros(0, 4),
                    "scores": torch.zeros(0),
                    "category_ids": torch.zeros(0).long(),
                }
            ],
            iou_type="segm",
        )


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], "polygon list"),
        ({"size": IMAGE_HW, "counts": [1, 2, 3]}, "compressed RLE"),
        ({"counts": "abc"}, "compressed RLE"),
        ({"size": IMAGE_HW, "counts": "ab{c"}, "not a compressed RLE string"),
        ({"size": IMAGE_HW, "counts": "00"}, "not a valid compressed RLE"),
        ({"size": [10, 20], "counts": "0R6"}, r"mask size .*\[10, 20\] differs from its image's"),
    ],
)
def test_bad_result_mask_named(bad, pattern, tmp_path, small_segm_set, segm_hw):
    bad = _at_image_size(bad, segm_hw)
    gt, dets = small_segm_set
    # An entry on an image/class the federated filter keeps, so validity is checked.
    pos = {(a["image_id"], a["category_id"]) for a in gt["annotations"]}
    i = next(i for i, d in enumerate(dets) if (d["image_id"], d["category_id"]) in pos)
    dets[i]["segmentation"] = bad
    with pytest.raises(DetectionFormatError, match=rf"detection #{i} .*{pattern}"):
        evaluate_lvis(gt, dets, iou_type="segm")
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dets))
    with pytest.raises(DetectionFormatError, match=rf"detection #{i} .*{pattern}"):
        evaluate_lvis(gt, str(path), iou_type="segm")


def test_tensor_mask_size_named(small_segm_set):
    gt, _ = small_segm_set
    img = gt["images"][0]["id"]
    bad = [
        {
            "image_id": img,
            "masks": torch.ones(2, 1, 30, 40),
            "scores": torch.ones(2),
            "category_ids": torch.tensor([gt["categories"][0]["id"]] * 2),
        }
    ]
    with pytest.raises(DetectionFormatError, match=r"mask size .*\[30, 40\] differs"):
        evaluate_lvis(gt, bad, iou_type="segm")


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ([[1.0, 2.0, 3.0, 4.0]], "not a valid polygon"),
        ([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]], "not a valid polygon"),
        ([["a", 2.0, 3.0, 4.0, 5.0, 6.0]], "not a valid polygon"),
        ([], "not a valid polygon"),
        ({"size": [5, 5], "counts": "0R6"}, r"RLE size \[5, 5\] differs from its image's"),
        ({"size": IMAGE_HW, "counts": [3, 4]}, "adding up to height"),
        ({"size": IMAGE_HW, "counts": "1"}, "not a valid compressed RLE"),
        (None, "needs a 'segmentation'"),
    ],
)
def test_bad_gt_mask_named(bad, pattern, small_segm_set, segm_hw):
    bad = _at_image_size(bad, segm_hw)
    gt, dets = small_segm_set
    a = gt["annotations"][3]
    a["segmentation"] = bad
    want = rf"annotation #3 \(id {a['id']}, image_id {a['image_id']}, .*{pattern}"
    with pytest.raises(GroundTruthFormatError, match=want):
        evaluate_lvis(gt, dets, iou_type="segm")
    evaluate_lvis(
        gt, [{k: v for k, v in d.items() if k != "segmentation"} for d in dets if "bbox" in d]
    )  # bbox evaluation never reads the masks


def test_gt_without_image_size_named(small_segm_set):
    gt, dets = small_segm_set
    del gt["images"][2]["height"]
    with pytest.raises(GroundTruthFormatError, match=r"image .* lacks an integer 'height'"):
        evaluate_lvis(gt, dets, iou_type="segm")


def test_segm_empty_and_no_dets_images(small_segm_set):
    gt, dets = small_segm_set
    assert evaluate_lvis(gt, [], iou_type="segm")["AP"] == 0.0
    one = [d for d in dets if d["image_id"] == dets[0]["image_id"]]
    res = evaluate_lvis(gt, one, iou_type="segm")
    assert res["AP"] >= 0


@pytest.mark.slow
def test_segm_matches_lvis_package_larger(make_segm_set):
    _check_lvis(*make_segm_set(11, n_images=400, n_cats=150))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_segm_cuda_matches_cpu(make_segm_set):
    gt, dets = make_segm_set(0)
    a = evaluate_lvis(gt, dets, iou_type="segm")
    b = evaluate_lvis(gt, dets, iou_type="segm", device="cuda")
    for k in LVIS_KEYS:
        assert a[k] == pytest.approx(b[k], abs=1e-12)
