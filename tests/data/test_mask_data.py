"""Instance masks in the data pipeline: read from LVIS / COCO json as `lvis` decodes them, moved by
every transform exactly with the image and its boxes, refused with a useful error when bad."""

import json
import logging

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.nn.functional as F
from lvis import LVIS

from ltdet.data import RandomHorizontalFlip, ResizeShortestEdge, build_dataset
from ltdet.data.masks import MaskError, decode_masks, segmentation_problem
from ltdet.data.transforms import ToTensor, resize_masks
from ltdet.imbalance.mixup import mixup_detection


def _segmentations(data, kinds=("polygon", "rle", "compressed")):
    """Give every annotation a mask inside its box, cycling through the formats."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for k, ann in enumerate(data["annotations"]):
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        x1, y1 = min(x + bw, w - 1), min(y + bh, h - 1)
        kind = kinds[k % len(kinds)]
        poly = [x, y, x1, y, (x + x1) / 2, y1]  # a triangle in the box
        if kind == "polygon":
            ann["segmentation"] = [poly, [x, y1 - 2, x + 3, y1 - 2, x + 3, y1]]
        else:
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            if kind == "compressed":
                ann["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode()}
            else:  # uncompressed: the run lengths of the decoded mask, column-major
                flat = mask_utils.decode(rle).flatten(order="F")
                change = np.flatnonzero(np.diff(flat)) + 1
                edges = np.concatenate([[0], change, [flat.size]])
                runs = np.diff(edges).tolist()
                if flat[0] == 1:
                    runs = [0] + runs
                ann["segmentation"] = {"size": [h, w], "counts": runs}
    return data


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return path


@pytest.fixture
def lvis_masks(tmp_path, make_lvis):
    path, root, data = make_lvis(tmp_path / "lvis")
    return _write(path, _segmentations(data)), root, data


def test_masks_decode_exactly_as_lvis_ann_to_mask(lvis_masks):
    path, root, data = lvis_masks
    ds = build_dataset(path, root, masks=True)
    ref = LVIS(path)
    seen = set()
    for i in range(len(ds)):
        masks = ds.load_masks(i)
        a, b = ds.annotations.ann_offsets[i], ds.annotations.ann_offsets[i + 1]
        ann_ids = ds.annotations.ann_ids[a:b].tolist()
        assert masks.dtype == torch.uint8 and masks.shape[0] == len(ann_ids)
        for m, ann_id in zip(masks, ann_ids):
            ann = ref.anns[ann_id]
            seen.add(
                type(ann["segmentation"]).__name__
                + str(
                    type(ann["segmentation"].get("counts")).__name__
                    if isinstance(ann["segmentation"], dict)
                    else ""
                )
            )
            assert np.array_equal(m.numpy(), ref.ann_to_mask(ann))
    assert len(seen) == 3  # polygons, uncompressed and compressed RLE all met
    image, target = ds[0]
    assert target["masks"].shape == (2, *image.shape[1:])


def test_coco_masks_match_pycocotools_ann_to_mask(tmp_path, make_coco):
    from pycocotools.coco import COCO

    path, root, data = make_coco(tmp_path / "coco")
    path = _write(path, _segmentations(data))
    ds = build_dataset(path, root, format="coco", masks=True)
    ref = COCO(path)
    for i in range(len(ds)):
        a, b = ds.annotations.ann_offsets[i], ds.annotations.ann_offsets[i + 1]
        for m, ann_id in zip(ds.load_masks(i), ds.annotations.ann_ids[a:b].tolist()):
            assert np.array_equal(m.numpy(), ref.annToMask(ref.anns[ann_id]))


def test_no_masks_without_the_flag(lvis_masks):
    path, root, _ = lvis_masks
    _, target = build_dataset(path, root)[0]
    assert "masks" not in target


# -- transforms -------------------------------------------------------------------------------
def _decoded_sample(lvis_masks, i=0):
    path, root, _ = lvis_masks
    ds = build_dataset(path, root, masks=True)
    image = ds.load_image(i)
    a, b = ds.annotations.ann_offsets[i], ds.annotations.ann_offsets[i + 1]
    ref = LVIS(path)
    masks = torch.from_numpy(
        np.stack([ref.ann_to_mask(ref.anns[k]) for k in ds.annotations.ann_ids[a:b].tolist()])
    )
    xywh = torch.tensor([ref.anns[k]["bbox"] for k in ds.annotations.ann_ids[a:b].tolist()])
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).float()
    return image, {
        "boxes": boxes,
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "masks": masks,
        "scale": 1.0,
        "flipped": False,
    }


def test_resize_moves_masks_by_nearest_neighbour(lvis_masks):
    image, target = _decoded_sample(lvis_masks)
    for size in (37, 96, 130):
        out_image, out = ResizeShortestEdge(size, 1000)(image, target)
        h, w = out_image.shape[:2]
        assert out["masks"].shape == (len(target["masks"]), h, w)
        ref = F.interpolate(target["masks"][:, None].float(), size=(h, w), mode="nearest")
        assert torch.equal(out["masks"], ref[:, 0].to(torch.uint8))
        assert out["masks"].dtype == torch.uint8


def test_resize_round_trip_by_an_integer_factor_is_exact(lvis_masks):
    image, target = _decoded_sample(lvis_masks)
    h, w = image.shape[:2]
    up_image, up = ResizeShortestEdge(2 * min(h, w), 10_000)(image, target)
    assert up_image.shape[:2] == (2 * h, 2 * w)
    _, back = ResizeShortestEdge(min(h, w), 10_000)(up_image, up)
    assert torch.equal(back["masks"], target["masks"])
    assert torch.allclose(back["boxes"], target["boxes"])


def test_multi_scale_resize_keeps_masks_with_the_image(lvis_masks):
    image, target = _decoded_sample(lvis_masks)
    t = ResizeShortestEdge((20, 40, 60), 1000)
    for seed in range(6):
        torch.manual_seed(seed)
        out_image, out = t(image, target)
        assert out["masks"].shape[1:] == out_image.shape[:2]
        ref = resize_masks(target["masks"], *out_image.shape[:2])
        assert torch.equal(out["masks"], ref)


def _mask_boxes(masks):
    """Tight xyxy boxes (pixel edges) of non-empty masks."""
    out = []
    for m in masks:
        ys, xs = torch.where(m > 0)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32)


def test_flip_mirrors_masks_with_the_boxes_and_twice_is_the_identity(lvis_masks):
    image, target = _decoded_sample(lvis_masks)
    # the sample's boxes as the masks' tight boxes, so the flip must move both alike
    target = {**target, "boxes": _mask_boxes(target["masks"])}
    flip = RandomHorizontalFlip(1.0)
    out_image, out = flip(image, target)
    assert torch.equal(
        out["masks"], torch.from_numpy(np.ascontiguousarray(target["masks"].numpy()[:, :, ::-1]))
    )
    assert torch.equal(_mask_boxes(out["masks"]), out["boxes"])
    back_image, back = flip(out_image, out)
    assert torch.equal(back["masks"], target["masks"]) and np.array_equal(back_image, image)
    assert torch.equal(back["boxes"], target["boxes"])


def test_dataset_transforms_and_to_tensor_keep_masks_aligned(lvis_masks):
    path, root, _ = lvis_masks
    from ltdet.data.transforms import Compose

    ds = build_dataset(
        path,
        root,
        masks=True,
        transforms=Compose([ResizeShortestEdge(96, 200), RandomHorizontalFlip(1.0), ToTensor()]),
    )
    image, target = ds[0]
    assert target["masks"].shape[1:] == image.shape[1:]
    assert target["flipped"]


def test_mixup_pads_and_concatenates_masks():
    a = torch.rand(3, 10, 12)
    b = torch.rand(3, 14, 8)
    ma = (torch.rand(2, 10, 12) > 0.5).to(torch.uint8)
    mb = (torch.rand(1, 14, 8) > 0.5).to(torch.uint8)
    ta = {
        "boxes": torch.tensor([[0.0, 0, 5, 5], [1, 1, 6, 6]]),
        "labels": torch.tensor([1, 2]),
        "masks": ma,
    }
    tb = {"boxes": torch.tensor([[0.0, 0, 4, 4]]), "labels": torch.tensor([3]), "masks": mb}
    images, targets = mixup_detection(
        [a, b], [ta, tb], prob=1.0, generator=torch.Generator().manual_seed(0)
    )
    for image, t, own, other in zip(images, targets, (ma, mb), (mb, ma)):
        h, w = image.shape[-2:]
        assert (h, w) == (14, 12)
        assert t["masks"].shape == (3, h, w) and t["masks"].dtype == torch.uint8
        assert len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
        n = own.shape[0]
        assert torch.equal(t["masks"][:n, : own.shape[1], : own.shape[2]], own)
        assert torch.equal(t["masks"][n:, : other.shape[1], : other.shape[2]], other)
        assert t["masks"][:n, own.shape[1] :].sum() == 0
        assert t["masks"][:n, :, own.shape[2] :].sum() == 0


def test_mixup_refuses_a_batch_with_masks_on_some_images_only():
    t = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    with pytest.raises(ValueError, match="no 'masks'"):
        mixup_detection([torch.rand(3, 4, 4)] * 2, [{**t, "masks": torch.zeros(0, 4, 4)}, t])


def test_empty_image_has_zero_masks():
    masks = decode_masks([], 5, 7)
    assert masks.shape == (0, 5, 7)
    _, out = ResizeShortestEdge(14, 100)(
        np.zeros((5, 7, 3), np.uint8), {"boxes": torch.zeros(0, 4), "masks": masks}
    )
    assert out["masks"].shape == (0, 14, 20)
    _, out = RandomHorizontalFlip(1.0)(
        np.zeros((5, 7, 3), np.uint8), {"boxes": torch.zeros(0, 4), "masks": masks}
    )
    assert out["masks"].shape == (0, 5, 7)


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seg, why",
    [
        ([[1.0, 2.0, 3.0, 4.0, 5.0]], "coordinates"),
        ([[1.0, 2.0, 3.0, 4.0]], "coordinates"),
        ([], "empty polygon"),
        ([[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]], "non-finite"),
        ([[1.0, 2.0, "x", 4.0, 5.0, 6.0]], "non-numeric"),
        ({"size": [10, 12], "counts": [120]}, "differs from its image"),
        ({"size": [4, 5], "counts": [3, 4]}, "add up to 7"),
        ({"size": [4, 5], "counts": [3, -1, 18]}, "non-negative"),
        ({"size": [4, 5], "counts": "\x01\x02"}, "not a pycocotools RLE string"),
        ({"size": [4, 5], "counts": "3"}, "add up to 3"),
        ({"size": [4, 5], "counts": 7}, "not a string"),
        ({"counts": "3"}, "neither a polygon"),
        (None, "no 'segmentation'"),
    ],
)
def test_segmentation_problems_are_named(seg, why):
    assert why in segmentation_problem(seg, 4, 5)


def test_valid_compressed_rle_passes():
    m = np.zeros((4, 5), np.uint8, order="F")
    m[1:3, 2:4] = 1
    rle = mask_utils.encode(m)
    assert segmentation_problem({"size": [4, 5], "counts": rle["counts"].decode()}, 4, 5) is None
    assert segmentation_problem({"size": [4, 5], "counts": rle["counts"]}, 4, 5) is None
    assert np.array_equal(
        decode_masks([{"size": [4, 5], "counts": rle["counts"].decode()}], 4, 5)[0].numpy(), m
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"segmentation": [[1.0, 2.0, 3.0]]},
        {"segmentation": {"size": [999, 999], "counts": [999 * 999]}},
        {"segmentation": None},
    ],
)
def test_bad_mask_error_names_file_annotation_and_fix(lvis_masks, bad):
    path, root, data = lvis_masks
    ann = data["annotations"][1]
    if bad["segmentation"] is None:
        del ann["segmentation"]
    else:
        ann.update(bad)
    _write(path, data)
    with pytest.raises(MaskError) as e:
        build_dataset(path, root, masks=True)
    msg = str(e.value)
    assert path in msg and f"annotation id {ann['id']}" in msg and "skip_invalid" in msg
    build_dataset(path, root)  # a box model does not read masks


def test_skip_invalid_leaves_out_images_with_boxes_but_no_masks(lvis_masks, caplog):
    path, root, data = lvis_masks
    bad_image = data["annotations"][0]["image_id"]
    del data["annotations"][0]["segmentation"]
    _write(path, data)
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(path, root, masks=True, skip_invalid=True)
    full = build_dataset(path, root)
    assert bad_image not in ds.image_ids and len(ds) == len(full) - 1
    assert "left out 1 of" in caplog.text and "data.skip_invalid" in caplog.text
    # the class statistics are those of the images trained on
    assert ds.stats.instance_count.sum() == full.stats.instance_count.sum() - 2
