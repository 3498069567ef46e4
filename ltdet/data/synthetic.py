"""A small long-tailed detection data set in LVIS v1 format, generated from a seed.

Why it exists: a new user (and the test suite) must be able to run the whole pipeline - train,
evaluate, split AP by frequency group - on a laptop CPU in minutes, without downloading LVIS.

What it is. Each class is a (shape, colour, texture) triple, e.g. ``red_striped_star``: shapes
that a small detector can tell apart (circle, square, triangle, star, cross, ring, ...), eight
saturated colours, four textures (solid, stripes, dots, checker). Objects of several classes
are drawn on cluttered backgrounds (colour gradients, random lines, muted irregular blobs that
belong to no class, pixel noise), at varied scales and rotations, partially occluding each other.

The long tail. Class ``k`` (rank 1 = most frequent) appears on
``image_count_k = max(1, round(max_images_per_class * k ** -zipf_exponent))`` training images
(Zipf's law in the rank), so with the defaults the LVIS frequency groups all exist
(r: 1-10 training images, c: 11-100, f: > 100; Gupta et al., CVPR 2019, sec. 3). The
validation split is balanced instead: every class has ``val_instances_per_class`` instances,
so AP on a rare class is measured on as many boxes as on a frequent one.

LVIS annotation fields. ``categories`` carry ``frequency``, ``image_count`` and
``instance_count`` counted on the *training* split (identical in both jsons, as in LVIS v1).
Every image lists ``neg_category_ids`` (a random subset of the classes absent from it: verified
absent) and ``not_exhaustive_category_ids``: with probability ``not_exhaustive_prob`` an
(image, class) pair gets one more instance drawn but not annotated, and the class is listed
there - exactly LVIS's meaning of the flag. Boxes are ``xywh`` tight boxes of the whole (amodal)
shape; ``segmentation`` the outer contour of the shape's pixels; ``area`` their count.

Layout under ``root``::

    train.json, val.json, images/train/000001.jpg, images/val/001201.jpg, .synthetic_complete.json

Generation is deterministic: the class table and the per-split layout come from one seeded
generator, each image is drawn from its own generator seeded by ``(seed, image id)``; JPEGs are
written by OpenCV. ``make_synthetic_lvis`` is idempotent: a marker written last records the
parameters, and a second call with the same parameters returns at once.
"""
import hashlib
import json
import logging
from pathlib import Path

from ltdet.fileio import atomic_write

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["make_synthetic_lvis", "zipf_image_counts", "SHAPES", "COLORS", "TEXTURES"]

MARKER_NAME = ".synthetic_complete.json"
# Bump when the drawing or the layout changes, so old markers stop matching.
FORMAT_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon",
          "crescent", "arrow", "heart", "half_disc")
# Saturated, well separated hues (RGB); backgrounds and distractors are kept muted so that
# colour is a usable cue but not the only one (several classes share a colour).
COLORS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 225, 30),
    "green": (40, 190, 50), "cyan": (30, 210, 220), "blue": (40, 60, 230),
    "purple": (140, 40, 200), "white": (245, 245, 245),
}
TEXTURES = ("solid", "striped", "dotted", "checkered")


def zipf_image_counts(num_classes, max_images_per_class, zipf_exponent):
    """Training images per class rank: ``max(1, round(n_max * k ** -s))`` for ``k = 1..C``.

    Returns an int64 array ``[C]``, non-increasing, index ``k - 1`` = rank ``k``.
    """
    ranks = np.arange(1, num_classes + 1, dtype=np.float64)
    counts = np.rint(max_images_per_class * ranks ** (-float(zipf_exponent))).astype(np.int64)
    return np.maximum(counts, 1)


