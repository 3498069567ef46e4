"""COCO-LT builder (profiles, greedy whole-image selection, determinism, bins) and the two data
CLIs (tools/make_coco_lt.py, tools/dataset_stats.py)."""

import json
import math

import numpy as np
import pytest

from ltdet.data import COCODetection, repeat_factors
from ltdet.data.coco_lt import bin_sizes, build_coco_lt, profile_from_counts, zipf_profile
from ltdet.frequency import coco_lt_bins


def _source_json(n_images=3000, n_classes=20, seed=0):
    """Balanced COCO-format source: one main class per image (1-3 boxes), sometimes a second."""
    rng = np.random.default_rng(seed)
    images, anns, k = [], [], 1
    for i in range(1, n_images + 1):
        images.append({"id": i, "width": 64, "height": 48, "file_name": f"{i}.jpg"})
        classes = [int(rng.integers(n_classes))]
        if rng.random() < 0.3:
            classes.append(int(rng.integers(n_classes)))
        for c in classes:
            for _ in range(int(rng.integers(1, 4))):
                anns.append(
                    {
                        "id": k,
                        "image_id": i,
                        "category_id": 100 + c,
                        "iscrowd": 0,
                        "bbox": [1.0, 1.0, 10.0, 10.0],
                        "area": 100.0,
                    }
                )
                k += 1
        if i % 50 == 0:  # crowd regions: kept with their image, never counted
            anns.append(
                {
                    "id": k,
                    "image_id": i,
                    "category_id": 100,
                    "iscrowd": 1,
                    "bbox": [0.0, 0.0, 30.0, 30.0],
                    "area": 900.0,
                }
            )
            k += 1
    cats = [{"id": 100 + c, "name": f"c{c}", "supercategory": "x"} for c in range(n_classes)]
    return {"images": images, "annotations": anns, "categories": cats, "info": {"year": 2017}}


def test_zipf_profile_formula():
    p = zipf_profile(80, 5000.0, 100.0)
    s = math.log(100) / math.log(80)
    assert np.allclose(p, 5000.0 / np.arange(1, 81) ** s)
    assert p[0] / p[-1] == pytest.approx(100.0)
    assert zipf_profile(1, 7.0, 100.0).tolist() == [7.0]
    with pytest.raises(ValueError, match="imbalance"):
        zipf_profile(5, 10.0, 0.5)


def test_profile_from_counts_resamples_sorted_counts():
    src = [3, 5000, 1, 40, 900, 12, 7, 250]
    p = profile_from_counts(src, 20)
    assert p.shape == (20,)
    assert p[0] == pytest.approx(5000) and p[-1] == pytest.approx(1)
    assert np.all(np.diff(p) <= 1e-9)
    # same number of classes: the sorted counts themselves
    assert np.allclose(profile_from_counts(src, 8), sorted(src, reverse=True))
    with pytest.raises(ValueError, match="no annotated class"):
        profile_from_counts([0, 0], 4)


def test_instance_bins():
    counts = [0, 1, 19, 20, 399, 400, 7999, 8000, 10**6]
    assert coco_lt_bins(counts).tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 3]
    assert bin_sizes(counts) == {"AP1": 2, "AP2": 2, "AP3": 2, "AP4": 2}


def test_build_coco_lt_follows_zipf_and_keeps_whole_images():
    data = _source_json()
    out, s = build_coco_lt(data, imbalance=100.0, seed=0)
    src_ids = {im["id"] for im in data["images"]}
    kept = {im["id"] for im in out["images"]}
    assert kept <= src_ids and 0 < len(kept) < len(src_ids)
    # whole images: every annotation of a kept image (crowd included) is in the output
    want = sorted(a["id"] for a in data["annotations"] if a["image_id"] in kept)
    assert sorted(a["id"] for a in out["annotations"]) == want
    # achieved counts, recomputed here from the output json (non-crowd only)
    cat_ids = sorted(c["id"] for c in data["categories"])
    achieved = np.array(
        [
            sum(1 for a in out["annotations"] if a["category_id"] == c and not a["iscrowd"])
            for c in cat_ids
        ]
    )
    assert np.array_equal(achieved, s["achieved"])
    assert [c["instance_count"] for c in out["categories"]] == achieved.tolist()
    target = s["target"]
    # the head keeps its available count, the tail target is head / imbalance
    available = np.array(
        [
            sum(1 for a in data["annotations"] if a["category_id"] == c and not a["iscrowd"])
            for c in cat_ids
        ]
    )
    assert target.max() == available.max()
    assert target.min() == round(available.max() / 100.0)
    assert np.all(achieved >= target)  # the greedy covers every target
    # The head's target is its whole supply, so all its images (and their other classes) are
    # forced in; beyond that, overshoot is at most one image's extra boxes (<= 2 here).
    head = cat_ids[int(np.argmax(target))]
    head_imgs = {
        a["image_id"] for a in data["annotations"] if a["category_id"] == head and not a["iscrowd"]
    }
    forced = np.array(
        [
            sum(
                1
                for a in data["annotations"]
                if a["image_id"] in head_imgs and a["category_id"] == c and not a["iscrowd"]
            )
            for c in cat_ids
        ]
    )
    assert np.all(achieved <= np.maximum(target, forced) + 2)
    assert achieved.max() / achieved.min() > 25
    assert out["info"]["coco_lt"]["seed"] == 0 and out["info"]["year"] == 2017


