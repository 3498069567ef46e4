"""Fixtures of the evaluation tests alone: seeded LVIS-like / COCO-like ground truth and
detections with the evaluator's edge cases, exposed as factory fixtures (`make_set`,
`make_segm_set`, `degenerate_set`) and the image size `segm_hw`.

Edge cases built in: images without annotations, an image without detections, classes that only
occur in neg lists, not-exhaustive classes, classes without any gt, score ties (2-decimal
scores), more than 300 detections on one image, boxes whose area sits exactly on the 32^2 / 96^2
boundaries, duplicate gt boxes (IoU ties), gt ``ignore`` flags (LVIS) / ``iscrowd`` regions (COCO).
"""

import numpy as np
import pycocotools.mask as mask_utils
import pytest


def _box(rng, size_scale=1.0):
    w, h = rng.uniform(2, 120 * size_scale, 2)
    x, y = rng.uniform(0, 200, 2)
    return [round(float(x), 2), round(float(y), 2), round(float(w), 2), round(float(h), 2)]


def _jitter(rng, b, s):
    x, y, w, h = b
    return [
        round(x + float(rng.normal(0, s * w)), 2),
        round(y + float(rng.normal(0, s * h)), 2),
        round(max(w * float(rng.uniform(0.7, 1.3)), 0.5), 2),
        round(max(h * float(rng.uniform(0.7, 1.3)), 0.5), 2),
    ]


def _make_set(seed=0, n_images=40, n_cats=24, lvis=True, big_image_dets=350):
    rng = np.random.default_rng(seed)
    freqs = ["r", "c", "f"]
    cats = [
        {
            "id": 3 * k + 1,
            "name": f"cls{k}",
            "frequency": freqs[k % 3],
            "image_count": int(rng.integers(1, 300)),
            "instance_count": int(rng.integers(1, 900)),
        }
        for k in range(n_cats)
    ]
    cat_ids = [c["id"] for c in cats]
    no_gt_cats = set(cat_ids[-3:])  # never annotated; the last one only appears in neg lists
    images, anns, dets = [], [], []
    aid = 1
    for i in range(n_images):
        img_id = 1000 + 7 * i
        pos = (
            []
            if i % 9 == 4
            else list(
                rng.choice(
                    [c for c in cat_ids if c not in no_gt_cats],
                    size=int(rng.integers(1, 5)),
                    replace=False,
                )
            )
        )
        img_anns = []
        for c in pos:
            for _ in range(int(rng.integers(1, 6))):
                b = _box(rng, size_scale=float(rng.choice([0.3, 1.0, 2.5])))
                img_anns.append([b, c])
            if rng.random() < 0.3:  # exact duplicate gt -> IoU ties
                img_anns.append([list(img_anns[-1][0]), c])
        if i % 5 == 0:  # areas exactly on the small/medium and medium/large boundaries
            c = pos[0] if pos else cat_ids[0]
            img_anns.append([[10.0, 10.0, 32.0, 32.0], c])
            img_anns.append([[50.0, 40.0, 96.0, 96.0], c])
            if not pos:
                pos = [c]
        for b, c in img_anns:
            a = {
                "id": aid,
                "image_id": img_id,
                "category_id": int(c),
                "bbox": b,
                "area": round(b[2] * b[3], 4) if rng.random() < 0.8 else float(b[2] * b[3] * 0.9),
            }
            if lvis and rng.random() < 0.05:
                a["ignore"] = 1
            if not lvis:
                a["iscrowd"] = int(rng.random() < 0.07)
            anns.append(a)
            aid += 1
        rest = [c for c in cat_ids if c not in pos]
        neg = [int(c) for c in rng.choice(rest, size=min(len(rest), 4), replace=False)]
        neg.append(cat_ids[-1])
        nel = [int(c) for c in pos if rng.random() < 0.25]
        img = {"id": img_id, "width": 320, "height": 320}
        if lvis:
            img["neg_category_ids"] = sorted(set(neg))
            img["not_exhaustive_category_ids"] = nel
        images.append(img)

        if i == 3:
            continue  # image without detections
        n_rand = big_image_dets if i == 1 else int(rng.integers(0, 30))
        for b, c in img_anns:
            for _ in range(int(rng.integers(0, 3))):
                dets.append(
                    {
                        "image_id": img_id,
                        "category_id": int(c),
                        "bbox": _jitter(rng, b, 0.08),
                        "score": round(float(rng.random()), 2),
                    }
                )
            if rng.random() < 0.3:  # the exact gt box, or a box on the area boundary
                dets.append(
                    {
                        "image_id": img_id,
                        "category_id": int(c),
                        "bbox": list(b),
                        "score": round(float(rng.random()), 2),
                    }
                )
        if i % 5 == 0:
            c = pos[0]
            for box in ([12.0, 11.0, 32.0, 32.0], [60.0, 30.0, 96.0, 96.0]):
                dets.append({"image_id": img_id, "category_id": int(c), "bbox": box, "score": 0.5})
        for _ in range(n_rand):
            c = int(rng.choice(cat_ids))
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": c,
                    "bbox": _box(rng),
                    "score": round(float(rng.random()), 2),
                }
            )
    gt = {"images": images, "annotations": anns, "categories": cats}
    if not lvis:
        for c in cats:
            for k in ("frequency", "image_count", "instance_count"):
                c.pop(k)
    return gt, dets