def _shape_polygons(shape):
    """Unit-radius outline of a shape: list of (polygon [P, 2] float, fill) with fill 1 or 0
    (0 = hole cut after the filled parts). Coordinates in [-1, 1], y down."""
    def regular(n, phase=0.0, radius=1.0):
        t = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([radius * np.cos(t), radius * np.sin(t)], 1)

    if shape == "circle":
        return [(regular(48), 1)]
    if shape == "square":
        return [(regular(4, np.pi / 4) * np.sqrt(2) * 0.8, 1)]
    if shape == "triangle":
        return [(regular(3, -np.pi / 2), 1)]
    if shape == "star":
        outer, inner = regular(5, -np.pi / 2), regular(5, -np.pi / 2 + np.pi / 5, 0.42)
        return [(np.stack([outer, inner], 1).reshape(-1, 2), 1)]
    if shape == "cross":
        a = 0.32
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
               (-1, a), (-1, -a), (-a, -a)]
        return [(np.array(pts, dtype=np.float64), 1)]
    if shape == "ring":
        return [(regular(48), 1), (regular(48, radius=0.55), 0)]
    if shape == "diamond":
        return [(np.array([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)], dtype=np.float64), 1)]
    if shape == "hexagon":
        return [(regular(6), 1)]
    if shape == "crescent":
        cut = regular(48, radius=0.85) + np.array([0.45, -0.1])
        return [(regular(48), 1), (cut, 0)]
    if shape == "arrow":
        pts = [(-1, -0.3), (0.1, -0.3), (0.1, -0.75), (1, 0), (0.1, 0.75), (0.1, 0.3), (-1, 0.3)]
        return [(np.array(pts, dtype=np.float64), 1)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 17.0
        return [(pts, 1)]
    if shape == "half_disc":
        t = np.linspace(0, np.pi, 25)
        return [(np.stack([np.cos(t), np.sin(t) - 0.4], 1), 1)]
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


_UNIT_SHAPES = {s: _shape_polygons(s) for s in SHAPES}
# fillPoly with `shift` draws at sub-pixel precision: coordinates are fixed point with 4 bits.
_SHIFT = 4


def _texture(texture, h, w, rng):
    """Mask [h, w] bool of where the texture's second (dark) colour goes."""
    if texture == "solid":
        return np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(rng.uniform(5.0, 8.0))
    if texture == "striped":
        angle = rng.uniform(0, np.pi)
        u = xx * np.cos(angle) + yy * np.sin(angle)
        return np.mod(u / period, 1.0) < 0.45
    if texture == "dotted":
        dx = np.mod(xx, period) - period / 2
        dy = np.mod(yy, period) - period / 2
        return dx * dx + dy * dy < (0.28 * period) ** 2
    if texture == "checkered":
        return (np.floor(xx / period) + np.floor(yy / period)).astype(np.int64) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}; known textures: {', '.join(TEXTURES)}")


def _render_mask(polys, center, radius, angle, stretch, size_hw):
    """Rasterise a unit shape placed at ``center`` (x, y, OpenCV pixel-centre coordinates).

    Returns (alpha uint8 [h, w] anti-aliased 0..255 for blending, inside bool [h, w]: the
    shape's pixels). Box, area and polygon come from ``inside``: OpenCV's anti-aliased edge
    spills about half a pixel outwards.
    """
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * np.array([stretch, 1.0 / stretch])[None, :]
    alpha = np.zeros(size_hw, dtype=np.uint8)
    inside = np.zeros(size_hw, dtype=np.uint8)
    for unit, fill in polys:
        pts = unit @ rot.T * radius + np.asarray(center)
        fixed = [np.rint(pts * (1 << _SHIFT)).astype(np.int32)]
        cv2.fillPoly(alpha, fixed, 255 * fill, lineType=cv2.LINE_AA, shift=_SHIFT)
        cv2.fillPoly(inside, fixed, fill, lineType=cv2.LINE_8, shift=_SHIFT)
    return alpha, inside.astype(bool)


def _polygons(inside, x_off, y_off):
    """LVIS segmentation of a binary shape mask: its outer contours, through the centres of the
    boundary pixels, in image coordinates where pixel i spans [i, i + 1) (centre i + 0.5).

    Contours of fewer than 3 points (a one-pixel sliver) are no polygon and are dropped; a mask
    made only of such slivers gets its box as polygon."""
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    polys = [(c.reshape(-1, 2) + (x_off + 0.5, y_off + 0.5)).reshape(-1).tolist()
             for c in contours if len(c) >= 3]
    if not polys:
        ys, xs = np.nonzero(inside)
        x0, y0 = x_off + xs.min() + 0.5, y_off + ys.min() + 0.5
        x1, y1 = x_off + xs.max() + 0.5, y_off + ys.max() + 0.5
        polys = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    return [[float(v) for v in p] for p in polys]