def test_zipf_head_is_the_largest_feasible():
    # availability 100, 100, 100, 2 instances: the tail bounds the law, n_0 = 2 * 4^s = 20
    images, anns = [], []
    for i in range(302):
        images.append({"id": i + 1, "width": 8, "height": 8, "file_name": "x.jpg"})
        anns.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": min(i // 100, 3),
                "bbox": [0, 0, 2, 2],
                "iscrowd": 0,
            }
        )
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": c, "name": str(c)} for c in range(4)],
    }
    _, s = build_coco_lt(data, imbalance=10.0, seed=0)
    law = 20.0 / np.arange(1, 5) ** (math.log(10) / math.log(4))
    assert np.allclose(np.sort(s["target"])[::-1], np.round(law))
    assert np.array_equal(s["achieved"], s["target"])  # one box per image: exact


def test_build_coco_lt_deterministic_from_seed():
    data = _source_json(n_images=1500)
    a, _ = build_coco_lt(data, imbalance=50.0, seed=3)
    b, _ = build_coco_lt(data, imbalance=50.0, seed=3)
    c, _ = build_coco_lt(data, imbalance=50.0, seed=4)
    ids = lambda d: [im["id"] for im in d["images"]]  # noqa: E731
    assert ids(a) == ids(b) and json.dumps(a) == json.dumps(b)
    assert ids(a) != ids(c)


def test_build_coco_lt_with_profile():
    data = _source_json()
    profile = [400, 200, 90, 50, 30, 20, 12, 8, 5, 3]  # 10 classes resampled to 20
    out, s = build_coco_lt(data, profile=profile, seed=0)
    expected = np.maximum(np.round(profile_from_counts(profile, 20)), 1)
    assert np.allclose(np.sort(s["target"])[::-1], expected)
    assert np.all(s["achieved"] >= s["target"])
    assert out["info"]["coco_lt"]["profile"] == "custom"


def test_build_coco_lt_bad_input():
    data = _source_json(n_images=10)
    with pytest.raises(ValueError, match="no non-crowd annotation"):
        build_coco_lt({**data, "annotations": []})
    with pytest.raises(ValueError, match="no images"):
        build_coco_lt({**data, "images": [], "annotations": []})
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["bbox"][2] = 0.0
    bad_id = bad["annotations"][0]["id"]
    with pytest.raises(ValueError, match=rf"annotation id {bad_id} .*skip_invalid"):
        build_coco_lt(bad)
    out, _ = build_coco_lt(bad, imbalance=2.0, skip_invalid=True)
    assert bad_id not in {a["id"] for a in out["annotations"]}


def test_make_coco_lt_cli(tmp_path, capsys, load_tool):
    src = tmp_path / "train.json"
    src.write_text(json.dumps(_source_json(n_images=1500)))
    out = tmp_path / "sub" / "coco_lt.json"
    load_tool("make_coco_lt").main(
        [str(src), "--out", str(out), "--imbalance", "30", "--seed", "1"]
    )
    text = capsys.readouterr().out
    sub = json.loads(out.read_text())
    n = len(sub["images"])
    assert f"{n} of 1500 images" in text
    counts = [c["instance_count"] for c in sub["categories"]]
    b = bin_sizes(counts)
    assert f"AP1={b['AP1']} AP2={b['AP2']} AP3={b['AP3']} AP4={b['AP4']}" in text
    ds = COCODetection(str(out), str(tmp_path))
    img = np.array([ds.stats.image_count.numpy()]).ravel()
    groups = {
        "r": int((img <= 10).sum()),
        "c": int(((img > 10) & (img <= 100)).sum()),
        "f": int((img > 100).sum()),
    }
    assert f"r={groups['r']} c={groups['c']} f={groups['f']}" in text
    assert len(ds) == n


def test_dataset_stats_cli(tmp_path, capsys, load_tool):
    data = _source_json(n_images=400)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    png = tmp_path / "stats.png"
    load_tool("dataset_stats").main([str(path), "--threshold", "0.2", "--plot", str(png)])
    text = capsys.readouterr().out
    rf = repeat_factors(str(path), threshold=0.2)
    assert f"expected RFS epoch length: {rf.sum().item():.0f} images" in text
    assert "400 images" in text and text.count("\n") > 20  # one table row per class
    assert "c0 " in text and "c19 " in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
