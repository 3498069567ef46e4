"""LVIS v1 and COCO detection data sets read through the official `lvis` / `pycocotools` APIs.

``dataset[i] -> (image, target)``:
  - ``image``: FloatTensor ``[3, H, W]`` in ``[0, 1]``, RGB (decoded with ``cv2.imread``), after the
    transforms (resize / flip);
  - ``target``: ``boxes`` float32 ``[K, 4]`` xyxy pixels of the transformed image, ``labels`` int64
    ``[K]`` in ``1..C`` (label ``i`` = ``cat_ids[i - 1]``, sorted json category ids; 0 is
    torchvision's background), ``image_id`` int, ``orig_size`` ``(h, w)`` of the file,
    ``scale`` float (resized / original: divide predicted boxes by it for original coordinates),
    ``flipped`` bool; with ``masks=True`` (Mask R-CNN) also ``masks`` uint8 ``[K, H, W]``, one
    per box, decoded as ``lvis.LVIS.ann_to_mask`` does (`ltdet.data.masks`) and moved by every
    transform with the boxes.

Index ``i`` is the ``i``-th image by sorted image id. COCO crowd annotations (``iscrowd=1``) are
not training targets and are dropped, as is done by torchvision's reference scripts.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
from lvis import LVIS
from pycocotools.coco import COCO

from .class_stats import ClassStats, FlatAnnotations, load_json_dict
from .masks import MASK_FIX, MaskError, decode_masks, segmentation_problem
from .transforms import ToTensor

logger = logging.getLogger(__name__)

__all__ = [
    "COCODetection",
    "CorruptImageError",
    "LVISDetection",
    "build_dataset",
    "detect_format",
    "label_to_cat_id_table",
    "truncation",
]


def label_to_cat_id_table(cat_ids: Sequence[int]) -> torch.Tensor:
    """The label -> json category id table of a data set whose sorted category ids are
    ``cat_ids``: int64 ``[C + 1]``, ``table[label] = cat_ids[label - 1]`` for labels ``1..C``
    and ``table[0] = -1`` (background is no category). Index it with a label tensor."""
    return torch.as_tensor([-1] + [int(c) for c in cat_ids], dtype=torch.int64)


class CorruptImageError(OSError):
    """An image file that cannot be decoded completely (corrupt, truncated, not an image)."""


_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def truncation(data: bytes) -> str | None:
    """Why `data` (a whole image file) is cut short, or None.

    libjpeg decodes the first part of a truncated JPEG without an error, filling the missing rows
    with grey, and only prints "Premature end of JPEG file" to stderr; OpenCV returns the image.
    So the end is checked: a JPEG ends with its EOI marker (allowing a few padding bytes after
    it), a PNG with its IEND chunk."""
    if data.startswith(_JPEG_SOI):
        # Valid JPEGs may carry data after their EOI (maker trailers, motion-photo videos):
        # without an EOI near the end, the decoder has the last word (PIL raises on truncation).
        if _JPEG_EOI not in data[-32:] and not _pil_decodes(data):
            return "a JPEG without its end-of-image marker (the file is truncated)"
    elif data.startswith(_PNG_SIGNATURE):
        if b"IEND" not in data[-16:]:
            return "a PNG without its IEND chunk (the file is truncated)"
    return None


def _pil_decodes(data: bytes) -> bool:
    from PIL import Image  # torchvision's dependency; only reached for unusual files

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except OSError:
        return False


class _LVISFromDict(LVIS):
    """`lvis.LVIS` whose constructor also accepts an already loaded dict (it only takes a path)."""

    def _load_json(self, path_or_dict):
        if isinstance(path_or_dict, Mapping):
            return path_or_dict
        return super()._load_json(path_or_dict)


class _JsonDetection(torch.utils.data.Dataset, abc.ABC):
    """Shared reader: flat validated annotations + image decoding; subclasses pick the json API."""

    def __init__(
        self,
        json: str | os.PathLike | Mapping,
        image_root: str | os.PathLike,
        transforms: Callable | None = None,
        filter_empty: bool = False,
        *,
        skip_invalid: bool = False,
        json_path: str | None = None,
        masks: bool = False,
    ):
        # json_path names an in-memory dict's source file in error messages.
        data, path = load_json_dict(json)
        path = path if path is not None else json_path
        self.json_path = path
        self.skip_invalid = skip_invalid
        self._corrupt_warned: set[int] = set()
        self.image_root = os.fspath(image_root)
        self.transforms = transforms
        flat = FlatAnnotations.from_dict(data, json_path=path, skip_invalid=skip_invalid)
        self.api = self._make_api(data)
        self.masks = bool(masks)
        if self.masks:
            flat = self._check_masks(flat)
        if filter_empty:
            keep = np.flatnonzero(np.diff(flat.ann_offsets) > 0)
            if keep.size == 0:
                raise ValueError(
                    f"annotation json {path or '<dict>'}: no image has an annotation, "
                    "so filter_empty=True leaves an empty data set"
                )
            flat = _subset(flat, keep)
        self.annotations = flat
        self.cat_ids = list(flat.cat_ids)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names = list(flat.class_names)
        self.image_ids = flat.image_ids.tolist()
        self.stats = ClassStats.from_flat(flat)
        self._to_tensor = ToTensor()

    def _check_masks(self, flat: FlatAnnotations) -> FlatAnnotations:
        """Every training annotation must carry a decodable mask of its image's size
        (`segmentation_problem`): the first that does not is an error naming the json, the
        annotation id and the fix; with ``skip_invalid`` the images holding such annotations
        are left out (one warning), before any statistic counts them."""
        where = self.json_path or "<in-memory dict>"
        bad_images: set[int] = set()
        first: tuple[Any, str] | None = None  # (annotation id, why) of the first bad one
        anns = self.api.anns
        heights = flat.heights[flat.ann_image_index].astype(np.int64)
        widths = flat.widths[flat.ann_image_index].astype(np.int64)
        for k, ann_id in enumerate(flat.ann_ids.tolist()):
            h, w = int(heights[k]), int(widths[k])
            why: str | None
            if h <= 0 or w <= 0:
                why = "its image has no 'height' / 'width' in the json to decode masks at"
            else:
                why = segmentation_problem(anns[ann_id].get("segmentation"), h, w)
            if why is None:
                continue
            if not self.skip_invalid:
                raise MaskError(
                    f"annotation id {ann_id} (image id "
                    f"{int(flat.image_ids[flat.ann_image_index[k]])}) in {where}: "
                    f"{why}; {MASK_FIX}"
                )
            bad_images.add(int(flat.ann_image_index[k]))
            first = first or (ann_id, why)
        if not bad_images:
            return flat
        assert first is not None  # set with the first bad image
        keep = np.setdiff1d(np.arange(flat.num_images), np.fromiter(bad_images, np.int64))
        if keep.size == 0:
            raise MaskError(
                f"annotation json {where}: no image has a valid mask for every box, "
                f"so data.skip_invalid leaves no training image (first: annotation "
                f"id {first[0]}: {first[1]})"
            )
        logger.warning(
            "%s: left out %d of %d images with boxes lacking a valid mask "
            "(data.skip_invalid); first: annotation id %d: %s",
            where,
            len(bad_images),
            flat.num_images,
            first[0],
            first[1],
        )
        return _subset(flat, keep)

    def load_masks(self, i: int) -> torch.Tensor:
        """uint8 ``[K, H, W]`` masks of image ``i``'s training annotations (json size)."""
        flat = self.annotations
        a, b = flat.ann_offsets[i], flat.ann_offsets[i + 1]
        anns = self.api.anns
        segs = [anns[k]["segmentation"] for k in flat.ann_ids[a:b].tolist()]
        return decode_masks(segs, int(flat.heights[i]), int(flat.widths[i]))

    @abc.abstractmethod
    def _make_api(self, data: dict):
        """The official json API object (``lvis.LVIS`` / ``pycocotools.coco.COCO``) over ``data``."""

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def aspect_ratios(self) -> torch.Tensor:
        """Width / height per image from the json (no decoding), float64 ``[N]``."""
        w, h = self.annotations.widths, self.annotations.heights
        if np.any(h <= 0) or np.any(w <= 0):
            k = int(np.flatnonzero((h <= 0) | (w <= 0))[0])
            raise ValueError(
                f"image id {self.image_ids[k]} in {self.json_path or '<dict>'} has "
                f"width {w[k]} / height {h[k]}; aspect-ratio grouping needs the "
                "'width' and 'height' fields of every image"
            )
        return torch.from_numpy(w / h)

    def image_labels(self, i: int) -> set[int]:
        """Labels (1..C) present on image ``i``, from the annotations (no decoding)."""
        a, b = self.annotations.ann_offsets[i], self.annotations.ann_offsets[i + 1]
        return set(self.annotations.ann_labels[a:b].tolist())

    def labels_to_cat_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Map labels ``1..C`` back to json category ids (for writing detections); see
        `label_to_cat_id_table`."""
        return label_to_cat_id_table(self.cat_ids).to(labels.device)[labels.long()]

    def image_path(self, i: int) -> str:
        """File of image ``i``: ``image_root/file_name``; LVIS v1 has only ``coco_url``, whose
        last two parts (``train2017/xxx.jpg``) are tried under ``image_root`` and then its
        basename alone (LVIS v1 val mixes COCO train2017 and val2017 images)."""
        info = self.api.imgs[self.image_ids[i]]
        if "file_name" in info:
            return os.path.join(self.image_root, info["file_name"])
        if "coco_url" not in info:
            raise ValueError(
                f"image id {self.image_ids[i]} in {self.json_path or '<dict>'} has "
                "neither 'file_name' nor 'coco_url'; add one of them"
            )
        split, base = info["coco_url"].split("/")[-2:]
        candidates = [
            os.path.join(self.image_root, split, base),
            os.path.join(self.image_root, base),
        ]
        return next((p for p in candidates if os.path.isfile(p)), candidates[0])

    def load_image(self, i: int) -> np.ndarray:
        """Decoded image ``i`` as HWC uint8 RGB."""
        path = self.image_path(i)
        image_id = self.image_ids[i]
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"image file {path!r} (image id {image_id}, json {self.json_path or '<dict>'}) "
                f"does not exist; check that image_root {self.image_root!r} holds the images "
                "(see docs/data.md for the layout)"
            )
        # Raw pixel order first, as torchvision's COCO reference (PIL without EXIF transpose)
        # reads COCO; a file whose json size matches only its EXIF-rotated view is read rotated.
        with open(path, "rb") as f:
            data = f.read()
        fix = (
            "re-download it, remove the image from the json, or set data.skip_invalid: true "
            "to skip it"
        )
        cut = truncation(data)
        if cut is not None:
            raise CorruptImageError(
                f"image file {path!r} (image id {image_id}) is corrupt: {cut}; {fix}"
            )
        buffer = np.frombuffer(data, np.uint8)
        bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise CorruptImageError(
                f"could not decode image file {path!r} (image id "
                f"{image_id}): the file is corrupt or not an image; {fix}"
            )
        jw, jh = self.annotations.widths[i], self.annotations.heights[i]
        if jw > 0 and jh > 0 and bgr.shape[:2] != (jh, jw):
            rotated = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
            if rotated is not None and rotated.shape[:2] == (jh, jw):
                bgr = rotated
            else:
                h, w = bgr.shape[:2]
                raise ValueError(
                    f"image file {path!r} (image id {image_id}) decodes to {w}x{h} but the json "
                    f"says {int(jw)}x{int(jh)}; the boxes would be misplaced - fix the json's "
                    "width/height or the image file"
                )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _load_or_substitute(self, i: int):
        """(index, image): image `i`, or under `skip_invalid` the next image that decodes, with
        one warning per corrupt file (the batch keeps its size; the corrupt image is never
        trained on)."""
        for k in range(len(self)):
            j = (i + k) % len(self)
            try:
                return j, self.load_image(j)
            except CorruptImageError as e:
                if not self.skip_invalid:
                    raise
                if j not in self._corrupt_warned:
                    self._corrupt_warned.add(j)
                    logger.warning(
                        "%s; skipped (data.skip_invalid): the next image that "
                        "decodes takes its place in the batch",
                        e,
                    )
        raise CorruptImageError(f"no image of {self.json_path or '<dict>'} decodes")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        i, image = self._load_or_substitute(i)
        flat = self.annotations
        a, b = flat.ann_offsets[i], flat.ann_offsets[i + 1]
        xywh = flat.ann_boxes[a:b]
        h, w = image.shape[:2]
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        # COCO boxes can overhang the image by a fraction of a pixel; keep them inside.
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        target = {
            "boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4),
            "labels": torch.from_numpy(flat.ann_labels[a:b].astype(np.int64)),
            "image_id": int(self.image_ids[i]),
            "orig_size": (int(h), int(w)),
            "scale": 1.0,
            "flipped": False,
        }
        if self.masks:
            target["masks"] = self.load_masks(i)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if isinstance(image, np.ndarray):
            image, target = self._to_tensor(image, target)
        return image, target


def _subset(flat: FlatAnnotations, keep: np.ndarray) -> FlatAnnotations:
    """`flat` restricted to image indices ``keep`` (sorted), annotations re-indexed."""
    counts = np.diff(flat.ann_offsets)[keep]
    new_index = np.full(flat.num_images, -1, np.int64)
    new_index[keep] = np.arange(keep.size)
    ann_keep = new_index[flat.ann_image_index] >= 0
    offsets = np.zeros(keep.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return FlatAnnotations(
        image_ids=flat.image_ids[keep],
        widths=flat.widths[keep],
        heights=flat.heights[keep],
        cat_ids=flat.cat_ids,
        class_names=flat.class_names,
        ann_ids=flat.ann_ids[ann_keep],
        ann_image_index=new_index[flat.ann_image_index[ann_keep]],
        ann_labels=flat.ann_labels[ann_keep],
        ann_boxes=flat.ann_boxes[ann_keep],
        ann_offsets=offsets,
        json_path=flat.json_path,
        frequency=flat.frequency,
    )


class LVISDetection(_JsonDetection):
    """LVIS v1 json (read through `lvis.LVIS`) + image root (the COCO image folder)."""

    def _make_api(self, data: dict):
        return _LVISFromDict(data)


class COCODetection(_JsonDetection):
    """COCO-format json (read through `pycocotools.coco.COCO`) + image root."""

    def _make_api(self, data: dict):
        api = COCO()
        api.dataset = data
        # createIndex prints progress to stdout; library code stays quiet (one line per rank).
        with contextlib.redirect_stdout(io.StringIO()):
            api.createIndex()
        return api


def detect_format(data: Mapping) -> str:
    """'lvis' when images carry LVIS's federated fields or categories carry ``frequency``, or
    images have only ``coco_url``; else 'coco'."""
    images = data.get("images", [])
    first = images[0] if images else {}
    cats = data.get("categories", [])
    if (
        "neg_category_ids" in first
        or "not_exhaustive_category_ids" in first
        or (cats and "frequency" in cats[0])
        or ("coco_url" in first and "file_name" not in first)
    ):
        return "lvis"
    return "coco"


def build_dataset(
    json: str | os.PathLike | Mapping,
    image_root: str | os.PathLike,
    format: str = "auto",
    transforms: Callable | None = None,
    **kwargs: Any,
) -> LVISDetection | COCODetection:
    """`LVISDetection` or `COCODetection` for ``format`` in auto | lvis | coco; ``kwargs`` go to
    the constructor (``filter_empty``, ``skip_invalid``, ``masks``)."""
    data, path = load_json_dict(json)
    fmt = detect_format(data) if format == "auto" else format
    classes: dict[str, type[LVISDetection] | type[COCODetection]] = {
        "lvis": LVISDetection,
        "coco": COCODetection,
    }
    if fmt not in classes:
        raise ValueError(f"data.format must be one of auto, lvis, coco; got {format!r}")
    return classes[fmt](data, image_root, transforms, json_path=path, **kwargs)
