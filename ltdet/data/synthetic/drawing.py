"""Drawing one synthetic image: a cluttered background, then each object (its shape rasterised
with OpenCV, coloured, textured, shaded, alpha-blended), and its annotation (tight box, area,
outer-contour polygon)."""

from __future__ import annotations

import cv2
import numpy as np

from .shapes import COLORS, SUBPIXEL_SHIFT, TEXTURES, UNIT_SHAPES

__all__ = ["draw_image"]


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
        fixed = [np.rint(pts * (1 << SUBPIXEL_SHIFT)).astype(np.int32)]
        cv2.fillPoly(alpha, fixed, 255 * fill, lineType=cv2.LINE_AA, shift=SUBPIXEL_SHIFT)
        cv2.fillPoly(inside, fixed, fill, lineType=cv2.LINE_8, shift=SUBPIXEL_SHIFT)
    return alpha, inside.astype(bool)


def _polygons(inside, x_off, y_off):
    """LVIS segmentation of a binary shape mask: its outer contours, through the centres of the
    boundary pixels, in image coordinates where pixel i spans [i, i + 1) (centre i + 0.5).

    Contours of fewer than 3 points (a one-pixel sliver) are no polygon and are dropped; a mask
    made only of such slivers gets its box as polygon."""
    contours, _ = cv2.findContours(
        inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polys = [
        (c.reshape(-1, 2) + (x_off + 0.5, y_off + 0.5)).reshape(-1).tolist()
        for c in contours
        if len(c) >= 3
    ]
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
    fixed = np.rint(pts * (1 << SUBPIXEL_SHIFT)).astype(np.int32)
    color = tuple(float(v) for v in _muted(rng, 40, 210))
    cv2.fillPoly(img, [fixed], color, lineType=cv2.LINE_AA, shift=SUBPIXEL_SHIFT)


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


def draw_image(
    rng: np.random.Generator,
    size: int,
    instances: list[tuple[int, bool]],
    classes: list[tuple[str, str, str]],
    *,
    min_radius: float,
    max_radius: float,
    max_ioa: float,
    num_distractors: int,
) -> tuple[np.ndarray, list[dict]]:
    """Draw one image. ``instances``: list of (label index, annotated: bool).

    Returns (BGR uint8 image, list of dict(label, annotated, bbox, area, segmentation)).
    """
    img = _background(rng, size)
    n_before = int(rng.integers(0, num_distractors + 1))
    for _ in range(n_before):
        _distractor(img, rng, size)
    placed: list[tuple[float, float, float, float]] = []
    objects: list[dict] = []
    canvas = img.astype(np.float32)
    for label, annotated in instances:
        shape, color, texture = classes[label]
        polys = UNIT_SHAPES[shape]
        # Try to place it with partial occlusion only; shrink when the image is crowded.
        for attempt in range(40):
            radius = rng.uniform(min_radius, max_radius) * (0.97**attempt)
            angle = rng.uniform(0, 2 * np.pi)
            stretch = np.sqrt(rng.uniform(0.8, 1.25))
            half = _extent(polys, radius, angle, stretch)
            lo, hi = half + 1, size - half - 1
            if np.any(lo >= hi):
                continue
            center = rng.uniform(lo, hi)
            box = (
                center[0] - half[0],
                center[1] - half[1],
                center[0] + half[0],
                center[1] + half[1],
            )
            if _ioa_ok(box, placed, max_ioa) or attempt == 39:
                break
        # Rasterise in a window around the object only (cheap), then locate the tight box.
        wx0, wy0 = (np.floor(center - half) - 2).astype(int).clip(0, size)
        wx1, wy1 = (np.ceil(center + half) + 3).astype(int).clip(0, size)
        alpha, inside = _render_mask(
            polys, center - (wx0, wy0), radius, angle, stretch, (wy1 - wy0, wx1 - wx0)
        )
        ys, xs = np.nonzero(inside)
        if len(xs) == 0:
            continue
        # The tight box in xywh with pixel i spanning [i, i + 1) (COCO/LVIS convention); the
        # blended region takes one more pixel around it for the anti-aliased edge.
        x0, x1, y0, y1 = wx0 + xs.min(), wx0 + xs.max() + 1, wy0 + ys.min(), wy0 + ys.max() + 1
        bx0, by0 = max(x0 - 1, 0), max(y0 - 1, 0)
        bx1, by1 = min(x1 + 1, size), min(y1 + 1, size)
        alpha = alpha[by0 - wy0 : by1 - wy0, bx0 - wx0 : bx1 - wx0].astype(np.float32) / 255.0
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
        objects.append(
            {
                "label": label,
                "annotated": annotated,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(len(xs)),
                "segmentation": segmentation,
            }
        )
    img = np.clip(canvas, 0, 255).astype(np.uint8)
    # A distractor in front of the objects sometimes: it occludes and is not annotated.
    if num_distractors and rng.uniform() < 0.3:
        _distractor(img, rng, size, max_scale=0.1)
    noise = rng.normal(0.0, rng.uniform(3.0, 10.0), img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    if rng.uniform() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    return img[..., ::-1].copy(), objects
