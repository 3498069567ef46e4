"""Per-class statistics of a detection data set and the flat annotation arrays behind them.

Label convention (torchvision's): label ``i`` in ``1..C`` is the ``i``-th category by sorted json
category id; label 0 is background. Every per-class tensor here has shape ``[C]`` and index
``i`` holds label ``i + 1``.

Frequency groups follow the LVIS paper (Gupta et al., CVPR 2019, Sec. 3), with the thresholds
of `ltdet.frequency`: rare (``r``) 1-10 training images, common (``c``) 11-100, frequent
(``f``) more.

`FlatAnnotations` is the one parser of LVIS / COCO json shared by the datasets, ClassStats,
repeat-factor sampling and the COCO-LT builder: it validates the json once and turns the list of
annotation dicts into flat NumPy arrays, so every statistic is a vectorised reduction.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from typing import Any, Mapping

import numpy as np
import torch

from ltdet.frequency import FREQ_GROUPS, frequency_from_counts

logger = logging.getLogger(__name__)

__all__ = ["ClassStats", "FlatAnnotations", "load_json_dict"]


def load_json_dict(path_or_dict: str | os.PathLike | Mapping) -> tuple[dict, str | None]:
    """Return ``(dataset dict, path or None)``; a missing file or a non-dict json is an error."""
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), None
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"annotation json {path!r} does not exist; check the data.train.json / data.val.json "
            "path in your config (see docs/data.md for the expected layout)"
        )
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"annotation json {path!r} is not valid JSON ({e}); re-download or regenerate it"
            ) from e
    if not isinstance(data, dict):
        raise ValueError(
            f"annotation json {path!r} holds a {type(data).__name__}, expected an "
            "object with 'images', 'annotations' and 'categories'"
        )
    return data, path


def _positions(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each ``query`` id in ``sorted_ids`` (unique) and a mask of ids not found.

    A lookup table when the ids are dense enough (json ids usually are; O(A) gathers), binary
    search otherwise.
    """
    if sorted_ids.size and sorted_ids[0] >= 0 and sorted_ids[-1] <= 8 * sorted_ids.size + (1 << 20):
        table = np.full(int(sorted_ids[-1]) + 2, -1, np.int64)
        table[sorted_ids] = np.arange(sorted_ids.size)
        pos = table[np.clip(query, -1, sorted_ids[-1] + 1)]
        missing = (pos < 0) | (query < 0) | (query > sorted_ids[-1])
        return np.maximum(pos, 0), missing
    pos = np.searchsorted(sorted_ids, query)
    clipped = np.minimum(pos, sorted_ids.size - 1)
    missing = (pos >= sorted_ids.size) | (sorted_ids[clipped] != query)
    return clipped, missing


def _describe(path: str | None) -> str:
    return repr(path) if path is not None else "<in-memory dict>"


def _check_records(where: str, key: str, records) -> None:
    """`images` / `annotations` / `categories` must be lists of objects."""
    if not isinstance(records, list):
        raise ValueError(
            f"annotation json {where}: {key!r} is a {type(records).__name__}, "
            f"expected a list of objects (LVIS / COCO format)"
        )
    kinds = set(map(type, records))
    if kinds - {dict}:
        bad = next(r for r in records if type(r) is not dict)
        raise ValueError(
            f"annotation json {where}: {key!r} holds {bad!r} "
            f"({type(bad).__name__}); every entry must be an object"
        )


def _field(where: str, key: str, records, name: str, kinds, what: str, entry=None):
    """`[r[name] for r in records]`, after checking that every value's type is in `kinds`
    (json ids are integers: not floats such as 2.9 or 1.0, not strings, not booleans; a type
    check per value, at C speed, rather than a cast that would truncate 2.9 to 2)."""
    try:
        values = list(map(itemgetter(name), records))
    except KeyError:
        bad = next(r for r in records if name not in r)
        raise ValueError(
            f"annotation json {where}: an entry of {key!r} lacks {name!r}: "
            f"{_entry(bad, entry)}; every entry needs it"
        ) from None
    if set(map(type, values)) - set(kinds):
        k = next(i for i, v in enumerate(values) if type(v) not in kinds)
        raise ValueError(
            f"annotation json {where}: {key} entry {_entry(records[k], entry)} has "
            f"{name} {values[k]!r} ({type(values[k]).__name__}); expected {what}"
        )
    return values