DEGENERATE_CASES = (
    "zero_width_det",
    "zero_height_det",
    "gt_area_0",
    "all_gt_area_0",
    "zero_size_gt_bbox",
    "gt_ann_id_0",
)


def _degenerate_set(case, seed=0, lvis=True):
    """`make_set` with one kind of degenerate box / id, placed where it changes the result:

    - ``zero_width_det`` / ``zero_height_det``: the 3 highest-scoring detections that overlap a gt
      of their class (a TP candidate, kept by the federated filter) and, on the image with more
      than 300 detections, its 5 highest-scoring ones (they still count towards the cap) get a
      zero width / height;
    - ``gt_area_0``: the json ``area`` of a few gts (bbox unchanged) is 0, among them the only gt
      of its (image, class), which has detections;
    - ``all_gt_area_0``: every gt's ``area`` is 0;
    - ``zero_size_gt_bbox``: gts with a zero-width bbox and ``area`` 0 (as a json writer computing
      w * h produces), and gts with a zero-height bbox keeping their positive ``area``;
    - ``gt_ann_id_0``: annotation ids start at 0; the id-0 gt (neither ignored nor crowd) has an
      exact, high-scoring detection.
    """
    gt, dets = _make_set(seed, n_images=20, lvis=lvis)
    anns = gt["annotations"]
    by_pair = {}
    for a in anns:
        by_pair.setdefault((a["image_id"], a["category_id"]), []).append(a)

    def overlaps_gt(d):
        for a in by_pair.get((d["image_id"], d["category_id"]), []):
            x, y, w, h = a["bbox"]
            dx, dy, dw, dh = d["bbox"]
            if min(x + w, dx + dw) - max(x, dx) > 0 and min(y + h, dy + dh) - max(y, dy) > 0:
                return True
        return False

    if case in ("zero_width_det", "zero_height_det"):
        k = 2 if case == "zero_width_det" else 3
        per_img = {}
        for d in dets:
            per_img.setdefault(d["image_id"], []).append(d)
        big = max(per_img.values(), key=len)
        chosen = sorted((d for d in dets if overlaps_gt(d)), key=lambda d: -d["score"])[:3]
        chosen += sorted(big, key=lambda d: -d["score"])[:5]
        for d in chosen:
            d["bbox"][k] = 0.0
    elif case == "gt_area_0":
        alone = next(
            a
            for a in anns
            if len(by_pair[a["image_id"], a["category_id"]]) == 1
            and any(
                (d["image_id"], d["category_id"]) == (a["image_id"], a["category_id"]) for d in dets
            )
        )
        for a in [alone] + anns[2::17]:
            a["area"] = 0
    elif case == "all_gt_area_0":
        for a in anns:
            a["area"] = 0
    elif case == "zero_size_gt_bbox":
        for a in anns[1::9]:
            a["bbox"][2] = 0.0
            a["area"] = 0.0
        for a in anns[5::9]:
            a["bbox"][3] = 0.0
    elif case == "gt_ann_id_0":
        for a in anns:
            a["id"] -= 1
        a0 = anns[0]
        a0.pop("ignore", None)
        if not lvis:
            a0["iscrowd"] = 0  # a regular gt: an ignored / crowd one would hide the quirk
        dets.append(
            {
                "image_id": a0["image_id"],
                "category_id": a0["category_id"],
                "bbox": list(a0["bbox"]),
                "score": 0.95,
            }
        )
    else:
        raise ValueError(case)
    return gt, dets


SEGM_HW = (560, 520)  # height != width: a transposed mask is caught


