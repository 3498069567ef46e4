"""The class vocabulary of the synthetic data set: shapes, colours, textures, and the unit
outline of each shape."""

from __future__ import annotations

import numpy as np

__all__ = ["COLORS", "SHAPES", "SUBPIXEL_SHIFT", "TEXTURES", "UNIT_SHAPES", "shape_polygons"]

SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
    "half_disc",
)
# Saturated, well separated hues (RGB); backgrounds and distractors are kept muted so that
# colour is a usable cue but not the only one (several classes share a colour).
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 30),
    "green": (40, 190, 50),
    "cyan": (30, 210, 220),
    "blue": (40, 60, 230),
    "purple": (140, 40, 200),
    "white": (245, 245, 245),
}
TEXTURES = ("solid", "striped", "dotted", "checkered")


def zipf_image_counts(num_classes, max_images_per_class, zipf_exponent):
    """Training images per class rank: ``max(1, round(n_max * k ** -s))`` for ``k = 1..C``.

    Returns an int64 array ``[C]``, non-increasing, index ``k - 1`` = rank ``k``.
    """
    ranks = np.arange(1, num_classes + 1, dtype=np.float64)
    counts = np.rint(max_images_per_class * ranks ** (-float(zipf_exponent))).astype(np.int64)
    return np.maximum(counts, 1)


def shape_polygons(shape: str) -> list[tuple[np.ndarray, int]]:
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
        pts = [
            (-a, -1),
            (a, -1),
            (a, -a),
            (1, -a),
            (1, a),
            (a, a),
            (a, 1),
            (-a, 1),
            (-a, a),
            (-1, a),
            (-1, -a),
            (-a, -a),
        ]
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
        outline = np.stack([x, y + 2.5], 1) / 17.0
        return [(outline, 1)]
    if shape == "half_disc":
        t = np.linspace(0, np.pi, 25)
        return [(np.stack([np.cos(t), np.sin(t) - 0.4], 1), 1)]
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


#: shape name -> its `shape_polygons`, computed once.
UNIT_SHAPES = {s: shape_polygons(s) for s in SHAPES}
# fillPoly with `shift` draws at sub-pixel precision: coordinates are fixed point with 4 bits.
SUBPIXEL_SHIFT = 4
