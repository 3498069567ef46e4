"""Writing the synthetic data set: parameters, the per-image generators, the LVIS json records,
the JPEG files, and the completion marker that makes `make_synthetic_lvis` idempotent."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ltdet.fileio import atomic_write
from ltdet.frequency import frequency_from_counts

from .drawing import draw_image
from .layout import class_table, layout_train, layout_val, zipf_image_counts

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "MARKER_NAME", "make_synthetic_lvis"]

MARKER_NAME = ".synthetic_complete.json"
# Bump when the drawing or the layout changes, so old markers stop matching.
FORMAT_VERSION = 1


def _params(seed: int, sizes: dict[str, Any]) -> dict[str, Any]:
    defaults = dict(
        num_train=1200,
        num_val=300,
        num_classes=30,
        image_size=160,
        max_images_per_class=1000,
        zipf_exponent=1.6,
        val_instances_per_class=20,
        max_instances_per_pair=3,
        min_radius=None,
        max_radius=None,
        max_ioa=0.35,
        num_distractors=3,
        neg_fraction=0.5,
        not_exhaustive_prob=0.02,
        jpeg_quality=92,
    )
    unknown = sorted(set(sizes) - set(defaults))
    if unknown:
        raise TypeError(
            f"make_synthetic_lvis: unknown parameter(s) {unknown}; valid: {sorted(defaults)}"
        )
    params = {**defaults, **sizes, "seed": int(seed), "format_version": FORMAT_VERSION}
    # Object radii default to a fixed share of the image side, so any image size looks alike.
    if params["min_radius"] is None:
        params["min_radius"] = 0.05 * params["image_size"]
    if params["max_radius"] is None:
        params["max_radius"] = 0.15 * params["image_size"]
    if not 2 <= params["min_radius"] <= params["max_radius"]:
        raise ValueError(
            f"make_synthetic_lvis: need 2 <= min_radius <= max_radius, got "
            f"min_radius={params['min_radius']}, max_radius={params['max_radius']}"
        )
    for key in (
        "num_train",
        "num_val",
        "num_classes",
        "image_size",
        "max_images_per_class",
        "val_instances_per_class",
        "max_instances_per_pair",
    ):
        if int(params[key]) < 1:
            raise ValueError(f"make_synthetic_lvis: {key}={params[key]} must be >= 1")
    if params["image_size"] < 4 * params["max_radius"]:
        raise ValueError(
            f"make_synthetic_lvis: image_size={params['image_size']} is too small "
            f"for max_radius={params['max_radius']}: use >= 4 * max_radius"
        )
    return params


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, separators=(",", ":")), text=True)


def make_synthetic_lvis(root: str | os.PathLike, seed: int = 0, **sizes: Any) -> dict[str, str]:
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
    out = dict(
        train_json=str(root / "train.json"),
        val_json=str(root / "val.json"),
        image_root=str(root / "images"),
    )
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


def _generate(root: Path, p: dict[str, Any]) -> None:
    rng = np.random.default_rng([p["seed"], 0xC1A55])
    C, size = p["num_classes"], p["image_size"]
    classes = class_table(rng, C)
    image_counts = zipf_image_counts(C, p["max_images_per_class"], p["zipf_exponent"])
    layouts = {
        "train": layout_train(rng, p["num_train"], image_counts, p["max_instances_per_pair"]),
        "val": layout_val(rng, p["num_val"], C, p["val_instances_per_class"]),
    }
    draw_kw = dict(
        min_radius=p["min_radius"],
        max_radius=p["max_radius"],
        max_ioa=p["max_ioa"],
        num_distractors=p["num_distractors"],
    )
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
            bgr, objects = draw_image(img_rng, size, instances, classes, **draw_kw)
            file_name = f"{split}/{image_id:06d}.jpg"
            if not cv2.imwrite(
                str(root / "images" / file_name),
                bgr,
                [cv2.IMWRITE_JPEG_QUALITY, int(p["jpeg_quality"])],
            ):
                raise OSError(
                    f"cv2.imwrite failed for {root / 'images' / file_name}: is the folder writable?"
                )
            absent = np.setdiff1d(np.arange(C), present)
            n_neg = int(round(p["neg_fraction"] * len(absent)))
            neg: np.ndarray | list[int] = (
                np.sort(img_rng.choice(absent, size=n_neg, replace=False)) if n_neg else []
            )
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": size,
                    "height": size,
                    "coco_url": f"synthetic://{file_name}",
                    "neg_category_ids": [int(c) + 1 for c in neg],
                    "not_exhaustive_category_ids": sorted(c + 1 for c in not_exhaustive),
                }
            )
            for obj in objects:
                if not obj["annotated"]:
                    continue
                annotations.append(
                    {
                        "id": next_ann_id,
                        "image_id": image_id,
                        "category_id": obj["label"] + 1,
                        "bbox": obj["bbox"],
                        "area": obj["area"],
                        "segmentation": obj["segmentation"],
                        "iscrowd": 0,
                    }
                )
                next_ann_id += 1
        _remove_stale_images(img_dir, {im["file_name"].split("/")[-1] for im in images})
        splits[split] = (images, annotations)
    categories = _categories(classes, splits["train"][1])
    for split, (images, annotations) in splits.items():
        _atomic_write_json(
            root / f"{split}.json",
            {
                "info": {
                    "description": "ltdet synthetic long-tailed detection data set",
                    "params": p,
                },
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            },
        )


def _categories(classes: list[tuple[str, str, str]], train_annotations: list[dict]) -> list[dict]:
    """LVIS category records; counts and frequency group from the training annotations."""
    C = len(classes)
    instance_count = np.zeros(C, dtype=np.int64)
    pairs = {(a["image_id"], a["category_id"]) for a in train_annotations}
    image_count = np.zeros(C, dtype=np.int64)
    for a in train_annotations:
        instance_count[a["category_id"] - 1] += 1
    for _, cat in pairs:
        image_count[cat - 1] += 1
    frequency = frequency_from_counts(image_count)
    cats = []
    for i, (shape, color, texture) in enumerate(classes):
        name = f"{color}_{texture}_{shape}"
        n = int(image_count[i])
        cats.append(
            {
                "id": i + 1,
                "name": name,
                "synset": f"{name}.n.01",
                "synonyms": [name],
                "def": f"a {color} {texture} {shape.replace('_', ' ')}",
                "frequency": frequency[i],
                "image_count": n,
                "instance_count": int(instance_count[i]),
            }
        )
    return cats


def _remove_stale_images(img_dir: Path, keep: set[str]) -> None:
    """Delete JPEGs of an earlier, larger generation in our own folder (named NNNNNN.jpg)."""
    for path in img_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].jpg"):
        if path.name not in keep:
            path.unlink()