def _octagon(b, rng, cut=0.3):
    """An octagon inside box ``b`` (corners cut by a random fraction): IoUs that boxes lack."""
    x, y, w, h = b
    cx, cy = w * float(rng.uniform(0.05, cut)), h * float(rng.uniform(0.05, cut))
    return [
        x + cx,
        y,
        x + w - cx,
        y,
        x + w,
        y + cy,
        x + w,
        y + h - cy,
        x + w - cx,
        y + h,
        x + cx,
        y + h,
        x,
        y + h - cy,
        x,
        y + cy,
    ]


def _rect(b):
    x, y, w, h = b
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _make_segm_set(seed=0, n_images=40, n_cats=24, lvis=True, big_image_dets=350):
    """`make_set` with masks. Ground truth: polygons (octagons; one in ten split in two
    parts, merged as lvis does), compressed and uncompressed RLE, exact rectangles for the
    32^2 / 96^2 boxes (mask area on the boundary); the json ``area`` is the mask area for most
    gts. COCO ``iscrowd`` gts are uncompressed RLE. Detections: compressed RLE (str counts, some
    with a backslash) of an octagon in their box, the exact gt mask for exact gt boxes, exact
    rectangles for the boundary boxes (mask area 32^2 / 96^2), and some empty masks."""
    gt, dets = _make_set(
        seed, n_images=n_images, n_cats=n_cats, lvis=lvis, big_image_dets=big_image_dets
    )
    rng = np.random.default_rng(seed + 1000)
    H, W = SEGM_HW
    for im in gt["images"]:
        im["height"], im["width"] = H, W
    gt_rle = {}
    for n, a in enumerate(gt["annotations"]):
        b = a["bbox"]
        exact = b[2] * b[3] in (32.0**2, 96.0**2) and float(b[2]).is_integer()
        poly = _rect(b) if exact else _octagon(b, rng)
        kind = n % 10
        if kind == 9 and not exact:  # two parts: left and right half with a gap
            x, y, w, h = b
            segm = [_rect([x, y, w * 0.4, h]), _octagon([x + w * 0.55, y, w * 0.45, h], rng)]
        else:
            segm = [poly]
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, H, W))
        if a.get("iscrowd") or kind == 8:
            m = mask_utils.decode(rle)
            flat = m.flatten(order="F")
            change = np.flatnonzero(np.diff(flat)) + 1
            runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
            if flat[0]:
                runs = [0] + runs
            a["segmentation"] = {"size": [H, W], "counts": runs}
        elif kind == 7:
            a["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode()}
        else:
            a["segmentation"] = segm
        mask_area = float(mask_utils.area(rle))
        if exact or rng.random() < 0.8:
            a["area"] = mask_area
        gt_rle[a["image_id"], tuple(b)] = rle
    for n, d in enumerate(dets):
        b = d["bbox"]
        key = (d["image_id"], tuple(b))
        if key in gt_rle:  # an exact gt box: the exact gt mask
            rle = gt_rle[key]
        elif n % 23 == 5:  # an empty mask
            rle = mask_utils.encode(np.zeros((H, W, 1), np.uint8, order="F"))[0]
        else:
            exact = b[2] * b[3] in (32.0**2, 96.0**2) and float(b[2]).is_integer()
            poly = _rect(b) if exact else _octagon(b, rng)
            rle = mask_utils.frPyObjects([poly], H, W)[0]
        d["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode()}
        if n % 2:
            d.pop("bbox")  # segm results may carry a box or not; segm never reads it
    return gt, dets


def pytest_generate_tests(metafunc):
    # a test taking `degenerate_case` runs once per case `degenerate_set` knows
    if "degenerate_case" in metafunc.fixturenames:
        metafunc.parametrize("degenerate_case", DEGENERATE_CASES)


@pytest.fixture
def make_set():
    """`make_set(seed=0, n_images=40, n_cats=24, lvis=True, big_image_dets=350) -> (gt, dets)`:
    box ground truth (LVIS or COCO form) and box detections."""
    return _make_set


@pytest.fixture
def make_segm_set():
    """`make_segm_set(seed=0, n_images=40, n_cats=24, lvis=True, big_image_dets=350)
    -> (gt, dets)`: `make_set` with masks, on `segm_hw`-sized images."""
    return _make_segm_set


@pytest.fixture
def degenerate_set():
    """`degenerate_set(case, seed=0, lvis=True) -> (gt, dets)`: `make_set` with one of
    DEGENERATE_CASES (a test taking `degenerate_case` runs once per case)."""
    return _degenerate_set


@pytest.fixture
def segm_hw():
    """(height, width) of every `make_segm_set` image."""
    return SEGM_HW