def _extent(polys, radius, angle, stretch):
    """Half extents (x, y) of the rotated, scaled outer polygon around its centre."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * np.array([stretch, 1.0 / stretch])[None, :]
    pts = polys[0][0] @ rot.T * radius
    return np.abs(pts).max(0)


def _muted(rng, lo=60, hi=190):
    grey = rng.uniform(lo, hi)
    return np.clip(grey + rng.uniform(-30, 30, size=3), 0, 255)


def _background(rng, size):
    """Gradient + lines + noise, all muted: clutter without class-like colours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    img = (1 - t) * _muted(rng) + t * _muted(rng)
    img = img.astype(np.uint8)
    for _ in range(int(rng.integers(2, 9))):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        color = tuple(float(v) for v in _muted(rng, 30, 220))
        cv2.line(img, p1, p2, color, int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    return img


def _distractor(img, rng, size, max_scale=0.2):
    """An irregular muted blob (belongs to no class), drawn in place on uint8 ``img``."""
    n = int(rng.integers(7, 13))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.5, 1.0, n) * rng.uniform(0.06, max_scale) * size
    center = rng.uniform(0.1, 0.9, 2) * size
    pts = np.stack([np.cos(t) * r, np.sin(t) * r], 1) + center
    fixed = np.rint(pts * (1 << _SHIFT)).astype(np.int32)
    color = tuple(float(v) for v in _muted(rng, 40, 210))
    cv2.fillPoly(img, [fixed], color, lineType=cv2.LINE_AA, shift=_SHIFT)


def _ioa_ok(box, placed, max_ioa):
    """True if ``box`` (x0, y0, x1, y1) covers at most ``max_ioa`` of the smaller box of every
    already placed box: occlusion stays partial."""
    if not placed:
        return True
    others = np.asarray(placed, dtype=np.float64)
    iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return bool(np.all(iw * ih <= max_ioa * np.minimum(area, areas)))


