"""Ground truth as columns: LVIS v1 / COCO json -> :class:`GroundTruth`, and the class groups.

Loading validates and normalises what the references read: image / category / annotation ids
(integers, never rounded), the per-image federated lists (``neg_category_ids``,
``not_exhaustive_category_ids``, as pair keys ``image_index * K + category_index``), the
annotations' geometry (boxes; for ``iou_type="segm"`` also the masks as compressed RLE, with
the images' height / width), area, ignore and crowd flags. :func:`class_groups` gives each
category its r / c / f group and training counts (from the json, or from a training json).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ltdet.frequency import FREQ_GROUPS, frequency_from_counts

from .masks import MaskColumn, gt_masks

logger = logging.getLogger(__name__)


class GroundTruthFormatError(ValueError):
    """The ground-truth json is malformed; the message names the field / entry."""


@dataclass
class GroundTruth:
    """Ground truth as columns. Annotation arrays are in json order; for LVIS gt they hold only
    the annotations LVISEval evaluates (0 < area < inf)."""

    is_lvis: bool
    img_ids: np.ndarray  # int64 [I] sorted
    cat_ids: np.ndarray  # int64 [K] sorted
    categories: list  # [K] category dicts from the json, sorted by id
    ann_img: np.ndarray  # int64 [G] image index (into img_ids)
    ann_cat: np.ndarray  # int64 [G] category index (into cat_ids)
    ann_bbox: np.ndarray  # float64 [G, 4] xywh
    ann_area: np.ndarray  # float64 [G] the json's "area" (used for area ranges)
    ann_ignore: np.ndarray  # bool [G]
    ann_crowd: np.ndarray  # bool [G] (COCO iscrowd; always False for LVIS)
    neg_pairs: np.ndarray  # int64 image_index * K + category_index
    not_exhaustive_pairs: np.ndarray  # int64, same encoding
    ann_id: np.ndarray  # int64 [G] the json's annotation "id"
    source: str = "gt"
    img_hw: np.ndarray | None = None  # int64 [I, 2] height, width (loaded for iou_type "segm")
    ann_segm: MaskColumn | None = None  # [G] compressed RLE masks (iou_type "segm")


def _read_json(obj, what):
    if isinstance(obj, dict):
        return obj, what
    path = os.fspath(obj)
    try:
        with open(path) as f:
            return json.load(f), path
    except json.JSONDecodeError as e:
        raise GroundTruthFormatError(f"{path}: malformed json ({e})") from None


def _id_array(values, describe, field, error_cls=None):
    """json ids (a list) -> int64 [n]. Ids are integers: Python ``int`` (or a numpy integer, for
    in-memory dicts); ``bool``, ``float`` (even ``3.0``), ``str``, ``None`` ... raise ``error_cls``
    naming the first offending entry (``describe(i)``). The type test is one ``set(map(type, ...))``
    over the list (C speed); entries are only scanned on the error path."""
    error_cls = error_cls or GroundTruthFormatError
    types = set(map(type, values))
    if not types <= {int}:
        bad = {t for t in types if not (t is int or issubclass(t, np.integer))}
        if bad:
            i = next(i for i, v in enumerate(values) if type(v) in bad)
            v = values[i]
            raise error_cls(
                f"{describe(i)} has {field} {v!r} ({type(v).__name__}); ids are integers"
            )
    try:
        return np.array(values, dtype=np.int64).reshape(len(values))
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -(1 << 63) <= int(v) < (1 << 63))
        raise error_cls(
            f"{describe(i)} has {field} {values[i]!r}, outside the int64 range"
        ) from None


def _field_list(records, key, describe):
    """``[r[key] for r in records]``; a record that is not a dict or lacks ``key`` raises,
    naming it."""
    try:
        return [r[key] for r in records]
    except (KeyError, TypeError, IndexError):
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise GroundTruthFormatError(
                    f"{describe(i)} is a {type(r).__name__}, not a dict"
                ) from None
            if key not in r:
                raise GroundTruthFormatError(f"{describe(i)} misses {key!r}") from None
        raise


def load_ground_truth(gt: str | os.PathLike | dict, iou_type: str = "bbox") -> GroundTruth:
    """LVIS v1 or COCO json (path or dict) -> :class:`GroundTruth`; ``iou_type="segm"`` also
    reads the images' ``height`` / ``width`` and converts every annotation's ``segmentation``
    to compressed RLE (:func:`.masks.gt_masks`)."""
    doc, src = _read_json(gt, "gt")
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise GroundTruthFormatError(f"{src}: missing top-level key {key!r}")
    images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
    raw_img_ids = _id_array(
        _field_list(images, "id", lambda i: f"image #{i} in {src}"),
        lambda i: f"image #{i} in {src}",
        "id",
    )
    raw_cat_ids = _id_array(
        _field_list(cats, "id", lambda i: f"category #{i} in {src}"),
        lambda i: f"category #{i} ({cats[i].get('name')!r}) in {src}",
        "id",
    )
    lvis_fields = ("neg_category_ids", "not_exhaustive_category_ids")
    has = [all(k in im for k in lvis_fields) for im in images]
    is_lvis = bool(images) and all(has)
    if any(has) and not is_lvis:
        bad = images[has.index(False)]
        raise GroundTruthFormatError(
            f"{src}: image {bad.get('id')} lacks {lvis_fields} while other images have them; an "
            f"LVIS json needs both lists on every image (empty lists are fine)"
        )
    img_ids = np.sort(raw_img_ids)
    order = np.argsort(raw_cat_ids, kind="stable")
    cats = [cats[i] for i in order]
    cat_ids = raw_cat_ids[order]
    if np.unique(img_ids).size != img_ids.size or np.unique(cat_ids).size != cat_ids.size:
        raise GroundTruthFormatError(f"{src}: duplicate image or category ids")

    def ann_no(i):
        return f"annotation #{i} in {src}"

    def ann_named(i):
        return f"annotation id {anns[i].get('id')!r} in {src}"

    a_id = _id_array(_field_list(anns, "id", ann_no), ann_no, "id")
    a_img = _id_array(_field_list(anns, "image_id", ann_named), ann_named, "image_id")
    a_cat = _id_array(_field_list(anns, "category_id", ann_named), ann_named, "category_id")
    try:
        a_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
        a_area = np.array([a["area"] for a in anns], dtype=np.float64)
        if is_lvis:
            a_ign = np.array([bool(a.get("ignore", 0)) for a in anns], dtype=bool)
            a_crowd = np.zeros(len(anns), dtype=bool)
        else:
            # COCOeval overwrites any "ignore" field with iscrowd.
            a_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
            a_ign = a_crowd.copy()
    except (KeyError, TypeError, ValueError):
        for a in anns:
            missing = [k for k in ("bbox", "area") if k not in a]
            if missing or len(a["bbox"]) != 4:
                raise GroundTruthFormatError(
                    f"{src}: annotation id {a.get('id')} misses {missing or 'a 4-number bbox'}"
                ) from None
        raise GroundTruthFormatError(f"{src}: annotations do not convert to numbers") from None
    if np.unique(a_id).size != a_id.size:
        ids, counts = np.unique(a_id, return_counts=True)
        raise GroundTruthFormatError(
            f"{src}: annotation id {int(ids[counts > 1][0])} occurs {int(counts.max())} times "
            f"({int((counts > 1).sum())} such ids); annotation ids must be unique (lvis and "
            f"pycocotools index annotations by id and would evaluate copies of the last one)"
        )

    def describe(i):
        return f"{src}: annotation #{i} (id {anns[i].get('id')})"

    ann_img = index_of(img_ids, a_img, "image_id", describe, GroundTruthFormatError)
    ann_cat = index_of(cat_ids, a_cat, "category_id", describe, GroundTruthFormatError)

    img_hw = segm = None
    if iou_type == "segm":
        img_hw = _image_sizes(images, img_ids, raw_img_ids, src)
        segm = gt_masks(
            anns,
            ann_img,
            img_hw,
            lambda i: (
                f"{src}: annotation #{i} (id {anns[i].get('id')}, image_id {anns[i]['image_id']}, "
                f"category_id {anns[i]['category_id']})"
            ),
            GroundTruthFormatError,
        )
    neg = nel = np.zeros(0, np.int64)
    if is_lvis:
        neg = _image_category_pairs(images, "neg_category_ids", img_ids, cat_ids, src)
        nel = _image_category_pairs(images, "not_exhaustive_category_ids", img_ids, cat_ids, src)
        # LVISEval._prepare loads the gt through LVIS.get_ann_ids(img_ids, cat_ids), which keeps
        # only annotations with 0 < json "area" < inf (lvis/lvis.py:85-96; lvis/eval.py:64-66):
        # any other gt is dropped outright - not a gt, not an ignored region, and it does not make
        # its class "present" on the image for the federated filter. (COCOeval has no such
        # filter: pycocotools/cocoeval.py:96 calls getAnnIds without areaRng.)
        keep = (a_area > 0) & (a_area < np.inf)
        if not keep.all():
            logger.info(
                "%s: %d gt annotations with area <= 0 (or not finite) are not evaluated "
                "(as in lvis)",
                src,
                int((~keep).sum()),
            )
            ann_img, ann_cat, a_box, a_area, a_ign, a_crowd, a_id = (
                x[keep] for x in (ann_img, ann_cat, a_box, a_area, a_ign, a_crowd, a_id)
            )
            if segm is not None:
                segm = segm.take(np.flatnonzero(keep))
    return GroundTruth(
        is_lvis,
        img_ids,
        cat_ids,
        cats,
        ann_img,
        ann_cat,
        a_box,
        a_area,
        a_ign,
        a_crowd,
        neg,
        nel,
        a_id,
        src,
        img_hw,
        segm,
    )


def _image_sizes(images, img_ids, raw_img_ids, src) -> np.ndarray:
    """int64 [I, 2] (height, width) in sorted image order; masks are checked against them."""
    try:
        hw = np.array([[im["height"], im["width"]] for im in images], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        bad = next(
            im
            for im in images
            if not isinstance(im.get("height"), int) or not isinstance(im.get("width"), int)
        )
        raise GroundTruthFormatError(
            f"{src}: image {bad.get('id')!r} lacks an integer 'height' / 'width'; "
            f"iou_type='segm' needs both on every image (masks are checked against them)"
        ) from None
    out = np.zeros((len(img_ids), 2), np.int64)
    out[np.searchsorted(img_ids, raw_img_ids)] = hw.reshape(-1, 2)
    return out


def index_of(
    sorted_ids: np.ndarray,
    ids: np.ndarray,
    field: str,
    describe: Callable[[int], str],
    error_cls: type[Exception],
) -> np.ndarray:
    """Positions of ``ids`` in ``sorted_ids``; an unknown id raises ``error_cls`` naming the first
    offending entry (``describe(i)``)."""
    if len(sorted_ids) and 0 <= sorted_ids[0] and sorted_ids[-1] < 64 * len(sorted_ids) + (1 << 20):
        # Dense id -> position table: a gather instead of a binary search per entry.
        table = np.full(int(sorted_ids[-1]) + 2, -1, dtype=np.int64)
        table[sorted_ids] = np.arange(len(sorted_ids))
        pos = table[np.clip(ids, -1, len(table) - 1)]
        ok = pos >= 0
        pos = np.where(ok, pos, 0)
    else:
        pos = np.searchsorted(sorted_ids, ids).clip(max=max(len(sorted_ids) - 1, 0))
        ok = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise error_cls(
            f"{describe(i)}: {field} {int(ids[i])} is not in the ground truth "
            f"({int((~ok).sum())} such entries); evaluate against the json the detections are for"
        )
    return pos.astype(np.int64)


def _image_category_pairs(images, key, img_ids, cat_ids, src="gt"):
    """Flattened per-image category lists -> sorted unique pair keys; unknown category ids are
    dropped (no detection can carry them: those are rejected)."""
    K = len(cat_ids)
    lens = np.array([len(im[key]) for im in images], dtype=np.int64)
    ends = np.cumsum(lens)

    def describe(i):
        return f"image {images[int(np.searchsorted(ends, i, side='right'))]['id']} in {src}"

    flat = _id_array([c for im in images for c in im[key]], describe, f"{key} entry")
    img = np.repeat(np.searchsorted(img_ids, [im["id"] for im in images]), lens)
    pos = np.searchsorted(cat_ids, flat).clip(max=max(K - 1, 0))
    known = cat_ids[pos] == flat if K else np.zeros(flat.size, bool)
    return np.unique(img[known] * K + pos[known])


def training_counts(
    train: str | os.PathLike | dict, cat_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-category (image_count, instance_count) int64 [K] from a training json (path or dict)."""
    doc, src = _read_json(train, "train")
    anns = doc["annotations"]

    def describe(i):
        return f"annotation id {anns[i].get('id')!r} in {src}"

    a_img = _id_array(_field_list(anns, "image_id", describe), describe, "image_id")
    a_cat = _id_array(_field_list(anns, "category_id", describe), describe, "category_id")
    K = len(cat_ids)
    pos = np.searchsorted(cat_ids, a_cat).clip(max=max(K - 1, 0))
    known = cat_ids[pos] == a_cat if K else np.zeros(a_cat.size, bool)
    instances = np.bincount(pos[known], minlength=K)
    pairs = np.unique(np.stack([a_img[known], pos[known]], 1), axis=0)
    images = np.bincount(pairs[:, 1], minlength=K) if len(pairs) else np.zeros(K, np.int64)
    return images.astype(np.int64), instances.astype(np.int64)