def _entry(record: dict, entry) -> str:
    if entry is not None:
        return entry(record)
    text = repr(record)
    return text if len(text) <= 200 else text[:200] + "...}"


def _ann_entry(a: dict) -> str:
    return f"annotation id {a.get('id')!r} (image id {a.get('image_id')!r})"


_INT = (int,)
_NUMBER = (int, float)


@dataclass(frozen=True)
class FlatAnnotations:
    """A validated LVIS / COCO json as flat arrays.

    Images are ordered by sorted image id (index ``i`` = dataset index ``i``); categories by
    sorted category id (label = position + 1). Crowd annotations (COCO ``iscrowd=1``) and, with
    ``skip_invalid``, degenerate boxes are dropped: the arrays hold exactly the annotations a
    training target contains, so statistics computed from them match what the model sees.

    Shapes: ``image_ids [N]``, ``widths / heights [N]``, ``ann_ids / ann_image_index / ann_labels
    [A]``, ``ann_boxes [A, 4]`` xywh float64, ``ann_offsets [N + 1]`` (annotations of image ``i``
    are ``ann_offsets[i]:ann_offsets[i + 1]``; arrays are sorted by image index, stable).
    """

    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    cat_ids: list[int]
    class_names: list[str]
    ann_ids: np.ndarray
    ann_image_index: np.ndarray
    ann_labels: np.ndarray
    ann_boxes: np.ndarray
    ann_offsets: np.ndarray
    json_path: str | None = None
    frequency: list[str] | None = field(default=None)

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    @classmethod
    def from_json(
        cls, path_or_dict: str | os.PathLike | Mapping, *, skip_invalid: bool = False
    ) -> FlatAnnotations:
        data, path = load_json_dict(path_or_dict)
        return cls.from_dict(data, json_path=path, skip_invalid=skip_invalid)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, json_path: str | None = None, skip_invalid: bool = False
    ) -> FlatAnnotations:
        where = _describe(json_path)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(
                    f"annotation json {where} has no {key!r} field; it must be in "
                    "LVIS or COCO detection format"
                )
        images, anns, cats = data["images"], data["annotations"], data["categories"]
        for key, records in (("images", images), ("annotations", anns), ("categories", cats)):
            _check_records(where, key, records)
        if len(images) == 0:
            raise ValueError(
                f"annotation json {where} has no images: the data set is empty; "
                "point data.*.json at a non-empty LVIS / COCO json"
            )
        if len(cats) == 0:
            raise ValueError(
                f"annotation json {where} has no categories; a detection json needs "
                "its 'categories' list"
            )

        _field(where, "categories", cats, "id", _INT, "an integer id")
        cats_sorted = sorted(cats, key=lambda c: c["id"])
        cat_ids = [int(c["id"]) for c in cats_sorted]
        if len(set(cat_ids)) != len(cat_ids):
            raise ValueError(f"annotation json {where} repeats a category id in 'categories'")
        names = [str(c.get("name", c["id"])) for c in cats_sorted]
        frequency = (
            [str(c["frequency"]) for c in cats_sorted]
            if all("frequency" in c for c in cats_sorted)
            else None
        )

        raw_image_ids = np.fromiter(
            _field(where, "images", images, "id", _INT, "an integer id"), np.int64, len(images)
        )
        for name in ("width", "height"):
            if any(name in im for im in images):
                _field(
                    where,
                    "images",
                    [im for im in images if name in im],
                    name,
                    _NUMBER,
                    "a number of pixels",
                )
        order = np.argsort(raw_image_ids, kind="stable")
        image_ids = raw_image_ids[order]
        if np.any(image_ids[1:] == image_ids[:-1]):
            dup = int(image_ids[1:][image_ids[1:] == image_ids[:-1]][0])
            raise ValueError(f"annotation json {where} lists image id {dup} twice in 'images'")
        widths = np.fromiter((im.get("width", 0) for im in images), np.float64, len(images))[order]
        heights = np.fromiter((im.get("height", 0) for im in images), np.float64, len(images))[
            order
        ]

        a = len(anns)
        # C-level map/itemgetter passes: ~3x faster than generator expressions on 1M+ dicts.
        ids = {
            name: _field(where, "annotations", anns, name, _INT, "an integer id", _ann_entry)
            for name in ("id", "image_id", "category_id")
        }
        ann_ids, ann_img, ann_cat = (
            np.fromiter(ids[k], np.int64, a) for k in ("id", "image_id", "category_id")
        )
        bboxes = _field(
            where, "annotations", anns, "bbox", (list,), "a list [x, y, width, height]", _ann_entry
        )
        box_len = np.fromiter(map(len, bboxes), np.int64, a)
        crowd = np.fromiter(map(dict.get, anns, repeat("iscrowd"), repeat(0)), np.int64, a).astype(
            bool
        )
        if np.any(box_len != 4):
            bad = anns[int(np.flatnonzero(box_len != 4)[0])]
            raise ValueError(
                f"annotation id {bad['id']} (image id {bad['image_id']}) in {where} "
                f"has bbox {bad.get('bbox')!r}; expected [x, y, width, height]"
            )
        if set(map(type, chain.from_iterable(bboxes))) - set(_NUMBER):
            k = next(i for i, b in enumerate(bboxes) if set(map(type, b)) - set(_NUMBER))
            raise ValueError(
                f"{_ann_entry(anns[k])} in {where} has bbox {bboxes[k]!r}; expected "
                f"four numbers [x, y, width, height]"
            )
        boxes = np.fromiter(chain.from_iterable(bboxes), np.float64, 4 * a).reshape(a, 4)

        label_pos, unknown_cat = _positions(np.asarray(cat_ids, np.int64), ann_cat)
        if unknown_cat.any():
            k = int(np.flatnonzero(unknown_cat)[0])
            raise ValueError(
                f"annotation id {ann_ids[k]} (image id {ann_img[k]}) in {where} has category_id "
                f"{ann_cat[k]}, which is not in 'categories' ({int(unknown_cat.sum())} such "
                "annotations); fix the json or add the category"
            )
        img_pos, unknown_img = _positions(image_ids, ann_img)
        if unknown_img.any():
            k = int(np.flatnonzero(unknown_img)[0])
            raise ValueError(
                f"annotation id {ann_ids[k]} in {where} refers to image id {ann_img[k]}, which is "
                f"not in 'images' ({int(unknown_img.sum())} such annotations); remove those "
                "annotations or add the image entries"
            )

        degenerate = ~(np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0))
        # A box is clipped to its image for training: one with nothing inside the image becomes
        # a zero-size target (torchvision then fails naming no annotation). Checked here, where
        # the annotation id is known; images without width / height are not checked.
        w_img, h_img = widths[img_pos], heights[img_pos]
        known = (w_img > 0) & (h_img > 0)
        inside_w = np.minimum(boxes[:, 0] + boxes[:, 2], w_img) - np.maximum(boxes[:, 0], 0)
        inside_h = np.minimum(boxes[:, 1] + boxes[:, 3], h_img) - np.maximum(boxes[:, 1], 0)
        outside = ~degenerate & known & ~((inside_w > 0) & (inside_h > 0))
        for invalid, why in (
            (degenerate, "zero/negative/non-finite width or height"),
            (outside, "no part inside its image"),
        ):
            if not invalid.any():
                continue
            idx = np.flatnonzero(invalid)
            k = int(idx[0])
            if not skip_invalid:
                size = f" on a {w_img[k]:g}x{h_img[k]:g} px image" if known[k] else ""
                raise ValueError(
                    f"annotation id {ann_ids[k]} (image id {ann_img[k]}) in {where} has bbox "
                    f"{boxes[k].tolist()}{size} with {why} ({idx.size} such annotations); fix "
                    "or remove them, or pass skip_invalid=True (config: data.skip_invalid: "
                    "true) to drop them"
                )
            logger.warning(
                "%s: dropped %d of %d annotations with %s (skip_invalid=True) on %d "
                "images; first: annotation id %d",
                where,
                idx.size,
                a,
                why,
                np.unique(ann_img[idx]).size,
                ann_ids[k],
            )
        invalid = degenerate | outside

        keep = ~invalid & ~crowd
        img_index = img_pos[keep]
        # Group annotations by image (stable); many jsons already are, and then no sort is needed.
        sort = (
            np.arange(img_index.size)
            if np.all(img_index[1:] >= img_index[:-1])
            else np.argsort(img_index, kind="stable")
        )
        img_index = img_index[sort]
        offsets = np.zeros(len(image_ids) + 1, np.int64)
        np.cumsum(np.bincount(img_index, minlength=len(image_ids)), out=offsets[1:])
        return cls(
            image_ids=image_ids,
            widths=widths,
            heights=heights,
            cat_ids=cat_ids,
            class_names=names,
            ann_ids=ann_ids[keep][sort],
            ann_image_index=img_index,
            ann_labels=label_pos[keep][sort] + 1,
            ann_boxes=boxes[keep][sort],
            ann_offsets=offsets,
            json_path=json_path,
            frequency=frequency,
        )

    def image_label_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique ``(image index, label)`` pairs: one entry per class present on an image."""
        c = self.num_classes
        key = np.unique(self.ann_image_index * (c + 1) + self.ann_labels)
        return key // (c + 1), key % (c + 1)


@dataclass
class ClassStats:
    """Per-class training counts. Tensors are float ``[C]``; index ``i`` = label ``i + 1``.

    ``frequency`` is the json's ``frequency`` field when every category has one (LVIS), else it is
    derived from ``image_count`` with the LVIS thresholds (`frequency_from_counts`).
    """

    image_count: torch.Tensor
    instance_count: torch.Tensor
    num_images: int
    frequency: list[str] | None = None
    names: list[str] | None = None
    cat_ids: list[int] | None = None

    def __post_init__(self):
        self.image_count = torch.as_tensor(self.image_count, dtype=torch.float32).reshape(-1)
        self.instance_count = torch.as_tensor(self.instance_count, dtype=torch.float32).reshape(-1)
        c = self.image_count.numel()
        if self.instance_count.numel() != c:
            raise ValueError(
                f"ClassStats: image_count has {c} classes but instance_count has "
                f"{self.instance_count.numel()}"
            )
        self.num_images = int(self.num_images)
        if self.frequency is None:
            self.frequency = frequency_from_counts(self.image_count)
        for name, value in (
            ("frequency", self.frequency),
            ("names", self.names),
            ("cat_ids", self.cat_ids),
        ):
            if value is not None and len(value) != c:
                raise ValueError(f"ClassStats: {name} has {len(value)} entries for {c} classes")
        bad = sorted(set(self.frequency) - set(FREQ_GROUPS))
        if bad:
            raise ValueError(f"ClassStats: frequency values must be 'r', 'c' or 'f', got {bad}")

    @property
    def num_classes(self) -> int:
        return int(self.image_count.numel())

    @classmethod
    def from_flat(cls, flat: FlatAnnotations) -> ClassStats:
        c = flat.num_classes
        instance = np.bincount(flat.ann_labels - 1, minlength=c)
        _, pair_labels = flat.image_label_pairs()
        image = np.bincount(pair_labels - 1, minlength=c)
        return cls(
            image_count=torch.from_numpy(image.astype(np.float32)),
            instance_count=torch.from_numpy(instance.astype(np.float32)),
            num_images=flat.num_images,
            frequency=flat.frequency,
            names=list(flat.class_names),
            cat_ids=list(flat.cat_ids),
        )

    @classmethod
    def from_json(
        cls, path_or_dict: str | os.PathLike | Mapping, *, skip_invalid: bool = False
    ) -> ClassStats:
        """Counts over the json's (non-crowd) annotations; LVIS or COCO format, path or dict."""
        return cls.from_flat(FlatAnnotations.from_json(path_or_dict, skip_invalid=skip_invalid))

    @classmethod
    def from_dataset(cls, dataset) -> ClassStats:
        """Counts over the annotations a `LVISDetection` / `COCODetection` actually loaded."""
        return cls.from_flat(dataset.annotations)