def _draw_image(rng, size, instances, classes, *, min_radius, max_radius, max_ioa,
                num_distractors):
    """Draw one image. ``instances``: list of (label index, annotated: bool).

    Returns (BGR uint8 image, list of dict(label, annotated, bbox, area, segmentation)).
    """
    img = _background(rng, size)
    n_before = int(rng.integers(0, num_distractors + 1))
    for _ in range(n_before):
        _distractor(img, rng, size)
    placed, objects = [], []
    canvas = img.astype(np.float32)
    for label, annotated in instances:
        shape, color, texture = classes[label]
        polys = _UNIT_SHAPES[shape]
        # Try to place it with partial occlusion only; shrink when the image is crowded.
        for attempt in range(40):
            radius = rng.uniform(min_radius, max_radius) * (0.97 ** attempt)
            angle = rng.uniform(0, 2 * np.pi)
            stretch = np.sqrt(rng.uniform(0.8, 1.25))
            half = _extent(polys, radius, angle, stretch)
            lo, hi = half + 1, size - half - 1
            if np.any(lo >= hi):
                continue
            center = rng.uniform(lo, hi)
            box = (center[0] - half[0], center[1] - half[1], center[0] + half[0],
                   center[1] + half[1])
            if _ioa_ok(box, placed, max_ioa) or attempt == 39:
                break
        # Rasterise in a window around the object only (cheap), then locate the tight box.
        wx0, wy0 = (np.floor(center - half) - 2).astype(int).clip(0, size)
        wx1, wy1 = (np.ceil(center + half) + 3).astype(int).clip(0, size)
        alpha, inside = _render_mask(polys, center - (wx0, wy0), radius, angle, stretch,
                                            (wy1 - wy0, wx1 - wx0))
        ys, xs = np.nonzero(inside)
        if len(xs) == 0:
            continue
        # The tight box in xywh with pixel i spanning [i, i + 1) (COCO/LVIS convention); the
        # blended region takes one more pixel around it for the anti-aliased edge.
        x0, x1, y0, y1 = wx0 + xs.min(), wx0 + xs.max() + 1, wy0 + ys.min(), wy0 + ys.max() + 1
        bx0, by0 = max(x0 - 1, 0), max(y0 - 1, 0)
        bx1, by1 = min(x1 + 1, size), min(y1 + 1, size)
        alpha = (alpha[by0 - wy0:by1 - wy0, bx0 - wx0:bx1 - wx0].astype(np.float32) / 255.0)
        alpha = alpha[..., None]
        segmentation = _polygons(inside, wx0, wy0)
        base = np.clip(np.asarray(COLORS[color], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
        patch = np.broadcast_to(base, (by1 - by0, bx1 - bx0, 3)).copy()
        dark = _texture(texture, by1 - by0, bx1 - bx0, rng)
        patch[dark] = base * 0.25
        # Mild shading so that an object is not a flat colour.
        shade = np.linspace(rng.uniform(0.8, 1.0), rng.uniform(1.0, 1.15), bx1 - bx0)
        patch *= shade[None, :, None].astype(np.float32)
        region = canvas[by0:by1, bx0:bx1]
        canvas[by0:by1, bx0:bx1] = region * (1 - alpha) + np.clip(patch, 0, 255) * alpha
        placed.append(box)
        objects.append({
            "label": label,
            "annotated": annotated,
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(len(xs)),
            "segmentation": segmentation,
        })
    img = np.clip(canvas, 0, 255).astype(np.uint8)
    # A distractor in front of the objects sometimes: it occludes and is not annotated.
    if num_distractors and rng.uniform() < 0.3:
        _distractor(img, rng, size, max_scale=0.1)
    noise = rng.normal(0.0, rng.uniform(3.0, 10.0), img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    if rng.uniform() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return img[..., ::-1].copy(), objects


def _class_table(rng, num_classes):
    """Distinct (shape, colour, texture) triples, in frequency-rank order (rank 1 first)."""
    total = len(SHAPES) * len(COLORS) * len(TEXTURES)
    if not 1 <= num_classes <= total:
        raise ValueError(f"num_classes={num_classes}: must be in [1, {total}] "
                         f"({len(SHAPES)} shapes x {len(COLORS)} colours x "
                         f"{len(TEXTURES)} textures)")
    # Spread shapes evenly (every shape used before any is repeated) so classes differ in
    # shape as much as possible; colour/texture are drawn without repeating a triple.
    colors = list(COLORS)
    shape_order = np.concatenate([rng.permutation(len(SHAPES))
                                  for _ in range(-(-num_classes // len(SHAPES)))])
    seen, table = set(), []
    for shape_idx in shape_order[:num_classes]:
        while True:
            triple = (SHAPES[shape_idx], colors[int(rng.integers(len(colors)))],
                      TEXTURES[int(rng.integers(len(TEXTURES)))])
            if triple not in seen:
                break
        seen.add(triple)
        table.append(triple)
    order = rng.permutation(num_classes)
    return [table[i] for i in order]


def _layout_train(rng, num_images, image_counts, max_instances_per_pair):
    """For each training image, the list of labels present (with multiplicity).

    Class ``c`` is put on exactly ``image_counts[c]`` distinct images; images are filled
    least-loaded first so every image gets at least one object when the counts allow it.
    """
    load = np.zeros(num_images, dtype=np.int64)
    per_image = [[] for _ in range(num_images)]
    # Rare classes first, so their few images are chosen among still-empty ones.
    for c in np.argsort(image_counts, kind="stable"):
        k = int(image_counts[c])
        if k > num_images:
            raise ValueError(f"class rank {c + 1} needs {k} training images but num_train="
                             f"{num_images}: raise num_train or lower max_images_per_class")
        key = load + rng.uniform(0, 1, num_images)
        chosen = np.argsort(key, kind="stable")[:k]
        n_inst = 1 + rng.binomial(max_instances_per_pair - 1, 0.25, size=k)
        for i, n in zip(chosen.tolist(), n_inst.tolist()):
            per_image[i].extend([int(c)] * n)
        load[chosen] += n_inst
    return per_image


def _layout_val(rng, num_images, num_classes, instances_per_class):
    """Balanced: every class gets ``instances_per_class`` instances, 1-2 per image it is on."""
    per_image = [[] for _ in range(num_images)]
    load = np.zeros(num_images, dtype=np.int64)
    for c in rng.permutation(num_classes):
        remaining = instances_per_class
        while remaining > 0:
            n = min(remaining, int(rng.integers(1, 3)))
            key = load + rng.uniform(0, 1, num_images)
            # An image already holding this class is skipped: one (image, class) pair, one draw.
            key[[i for i in range(num_images) if c in per_image[i]]] = np.inf
            i = int(np.argmin(key))
            if not np.isfinite(key[i]):
                raise ValueError(f"num_val={num_images} images cannot hold "
                                 f"{instances_per_class} instances of one class at <= 2 per image")
            per_image[i].extend([int(c)] * n)
            load[i] += n
            remaining -= n
    return per_image


def _params(seed, sizes):
    defaults = dict(num_train=1200, num_val=300, num_classes=30, image_size=160,
                    max_images_per_class=1000, zipf_exponent=1.6, val_instances_per_class=20,
                    max_instances_per_pair=3, min_radius=None, max_radius=None, max_ioa=0.35,
                    num_distractors=3, neg_fraction=0.5, not_exhaustive_prob=0.02,
                    jpeg_quality=92)
    unknown = sorted(set(sizes) - set(defaults))
    if unknown:
        raise TypeError(f"make_synthetic_lvis: unknown parameter(s) {unknown}; "
                        f"valid: {sorted(defaults)}")
    params = {**defaults, **sizes, "seed": int(seed), "format_version": FORMAT_VERSION}
    # Object radii default to a fixed share of the image side, so any image size looks alike.
    if params["min_radius"] is None:
        params["min_radius"] = 0.05 * params["image_size"]
    if params["max_radius"] is None:
        params["max_radius"] = 0.15 * params["image_size"]
    if not 2 <= params["min_radius"] <= params["max_radius"]:
        raise ValueError(f"make_synthetic_lvis: need 2 <= min_radius <= max_radius, got "
                         f"min_radius={params['min_radius']}, max_radius={params['max_radius']}")
    for key in ("num_train", "num_val", "num_classes", "image_size", "max_images_per_class",
                "val_instances_per_class", "max_instances_per_pair"):
        if int(params[key]) < 1:
            raise ValueError(f"make_synthetic_lvis: {key}={params[key]} must be >= 1")
    if params["image_size"] < 4 * params["max_radius"]:
        raise ValueError(f"make_synthetic_lvis: image_size={params['image_size']} is too small "
                         f"for max_radius={params['max_radius']}: use >= 4 * max_radius")
    return params


def _atomic_write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, separators=(",", ":")), text=True)


def make_synthetic_lvis(root, seed=0, **sizes):
    """Generate (or reuse) the synthetic long-tailed LVIS-format data set under ``root``.

    Parameters (keyword ``sizes``, defaults in brackets): ``num_train`` [1200], ``num_val`` [300]
    images; ``num_classes`` [30]; ``image_size`` [160] (square images); ``max_images_per_class``
    [1000] and ``zipf_exponent`` [1.6]: training images of class rank k =
    ``max(1, round(1000 * k ** -1.6))``, i.e. 4 frequent, 13 common and 13 rare classes;
    ``val_instances_per_class`` [20]; ``max_instances_per_pair`` [3] instances of one class on
    one training image; ``min_radius`` / ``max_radius`` [5% / 15% of ``image_size``] object
    radius in pixels; ``max_ioa`` [0.35] the largest fraction of a box another object may cover;
    ``num_distractors`` [3] most non-class blobs per image; ``neg_fraction`` [0.5] of the absent
    classes listed in ``neg_category_ids``; ``not_exhaustive_prob`` [0.02]; ``jpeg_quality`` [92].

    Returns ``dict(train_json=str, val_json=str, image_root=str)``; image ``file_name`` values
    are relative to ``image_root``.
    """
    params = _params(seed, sizes)
    root = Path(root)
    out = dict(train_json=str(root / "train.json"), val_json=str(root / "val.json"),
               image_root=str(root / "images"))
    marker = root / MARKER_NAME
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("key") == key and all(Path(p).exists() for p in out.values()):
            logger.info("synthetic data set already complete in %s", root)
            return out
        marker.unlink()
    logger.info("generating synthetic long-tailed data set in %s (%s)", root, params)
    _generate(root, params)
    _atomic_write_json(marker, {"key": key, "params": params})
    return out


def _generate(root, p):
    rng = np.random.default_rng([p["seed"], 0xC1A55])
    C, size = p["num_classes"], p["image_size"]
    classes = _class_table(rng, C)
    image_counts = zipf_image_counts(C, p["max_images_per_class"], p["zipf_exponent"])
    layouts = {
        "train": _layout_train(rng, p["num_train"], image_counts, p["max_instances_per_pair"]),
        "val": _layout_val(rng, p["num_val"], C, p["val_instances_per_class"]),
    }
    draw_kw = dict(min_radius=p["min_radius"], max_radius=p["max_radius"], max_ioa=p["max_ioa"],
                   num_distractors=p["num_distractors"])
    splits = {}
    next_image_id, next_ann_id = 1, 1
    for split in ("train", "val"):
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for labels in layouts[split]:
            image_id = next_image_id
            next_image_id += 1
            img_rng = np.random.default_rng([p["seed"], image_id])
            # Not exhaustive: one more instance of a present class is drawn but not annotated,
            # so the annotated counts stay those of the layout.
            present = np.unique(labels)
            flags = img_rng.uniform(size=len(present)) < p["not_exhaustive_prob"]
            not_exhaustive = [int(c) for c in present[flags]]
            instances = [(c, True) for c in labels] + [(c, False) for c in not_exhaustive]
            # Drawing order = occlusion order.
            instances = [instances[i] for i in img_rng.permutation(len(instances))]
            bgr, objects = _draw_image(img_rng, size, instances, classes, **draw_kw)
            file_name = f"{split}/{image_id:06d}.jpg"
            if not cv2.imwrite(str(root / "images" / file_name), bgr,
                               [cv2.IMWRITE_JPEG_QUALITY, int(p["jpeg_quality"])]):
                raise OSError(f"cv2.imwrite failed for {root / 'images' / file_name}: "
                              f"is the folder writable?")
            absent = np.setdiff1d(np.arange(C), present)
            n_neg = int(round(p["neg_fraction"] * len(absent)))
            neg = np.sort(img_rng.choice(absent, size=n_neg, replace=False)) if n_neg else []
            images.append({
                "id": image_id, "file_name": file_name, "width": size, "height": size,
                "coco_url": f"synthetic://{file_name}",
                "neg_category_ids": [int(c) + 1 for c in neg],
                "not_exhaustive_category_ids": sorted(c + 1 for c in not_exhaustive),
            })
            for obj in objects:
                if not obj["annotated"]:
                    continue
                annotations.append({
                    "id": next_ann_id, "image_id": image_id, "category_id": obj["label"] + 1,
                    "bbox": obj["bbox"], "area": obj["area"],
                    "segmentation": obj["segmentation"], "iscrowd": 0,
                })
                next_ann_id += 1
        _remove_stale_images(img_dir, {im["file_name"].split("/")[-1] for im in images})
        splits[split] = (images, annotations)
    categories = _categories(classes, splits["train"][1])
    for split, (images, annotations) in splits.items():
        _atomic_write_json(root / f"{split}.json", {
            "info": {"description": "ltdet synthetic long-tailed detection data set",
                     "params": p},
            "licenses": [],
            "images": images, "annotations": annotations, "categories": categories,
        })


def _categories(classes, train_annotations):
    """LVIS category records; counts and frequency group from the training annotations."""
    C = len(classes)
    instance_count = np.zeros(C, dtype=np.int64)
    pairs = {(a["image_id"], a["category_id"]) for a in train_annotations}
    image_count = np.zeros(C, dtype=np.int64)
    for a in train_annotations:
        instance_count[a["category_id"] - 1] += 1
    for _, cat in pairs:
        image_count[cat - 1] += 1
    cats = []
    for i, (shape, color, texture) in enumerate(classes):
        name = f"{color}_{texture}_{shape}"
        n = int(image_count[i])
        freq = "r" if n <= 10 else ("c" if n <= 100 else "f")
        cats.append({"id": i + 1, "name": name, "synset": f"{name}.n.01", "synonyms": [name],
                     "def": f"a {color} {texture} {shape.replace('_', ' ')}",
                     "frequency": freq, "image_count": n, "instance_count": int(instance_count[i])})
    return cats


def _remove_stale_images(img_dir, keep):
    """Delete JPEGs of an earlier, larger generation in our own folder (named NNNNNN.jpg)."""
    for path in img_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].jpg"):
        if path.name not in keep:
            path.unlink()