@dataclass
class ClassGroups:
    """Per category (ground-truth order): r / c / f group (None when undefined) and training
    image / instance counts (int64 [K], -1 where the json lacks them; None when unknown)."""

    frequency: list
    image_count: np.ndarray | None
    instance_count: np.ndarray | None


def class_groups(gt: GroundTruth, train: Any = None) -> ClassGroups:
    """LVIS gt: the json's ``frequency`` (derived from training image counts where a category
    lacks it) and its ``image_count`` / ``instance_count``; COCO gt: groups from ``train``'s
    counts, or none. ``train`` (a training json) overrides the counts in both cases."""
    image_count: np.ndarray | None
    instance_count: np.ndarray | None
    if train is not None:
        image_count, instance_count = training_counts(train, gt.cat_ids)
    elif gt.is_lvis:
        image_count = np.array([c.get("image_count", -1) for c in gt.categories], np.int64)
        instance_count = np.array([c.get("instance_count", -1) for c in gt.categories], np.int64)
    else:
        image_count, instance_count = None, None
    if gt.is_lvis:
        freq = [c.get("frequency") for c in gt.categories]
        bad = [c["id"] for c, f in zip(gt.categories, freq) if f not in FREQ_GROUPS]
        if bad:
            if image_count is None or (image_count < 0).any():
                raise GroundTruthFormatError(
                    f"{gt.source}: categories {bad[:5]} have no 'frequency' in {FREQ_GROUPS}; "
                    f"add it or pass train= to derive it from training image counts"
                )
            freq = frequency_from_counts(image_count)
    elif image_count is not None:
        freq = frequency_from_counts(image_count)
    else:
        freq = [None] * len(gt.cat_ids)
        logger.warning("COCO-format gt without train=: APr/APc/APf are undefined (-1)")
    return ClassGroups(freq, image_count, instance_count)
