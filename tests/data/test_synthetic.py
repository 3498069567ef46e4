"""ltdet.data.synthetic: the generated long-tailed LVIS-format data set.

Every test generates a tiny version (48-64 px images, <= 160 training images) in a temporary
folder, so the whole file runs in a few seconds of CPU.
"""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from ltdet.data.synthetic import MARKER_NAME, make_synthetic_lvis, zipf_image_counts

# 8 classes; image counts 140, 35, 16, 9, 6, 4, 3, 2 -> groups f, c, c, r, r, r, r, r.
GROUPS = dict(
    num_train=150,
    num_val=24,
    num_classes=8,
    image_size=48,
    max_images_per_class=140,
    zipf_exponent=2.0,
    val_instances_per_class=6,
)
TINY = dict(
    num_train=24,
    num_val=12,
    num_classes=5,
    image_size=48,
    max_images_per_class=20,
    zipf_exponent=1.0,
    val_instances_per_class=4,
)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _digest(root):
    """sha1 over every file the generator wrote (json + JPEG bytes), marker excluded."""
    h = hashlib.sha1()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != MARKER_NAME:
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def groups_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn_groups")
    return make_synthetic_lvis(root, seed=3, **GROUPS)


def test_zipf_image_counts_formula():
    counts = zipf_image_counts(8, 140, 2.0)
    expected = [max(1, round(140 / k**2)) for k in range(1, 9)]
    assert counts.tolist() == expected == [140, 35, 16, 9, 6, 4, 3, 2]
    # Defaults of the bundled set: all three LVIS groups, 4 frequent classes.
    default = zipf_image_counts(30, 1000, 1.6)
    assert (default > 100).sum() == 4
    assert ((default > 10) & (default <= 100)).sum() == 13
    assert (default <= 10).sum() == 13


def test_train_counts_follow_zipf_and_lvis_groups(groups_set):
    train = _load(groups_set["train_json"])
    cats = sorted(train["categories"], key=lambda c: -c["image_count"])
    # Counted independently from the annotations.
    pairs = {(a["image_id"], a["category_id"]) for a in train["annotations"]}
    image_count = {c["id"]: sum(1 for _, cid in pairs if cid == c["id"]) for c in cats}
    instance_count = {
        c["id"]: sum(1 for a in train["annotations"] if a["category_id"] == c["id"]) for c in cats
    }
    assert [image_count[c["id"]] for c in cats] == [140, 35, 16, 9, 6, 4, 3, 2]
    for c in cats:
        assert c["image_count"] == image_count[c["id"]]
        assert c["instance_count"] == instance_count[c["id"]] >= c["image_count"]
        n = c["image_count"]
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")
    assert [c["frequency"] for c in cats] == ["f", "c", "c", "r", "r", "r", "r", "r"]
    # Every training image holds at least one object (1500 image-class pairs > 150 images).
    assert {a["image_id"] for a in train["annotations"]} == {im["id"] for im in train["images"]}


def test_categories_identical_in_both_splits(groups_set):
    train, val = _load(groups_set["train_json"]), _load(groups_set["val_json"])
    assert train["categories"] == val["categories"]
    names = [c["name"] for c in train["categories"]]
    assert len(set(names)) == len(names) == GROUPS["num_classes"]
    assert [c["id"] for c in train["categories"]] == list(range(1, GROUPS["num_classes"] + 1))
    for c in train["categories"]:
        assert c["synset"] == f"{c['name']}.n.01"


def test_val_is_balanced(groups_set):
    val = _load(groups_set["val_json"])
    per_class = np.bincount(
        [a["category_id"] for a in val["annotations"]], minlength=GROUPS["num_classes"] + 1
    )[1:]
    assert per_class.tolist() == [GROUPS["val_instances_per_class"]] * GROUPS["num_classes"]


