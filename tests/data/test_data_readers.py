"""LVIS / COCO readers on generated json + real JPEGs, ClassStats, label mapping, bad input."""

import json
import logging
import os

import lvis
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from ltdet.data import (
    ClassStats,
    COCODetection,
    LVISDetection,
    build_dataset,
    build_transforms,
    collate_detection,
)
from ltdet.frequency import frequency_from_counts


def _expected_targets(data, image_id):
    """Boxes (xyxy) and labels of an image's non-crowd annotations, computed by hand."""
    label = {c: i + 1 for i, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
    boxes = [
        [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
        for a in anns
    ]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(
        [label[a["category_id"]] for a in anns], dtype=torch.int64
    )


def test_lvis_reader_targets_and_image(tmp_path, image_sizes, make_lvis):
    path, root, data = make_lvis(tmp_path)
    ds = LVISDetection(path, root)
    assert isinstance(ds.api, lvis.LVIS)
    assert len(ds) == 6 and ds.image_ids == [1, 2, 3, 4, 5, 6]
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    # cv2 decodes BGR; the left half was written as BGR red -> RGB channel 0 high, channel 2 low.
    left = image[:, 4:44, 4:28].mean(dim=(1, 2))
    assert left[0] > 0.9 and left[2] < 0.1
    boxes, labels = _expected_targets(data, 1)
    assert torch.equal(target["boxes"], boxes)
    assert torch.equal(target["labels"], labels)
    assert target["labels"].tolist() == [3, 1]  # cat 11 -> label 3, cat 3 -> label 1
    assert target["image_id"] == 1 and target["orig_size"] == (48, 64)
    assert target["scale"] == 1.0 and target["flipped"] is False
    empty_img, empty = ds[5]  # last image has no annotation
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty_img.shape == (3, image_sizes[5 % 4][1], image_sizes[5 % 4][0])


def test_lvis_reader_from_dict_and_basename_layout(tmp_path, make_lvis):
    path, root, data = make_lvis(tmp_path)
    # LVIS val mixes COCO splits: with the images directly under image_root the basename is used.
    flat_root = os.path.join(root, "train2017")
    ds = LVISDetection(data, flat_root)
    assert ds.json_path is None
    assert ds.image_path(0) == os.path.join(flat_root, "000000000001.jpg")
    assert ds[0][0].shape == (3, 48, 64)


def test_label_mapping_round_trip(tmp_path, cat_ids, make_lvis):
    path, root, _ = make_lvis(tmp_path, write=False)
    ds = LVISDetection(path, root)
    assert ds.cat_ids == [3, 7, 11]
    assert ds.cat_id_to_label == {3: 1, 7: 2, 11: 3}
    assert all(ds.label_to_cat_id[ds.cat_id_to_label[c]] == c for c in cat_ids)
    assert ds.labels_to_cat_ids(torch.tensor([3, 1, 2, 1])).tolist() == [11, 3, 7, 3]
    assert ds.class_names == ["class_3", "class_7", "class_11"]


def test_coco_reader_drops_crowd(tmp_path, cat_ids, make_coco):
    path, img_dir, data = make_coco(tmp_path)
    ds = COCODetection(path, img_dir)
    assert isinstance(ds.api, COCO)
    _, target = ds[0]
    boxes, labels = _expected_targets(data, 1)
    assert target["boxes"].shape == (2, 4)  # 2 regular + 1 crowd annotation in the json
    assert torch.equal(target["boxes"], boxes) and torch.equal(target["labels"], labels)
    # stats count the loaded (non-crowd) annotations only
    n_inst = [
        sum(1 for a in data["annotations"] if a["category_id"] == c and not a["iscrowd"])
        for c in sorted(cat_ids)
    ]
    assert ds.stats.instance_count.tolist() == n_inst


def test_build_dataset_detects_format(tmp_path, make_coco, make_lvis):
    lp, lroot, _ = make_lvis(tmp_path / "l", write=False)
    cp, croot, _ = make_coco(tmp_path / "c", write=False)
    assert type(build_dataset(lp, lroot)) is LVISDetection
    assert type(build_dataset(cp, croot)) is COCODetection
    assert type(build_dataset(lp, lroot, format="coco")) is COCODetection
    assert build_dataset(lp, lroot).json_path == lp
    with pytest.raises(ValueError, match="data.format"):
        build_dataset(lp, lroot, format="voc")


def test_aspect_ratios_and_image_labels_without_decoding(tmp_path, cat_ids, image_sizes, make_lvis):
    path, root, data = make_lvis(tmp_path, write=False)  # no image files at all
    ds = LVISDetection(path, root)
    expected = [image_sizes[i % 4][0] / image_sizes[i % 4][1] for i in range(6)]
    assert torch.allclose(ds.aspect_ratios(), torch.tensor(expected, dtype=torch.float64))
    label = {c: i + 1 for i, c in enumerate(sorted(cat_ids))}
    for i in range(6):
        want = {label[a["category_id"]] for a in data["annotations"] if a["image_id"] == i + 1}
        assert ds.image_labels(i) == want


def test_class_stats_counts_and_frequency(tmp_path, cat_ids, make_coco, make_lvis):
    path, root, data = make_lvis(tmp_path, write=False)
    stats = ClassStats.from_json(path)
    cats = sorted(cat_ids)
    inst = [sum(a["category_id"] == c for a in data["annotations"]) for c in cats]
    imgs = [
        len({a["image_id"] for a in data["annotations"] if a["category_id"] == c}) for c in cats
    ]
    assert stats.instance_count.tolist() == inst and stats.image_count.tolist() == imgs
    assert stats.image_count.dtype == torch.float32
    assert stats.num_images == 6 and stats.num_classes == 3
    assert stats.frequency == ["r", "r", "r"]  # from the json's field
    assert stats.cat_ids == cats
    assert ClassStats.from_json(data).instance_count.tolist() == inst  # dict input
    ds = LVISDetection(path, root)
    assert ds.stats.image_count.tolist() == imgs and ClassStats.from_dataset(ds).num_images == 6
    # COCO json has no frequency field -> derived from image counts
    cpath, _, _ = make_coco(tmp_path / "c", write=False)
    assert ClassStats.from_json(cpath).frequency == ["r", "r", "r"]


def test_frequency_thresholds_and_dataclass():
    assert frequency_from_counts([0, 1, 10, 11, 100, 101, 5000]) == [
        "r",
        "r",
        "r",
        "c",
        "c",
        "f",
        "f",
    ]
    s = ClassStats(image_count=[5, 50, 500], instance_count=[6, 60, 600], num_images=600)
    assert s.frequency == ["r", "c", "f"] and s.num_classes == 3
    with pytest.raises(ValueError, match="instance_count"):
        ClassStats(image_count=[1, 2], instance_count=[1], num_images=3)
    with pytest.raises(ValueError, match="frequency"):
        ClassStats(image_count=[1], instance_count=[1], num_images=3, frequency=["x"])


def test_filter_empty(tmp_path, make_lvis):
    path, root, _ = make_lvis(tmp_path)
    ds = LVISDetection(path, root, filter_empty=True)
    assert ds.image_ids == [1, 2, 3, 4, 5]
    assert ds.image_labels(4) == {1, 2}  # cats 3 and 7 on image 5
    assert ds[4][1]["image_id"] == 5


def test_transforms_through_dataset_and_collate(tmp_path, make_lvis):
    path, root, data = make_lvis(tmp_path)
    cfg = {"min_size": [96], "max_size": 200, "test_min_size": 96, "hflip_prob": 0.0}
    ds = LVISDetection(path, root, build_transforms(cfg, train=True))
    image, target = ds[0]  # 64x48 -> shorter side 96: scale 2
    assert image.shape == (3, 96, 128) and target["scale"] == 2.0
    boxes, _ = _expected_targets(data, 1)
    assert torch.allclose(target["boxes"] / target["scale"], boxes)
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [1, 2]
    with pytest.raises(ValueError, match="empty batch"):
        collate_detection([])


# ----------------------------------------------------------------------------- bad input


def _rewrite(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def test_missing_image_file(tmp_path, make_lvis):
    path, root, _ = make_lvis(tmp_path)
    os.remove(os.path.join(root, "train2017", "000000000002.jpg"))
    ds = LVISDetection(path, root)
    with pytest.raises(FileNotFoundError, match=r"000000000002\.jpg.*image id 2.*image_root"):
        ds[1]


def test_corrupt_jpeg(tmp_path, make_coco):
    path, img_dir, _ = make_coco(tmp_path)
    with open(os.path.join(img_dir, "000000000003.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = COCODetection(path, img_dir)
    with pytest.raises(OSError, match=r"000000000003\.jpg.*image id 3.*corrupt"):
        ds[2]


def test_image_size_mismatch(tmp_path, make_coco):
    path, img_dir, data = make_coco(tmp_path)
    data["images"][0]["width"] = 999
    ds = COCODetection(data, img_dir)
    with pytest.raises(ValueError, match=r"image id 1.*64x48.*999x48"):
        ds[0]


@pytest.mark.parametrize("wh", [(0.0, 5.0), (5.0, -1.0)])
def test_degenerate_box_error_and_skip(tmp_path, caplog, wh, make_lvis):
    path, root, data = make_lvis(tmp_path, write=False)
    data["annotations"][3]["bbox"][2:] = list(wh)
    data["annotations"][5]["bbox"][2:] = list(wh)
    _rewrite(path, data)
    ann, img = data["annotations"][3]["id"], data["annotations"][3]["image_id"]
    with pytest.raises(
        ValueError,
        match=rf"annotation id {ann} \(image id {img}\).*"
        rf"{os.path.basename(path)}.*2 such.*skip_invalid=True",
    ):
        LVISDetection(path, root)
    with caplog.at_level(logging.WARNING, logger="ltdet.data.class_stats"):
        ds = LVISDetection(path, root, skip_invalid=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 2 of 10" in warnings[0].getMessage()
    assert ds.stats.instance_count.sum() == 8
    assert len(ds.annotations.ann_ids) == 8


def test_unknown_category_and_image(tmp_path, make_lvis):
    path, root, data = make_lvis(tmp_path, write=False)
    bad = json.loads(json.dumps(data))
    bad["annotations"][2]["category_id"] = 999
    with pytest.raises(
        ValueError,
        match=r"annotation id 102 \(image id 2\).*category_id 999.*"
        r"not in 'categories'",
    ):
        LVISDetection(bad, root)
    bad = json.loads(json.dumps(data))
    bad["annotations"][4]["image_id"] = 77
    with pytest.raises(ValueError, match=r"annotation id 104.*image id 77.*not in 'images'"):
        COCODetection(bad, root)
    with pytest.raises(ValueError, match="category_id 999"):
        data["annotations"][0]["category_id"] = 999
        ClassStats.from_json(data)


def test_empty_and_missing_json(tmp_path, make_lvis):
    path, root, data = make_lvis(tmp_path, write=False)
    with pytest.raises(ValueError, match="no images.*empty"):
        LVISDetection({**data, "images": [], "annotations": []}, root)
    with pytest.raises(ValueError, match="no image has an annotation"):
        LVISDetection({**data, "annotations": []}, root, filter_empty=True)
    with pytest.raises(ValueError, match="no categories"):
        COCODetection({**data, "categories": []}, root)
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_dataset(missing, root)
    with pytest.raises(ValueError, match="'annotations'"):
        ClassStats.from_json({"images": data["images"], "categories": data["categories"]})


def test_grayscale_jpeg_becomes_rgb(tmp_path, make_coco):
    import cv2

    path, img_dir, data = make_coco(tmp_path)
    gray = np.full((48, 64), 200, np.uint8)
    assert cv2.imwrite(os.path.join(img_dir, "000000000001.jpg"), gray)
    image, _ = COCODetection(path, img_dir)[0]
    assert image.shape == (3, 48, 64)
    assert torch.allclose(image, torch.full_like(image, 200 / 255), atol=2 / 255)


# -- bad input: nothing silently wrong, every message names the entry -------------------------
def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_truncated_jpeg_is_an_error_naming_file_and_id(tmp_path, make_coco):
    """libjpeg decodes the first half of a truncated JPEG without an error (grey rows below)."""
    import cv2

    path, img_dir, data = make_coco(tmp_path)
    jpg = os.path.join(img_dir, "000000000002.jpg")
    _truncate(jpg)
    assert cv2.imread(jpg) is not None  # what made it silent: OpenCV returns an image
    ds = COCODetection(path, img_dir)
    with pytest.raises(OSError, match=r"000000000002\.jpg.*image id 2.*truncated.*skip_invalid"):
        ds[1]


def test_truncated_png_is_an_error(tmp_path, image_sizes, make_coco):
    import cv2

    path, img_dir, data = make_coco(tmp_path)
    png = os.path.join(img_dir, "000000000002.png")
    assert cv2.imwrite(png, np.zeros((image_sizes[1][1], image_sizes[1][0], 3), np.uint8))
    data["images"][1]["file_name"] = "000000000002.png"
    _rewrite(path, data)
    assert COCODetection(path, img_dir)[1][0].shape[1:] == (image_sizes[1][1], image_sizes[1][0])
    _truncate(png, keep=0.9)
    with pytest.raises(OSError, match=r"000000000002\.png.*image id 2.*PNG.*truncated"):
        COCODetection(path, img_dir)[1]


def test_truncated_image_is_skipped_with_one_warning_under_skip_invalid(
    tmp_path, caplog, make_coco
):
    path, img_dir, data = make_coco(tmp_path)
    _truncate(os.path.join(img_dir, "000000000002.jpg"))
    ds = COCODetection(path, img_dir, skip_invalid=True)
    with caplog.at_level(logging.WARNING, logger="ltdet"):
        first = ds[1]
        second = ds[1]
    assert first[1]["image_id"] == second[1]["image_id"] == 3  # the next image takes its place
    warnings = [r for r in caplog.records if "000000000002.jpg" in r.getMessage()]
    assert len(warnings) == 1 and "skip" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "where,key,value,expect",
    [
        (
            "annotations",
            "category_id",
            2.9,
            r"annotation id 100 \(image id 1\).*category_id 2\.9 "
            r"\(float\).*integer",
        ),
        ("annotations", "category_id", 3.0, r"category_id 3\.0 \(float\)"),
        ("annotations", "image_id", 1.7, r"annotation id 100.*image_id 1\.7"),
        ("annotations", "image_id", "1", r"image_id '1' \(str\)"),
        ("annotations", "id", True, r"id True \(bool\)"),
        ("images", "id", "abc", r"images entry.*id 'abc' \(str\)"),
        ("images", "id", 1.5, r"images entry.*id 1\.5"),
        ("categories", "id", 3.5, r"categories entry.*id 3\.5"),
        ("annotations", "category_id", None, r"annotation id 100.*category_id None"),
        ("annotations", "bbox", None, r"annotation id 100.*bbox None.*\[x, y, width, height\]"),
        ("annotations", "bbox", ["a", 1, 2, 3], r"annotation id 100.*bbox \['a', 1, 2, 3\]"),
        ("images", "width", "64", r"images entry.*width '64'"),
    ],
)
def test_bad_json_fields_name_the_entry(tmp_path, where, key, value, expect, make_coco):
    path, img_dir, data = make_coco(tmp_path)
    data[where][0][key] = value
    _rewrite(path, data)
    with pytest.raises(ValueError, match=expect) as e:
        COCODetection(path, img_dir)
    assert "coco_train.json" in str(e.value)


def test_missing_field_and_wrong_container_name_the_file(tmp_path, make_coco):
    path, img_dir, data = make_coco(tmp_path)
    del data["annotations"][2]["category_id"]
    _rewrite(path, data)
    with pytest.raises(
        ValueError, match=r"coco_train.json.*lacks 'category_id'.*annotation id 102"
    ):
        COCODetection(path, img_dir)
    path, img_dir, data = make_coco(tmp_path / "b")
    data["images"] = {str(im["id"]): im for im in data["images"]}
    _rewrite(path, data)
    with pytest.raises(ValueError, match=r"coco_train.json.*'images' is a dict, expected a list"):
        COCODetection(path, img_dir)


def test_box_outside_its_image_is_caught_at_load_time(tmp_path, caplog, make_coco):
    """A box entirely outside its image is clipped to zero size; torchvision would then fail
    naming no annotation. The reader names it, and skip_invalid drops it."""
    path, img_dir, data = make_coco(tmp_path)
    data["annotations"][1]["bbox"] = [200.0, 200.0, 10.0, 10.0]  # image 1 is 64x48
    _rewrite(path, data)
    with pytest.raises(
        ValueError,
        match=r"annotation id 101 \(image id 1\).*64x48 px image.*"
        r"no part inside its image.*skip_invalid",
    ):
        COCODetection(path, img_dir)
    with caplog.at_level(logging.WARNING, logger="ltdet"):
        ds = COCODetection(path, img_dir, skip_invalid=True)
    assert 101 not in ds.annotations.ann_ids.tolist() and 100 in ds.annotations.ann_ids.tolist()
    assert any("no part inside" in r.getMessage() for r in caplog.records)
    boxes = ds[0][1]["boxes"]
    assert len(boxes) == 1 and bool(((boxes[:, 2:] - boxes[:, :2]) > 0).all())


def test_jpeg_with_data_after_its_end_marker_is_not_called_truncated(
    tmp_path, image_sizes, make_coco
):
    """Maker trailers / motion photos append data after EOI: the file is valid."""
    path, img_dir, data = make_coco(tmp_path)
    jpg = os.path.join(img_dir, "000000000002.jpg")
    with open(jpg, "ab") as f:
        f.write(b"\x00MotionPhoto_Data" + b"\x17" * 4096)
    image, target = COCODetection(path, img_dir)[1]
    assert target["image_id"] == 2 and image.shape[1:] == (image_sizes[1][1], image_sizes[1][0])
