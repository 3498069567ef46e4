"""What goes where, before anything is drawn: the class table (a (shape, colour, texture) triple
per frequency rank), the Zipf image counts of the long tail, and which labels each image of a
split holds."""

from __future__ import annotations

import numpy as np

from .shapes import COLORS, SHAPES, TEXTURES

__all__ = ["class_table", "layout_train", "layout_val", "zipf_image_counts"]


def zipf_image_counts(
    num_classes: int, max_images_per_class: float, zipf_exponent: float
) -> np.ndarray:
    """Training images per class rank: ``max(1, round(n_max * k ** -s))`` for ``k = 1..C``.

    Returns an int64 array ``[C]``, non-increasing, index ``k - 1`` = rank ``k``.
    """
    ranks = np.arange(1, num_classes + 1, dtype=np.float64)
    counts = np.rint(max_images_per_class * ranks ** (-float(zipf_exponent))).astype(np.int64)
    return np.maximum(counts, 1)


def class_table(rng: np.random.Generator, num_classes: int) -> list[tuple[str, str, str]]:
    """Distinct (shape, colour, texture) triples, in frequency-rank order (rank 1 first)."""
    total = len(SHAPES) * len(COLORS) * len(TEXTURES)
    if not 1 <= num_classes <= total:
        raise ValueError(
            f"num_classes={num_classes}: must be in [1, {total}] "
            f"({len(SHAPES)} shapes x {len(COLORS)} colours x "
            f"{len(TEXTURES)} textures)"
        )
    # Spread shapes evenly (every shape used before any is repeated) so classes differ in
    # shape as much as possible; colour/texture are drawn without repeating a triple.
    colors = list(COLORS)
    shape_order = np.concatenate(
        [rng.permutation(len(SHAPES)) for _ in range(-(-num_classes // len(SHAPES)))]
    )
    seen, table = set(), []
    for shape_idx in shape_order[:num_classes]:
        while True:
            triple = (
                SHAPES[shape_idx],
                colors[int(rng.integers(len(colors)))],
                TEXTURES[int(rng.integers(len(TEXTURES)))],
            )
            if triple not in seen:
                break
        seen.add(triple)
        table.append(triple)
    order = rng.permutation(num_classes)
    return [table[i] for i in order]


def layout_train(
    rng: np.random.Generator, num_images: int, image_counts: np.ndarray, max_instances_per_pair: int
) -> list[list[int]]:
    """For each training image, the list of labels present (with multiplicity).

    Class ``c`` is put on exactly ``image_counts[c]`` distinct images; images are filled
    least-loaded first so every image gets at least one object when the counts allow it.
    """
    load = np.zeros(num_images, dtype=np.int64)
    per_image: list[list[int]] = [[] for _ in range(num_images)]
    # Rare classes first, so their few images are chosen among still-empty ones.
    for c in np.argsort(image_counts, kind="stable"):
        k = int(image_counts[c])
        if k > num_images:
            raise ValueError(
                f"class rank {c + 1} needs {k} training images but num_train="
                f"{num_images}: raise num_train or lower max_images_per_class"
            )
        key = load + rng.uniform(0, 1, num_images)
        chosen = np.argsort(key, kind="stable")[:k]
        n_inst = 1 + rng.binomial(max_instances_per_pair - 1, 0.25, size=k)
        for i, n in zip(chosen.tolist(), n_inst.tolist()):
            per_image[i].extend([int(c)] * n)
        load[chosen] += n_inst
    return per_image


def layout_val(
    rng: np.random.Generator, num_images: int, num_classes: int, instances_per_class: int
) -> list[list[int]]:
    """Balanced: every class gets ``instances_per_class`` instances, 1-2 per image it is on."""
    per_image: list[list[int]] = [[] for _ in range(num_images)]
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
                raise ValueError(
                    f"num_val={num_images} images cannot hold "
                    f"{instances_per_class} instances of one class at <= 2 per image"
                )
            per_image[i].extend([int(c)] * n)
            load[i] += n
            remaining -= n
    return per_image