def test_lvis_api_loads_and_boxes_are_valid(groups_set):
    np.float = float  # the lvis package predates NumPy 1.24
    from lvis import LVIS

    for split in ("train_json", "val_json"):
        data = _load(groups_set[split])
        api = LVIS(groups_set[split])
        assert len(api.get_img_ids()) == len(data["images"])
        assert len(api.get_ann_ids()) == len(data["annotations"]) > 0
        images = {im["id"]: im for im in data["images"]}
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        for a in data["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            assert 0 < a["area"] <= w * h
            assert a["iscrowd"] == 0
            polys = [np.asarray(p).reshape(-1, 2) for p in a["segmentation"]]
            assert all(len(p) >= 3 for p in polys)
            pts = np.concatenate(polys)
            # The contour runs through the centres of the shape's boundary pixels: half a pixel
            # inside the tight box on every side.
            assert pts.min(0).tolist() == [x + 0.5, y + 0.5]
            assert pts.max(0).tolist() == [x + w - 0.5, y + h - 0.5]
        for im in data["images"]:
            present = {a["category_id"] for a in data["annotations"] if a["image_id"] == im["id"]}
            assert not present & set(im["neg_category_ids"])
            assert set(im["not_exhaustive_category_ids"]) <= present
            decoded = cv2.imread(str(Path(groups_set["image_root"]) / im["file_name"]))
            assert decoded is not None and decoded.shape == (im["height"], im["width"], 3)


def test_neg_and_not_exhaustive_fractions(tmp_path):
    out = make_synthetic_lvis(
        tmp_path, seed=1, **{**TINY, "neg_fraction": 1.0, "not_exhaustive_prob": 1.0}
    )
    data = _load(out["train_json"])
    C = TINY["num_classes"]
    for im in data["images"]:
        present = {a["category_id"] for a in data["annotations"] if a["image_id"] == im["id"]}
        # neg_fraction 1: every absent class is verified absent.
        assert sorted(im["neg_category_ids"]) == sorted(set(range(1, C + 1)) - present)
        assert sorted(im["not_exhaustive_category_ids"]) == sorted(present)
    none = make_synthetic_lvis(
        tmp_path / "b", seed=1, **{**TINY, "neg_fraction": 0.0, "not_exhaustive_prob": 0.0}
    )
    for im in _load(none["train_json"])["images"]:
        assert im["neg_category_ids"] == [] and im["not_exhaustive_category_ids"] == []


def test_deterministic_from_seed(tmp_path):
    a = make_synthetic_lvis(tmp_path / "a", seed=7, **TINY)
    b = make_synthetic_lvis(tmp_path / "b", seed=7, **TINY)
    c = make_synthetic_lvis(tmp_path / "c", seed=8, **TINY)
    assert _load(a["train_json"]) == _load(b["train_json"])
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert _load(a["val_json"])["annotations"] != _load(c["val_json"])["annotations"]


def test_idempotent_and_regenerates_on_new_parameters(tmp_path):
    out = make_synthetic_lvis(tmp_path, seed=0, **TINY)
    before = _digest(tmp_path)
    jpg = Path(out["image_root"]) / "train" / "000001.jpg"
    mtime = jpg.stat().st_mtime_ns
    assert make_synthetic_lvis(tmp_path, seed=0, **TINY) == out
    assert jpg.stat().st_mtime_ns == mtime  # nothing rewritten
    assert _digest(tmp_path) == before
    # Other parameters: regenerated, and the images of the larger earlier set are removed.
    make_synthetic_lvis(tmp_path, seed=0, **{**TINY, "num_train": 20})
    train = _load(out["train_json"])
    assert len(train["images"]) == 20
    assert len(list((Path(out["image_root"]) / "train").glob("*.jpg"))) == 20
    # A half-written set (no marker) is regenerated.
    (tmp_path / MARKER_NAME).unlink()
    make_synthetic_lvis(tmp_path, seed=0, **TINY)
    assert _digest(tmp_path) == before


def test_bad_parameters_raise(tmp_path):
    with pytest.raises(TypeError, match="num_images"):
        make_synthetic_lvis(tmp_path, num_images=3)
    with pytest.raises(ValueError, match="num_train"):
        make_synthetic_lvis(tmp_path, **{**TINY, "num_train": 5})  # class rank 1 needs 20
    with pytest.raises(ValueError, match="num_val=0 must be >= 1"):
        make_synthetic_lvis(tmp_path, **{**TINY, "num_val": 0})  # an empty split
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_lvis(tmp_path, **{**TINY, "num_classes": 10_000})
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_lvis(
            tmp_path, **{**TINY, "image_size": 16, "min_radius": 3, "max_radius": 10}
        )
    assert not (tmp_path / MARKER_NAME).exists()


@pytest.mark.slow
def test_default_set_profile(tmp_path):
    """The bundled default: 4 f / 13 c / 13 r classes, >= 15 val instances per class."""
    out = make_synthetic_lvis(tmp_path, seed=0)
    train, val = _load(out["train_json"]), _load(out["val_json"])
    freq = [c["frequency"] for c in train["categories"]]
    assert (freq.count("f"), freq.count("c"), freq.count("r")) == (4, 13, 13)
    assert (
        sorted((c["image_count"] for c in train["categories"]), reverse=True)
        == zipf_image_counts(30, 1000, 1.6).tolist()
    )
    per_class = np.bincount([a["category_id"] for a in val["annotations"]], minlength=31)[1:]
    assert per_class.min() >= 15
