"""Detections -> flat columns, validated against the ground truth's ids.

The evaluator never holds one Python object per detection longer than one parse chunk: an LVIS v1
val result file has ~6M result dicts, and a list of dicts costs ~450 bytes each (the official
`lvis` package keeps several copies). Everything here returns :class:`DetColumns` - flat arrays,
one row per detection, in input order:

- ``image_id`` int64 [N]
- ``category_id`` int64 [N]
- ``bbox`` float64 [N, 4] ``x, y, w, h`` in original image pixels (the LVIS / COCO result format;
  zeros for ``iou_type="segm"``, which does not read boxes)
- ``score`` float64 [N]
- ``segm`` (``iou_type="segm"`` only): :class:`.masks.MaskColumn`, the compressed RLE strings
  back to back with their sizes

Accepted inputs (``load_detections``): a path to a result json (a list of
``{"image_id", "category_id", "bbox", "score"}``; for segm ``"segmentation": {"size": [h, w],
"counts": str}`` instead of, or beside, ``bbox``), the same list in memory, or a list of per-image
dicts of tensors ``{"image_id": int, "boxes": [K, 4] xyxy, "scores": [K], "category_ids": [K]}``
as the training loop produces them (for segm: ``"masks"`` [K, 1, H, W] probabilities, encoded at
0.5 as torchvision's references do; ``"boxes"`` optional).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np
import torch

from .masks import (
    RLE_FIX,
    MaskColumn,
    bad_characters,
    concat_mask_columns,
    empty_mask_column,
    encode_tensor_masks,
    mask_column,
)

logger = logging.getLogger(__name__)

RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
TENSOR_KEYS = ("image_id", "boxes", "scores", "category_ids")
SEGM_TENSOR_KEYS = ("image_id", "masks", "scores", "category_ids")
MIXED_FIX = (
    "the results mix box-only and mask entries: iou_type='segm' needs a compressed RLE "
    "'segmentation' on every result (evaluate box-only results with iou_type='bbox')"
)

# Decode chunks of about this many bytes: the chunk's structs (about 2.5x the text) stay a few MB,
# below the noise of the peak memory, and the per-chunk overhead is negligible (docs/evaluation.md,
# "Reading result files").
_CHUNK_BYTES = 1 << 20
# A cut between two top-level objects: "}" "," then "{" (a nested object, such as a
# segmentation dict, is followed by "," and a key, or by "}").
_BOUNDARY = re.compile(rb"\}\s*,(?=\s*\{)")
_SPACE = re.compile(rb"\s*")
_EMPTY_REST = re.compile(rb"\s*\]\s*\Z")


class DetectionFormatError(ValueError):
    """A detection entry (or the result file) is malformed; the message names the entry."""


@dataclass
class DetColumns:
    image_id: np.ndarray  # int64 [N]
    category_id: np.ndarray  # int64 [N]
    bbox: np.ndarray  # float64 [N, 4] xywh
    score: np.ndarray  # float64 [N]
    source: str = "detections"  # names the input in error messages
    segm: MaskColumn | None = None  # iou_type "segm": compressed RLE masks [N]

    def __len__(self):
        return int(self.score.shape[0])

    def entry(self, i: int) -> dict:
        """Detection ``i`` as a result dict, for error messages (a mask's counts shortened)."""
        d: dict[str, Any] = {
            "image_id": int(self.image_id[i]),
            "category_id": int(self.category_id[i]),
        }
        if self.segm is None:
            d["bbox"] = [float(v) for v in self.bbox[i]]
        else:
            c = self.segm.string(i).decode("ascii", "replace")
            d["segmentation"] = {
                "size": self.segm.size[i].tolist(),
                "counts": c if len(c) <= 24 else c[:20] + "...",
            }
        d["score"] = float(self.score[i])
        return d


def empty_columns(source: str = "detections", iou_type: str = "bbox") -> DetColumns:
    return DetColumns(
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        np.zeros((0, 4)),
        np.zeros(0),
        source,
        empty_mask_column() if iou_type == "segm" else None,
    )


def load_detections(
    dets: str | os.PathLike | DetColumns | list | tuple,
    source: str | None = None,
    iou_type: str = "bbox",
) -> DetColumns:
    """Any accepted detection input -> validated-shape :class:`DetColumns` (ids not yet checked).
    ``iou_type="segm"`` reads the masks (every entry needs one) instead of the boxes."""
    segm = iou_type == "segm"
    if isinstance(dets, (str, os.PathLike)):
        cols = _load_result_json(os.fspath(dets), segm)
    elif isinstance(dets, DetColumns):
        cols = dets
        if segm and cols.segm is None:
            raise DetectionFormatError(f"{cols.source}: columns without masks; {MIXED_FIX}")
    elif isinstance(dets, (list, tuple)):
        if len(dets) == 0:
            cols = empty_columns(iou_type=iou_type)
        elif isinstance(dets[0], dict) and ("boxes" in dets[0] or "masks" in dets[0]):
            cols = _columns_from_tensors(dets, segm)
        else:
            cols = _columns_from_result_dicts(dets, source=source or "detections", segm=segm)
    else:
        raise TypeError(
            f"dets must be a result json path, a list of result dicts or a list of per-image "
            f"tensor dicts {TENSOR_KEYS}; got {type(dets).__name__}"
        )
    if source is not None:
        cols.source = source
    _check_values(cols)
    return cols


def _load_result_json(path: str, segm: bool = False) -> DetColumns:
    """Parse a result json straight to columns, one chunk of the top-level list at a time.

    The list is cut after a ``}`` that is followed by ``,``; each chunk is decoded by msgspec
    into typed structs (ids must be json integers, ``bbox`` four numbers, ``score`` a number;
    other keys are skipped) and turned into columns, so at most one chunk's objects exist at a
    time. Anything the typed decoder refuses (a wrong type, a missing key, ``NaN``, malformed
    json), a cut that lands inside a nested object or a string, or an id outside int64, sends the
    whole file to the json module and the dict path, whose errors name the entry (or give json's
    own message with line and column).

    The file is memory-mapped and the pages of the chunks already decoded are released
    (``MADV_DONTNEED``), so the text does not stay resident; a segm file's RLE strings are copied
    into one buffer sized by the file (pages never written are never resident).
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise DetectionFormatError(f"{path}: malformed json (empty file)")
        text = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse_result_text(path, text, segm)
    finally:
        text.close()


def _parse_result_text(path: str, text: mmap.mmap, segm: bool) -> DetColumns:
    space = _SPACE.match(text)
    start = space.end() if space is not None else 0
    if text[start : start + 1] != b"[":
        try:
            doc = json.loads(text[:])
        except json.JSONDecodeError as e:
            raise DetectionFormatError(f"{path}: malformed json ({e})") from None
        raise DetectionFormatError(
            f"{path}: a result file must hold a json list of {{{', '.join(RESULT_KEYS)}}} dicts, "
            f"got a {type(doc).__name__}"
        )
    if _EMPTY_REST.match(text, start + 1):
        return empty_columns(path, "segm" if segm else "bbox")
    parts = []
    decoder, to_columns = (
        (_SEGM_DECODER, _columns_from_segm_structs) if segm else (_DECODER, _columns_from_structs)
    )
    n = 0
    # segm: every chunk's strings go straight into one buffer (the strings are shorter than
    # the file), so the column is never concatenated (a second copy) at the end.
    counts = np.empty(len(text), np.uint8) if segm else None
    n_bytes = 0
    try:
        for piece in _list_chunks(text, start + 1):
            part = to_columns(decoder.decode(piece), path, n)
            if segm:
                m = part.segm
                assert m is not None and counts is not None  # segm chunks carry masks
                counts[n_bytes : n_bytes + m.counts.size] = m.counts
                part.segm = MaskColumn(np.zeros(0, np.uint8), m.offsets + n_bytes, m.size)
                n_bytes += m.counts.size
            parts.append(part)
            n += len(part)
    except (_NotChunkable, msgspec.DecodeError, OverflowError, _NotRle):
        return _load_result_json_whole(path, text[:], segm)
    if not segm:
        return _concat(parts, path)
    masks = [p.segm for p in parts if p.segm is not None]
    assert counts is not None and len(masks) == len(parts)  # every segm chunk carries masks
    offsets = np.concatenate([masks[0].offsets[:1]] + [m.offsets[1:] for m in masks])
    size = np.concatenate([m.size for m in masks])
    image_id = np.concatenate([p.image_id for p in parts])
    category_id = np.concatenate([p.category_id for p in parts])
    score = np.concatenate([p.score for p in parts])
    del parts
    # np.zeros: pages that are only read stay unallocated (segm never reads boxes).
    return DetColumns(
        image_id,
        category_id,
        np.zeros((n, 4)),
        score,
        path,
        MaskColumn(counts[:n_bytes], offsets, size),
    )


class _ResultStruct(msgspec.Struct, gc=False):
    """One result dict as msgspec decodes it (``gc=False``: no cycles, no GC tracking)."""

    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    score: float


_DECODER = msgspec.json.Decoder(list[_ResultStruct])


class _RleStruct(msgspec.Struct, gc=False):
    size: tuple[int, int]
    counts: str


class _SegmResultStruct(msgspec.Struct, gc=False):
    """A segm result: ``bbox`` (and any other key) is skipped; a missing ``segmentation`` is
    None (named by :func:`_columns_from_segm_structs`)."""

    image_id: int
    category_id: int
    score: float
    segmentation: _RleStruct | None = None


_SEGM_DECODER = msgspec.json.Decoder(list[_SegmResultStruct])


_NO_BOXES = np.zeros((0, 4))  # chunk columns of a segm file: boxes are made once, at the end


class _NotRle(Exception):
    """A chunk holds a string that is not ASCII: the dict path names the entry."""


class _NotChunkable(Exception):
    """The top-level list cannot be cut into chunks of whole objects."""


def _list_chunks(text: bytes | mmap.mmap, pos: int):
    """``[obj, obj, ...]`` of about ``_CHUNK_BYTES`` each from the list body starting at ``pos``
    (cut at a ``}`` ``,`` ``{`` boundary; the last piece runs to the closing ``]``)."""
    end = len(text)
    close = text.rfind(b"]")
    if close < pos or text[close + 1 :].strip():
        raise _NotChunkable
    released = 0
    while True:
        cut = (
            _BOUNDARY.search(text, pos + _CHUNK_BYTES, close) if pos + _CHUNK_BYTES < end else None
        )
        if cut is None:
            yield b"[" + text[pos:close] + b"]"
            return
        yield b"[" + text[pos : cut.start() + 1] + b"]"
        pos = cut.end()
        page = pos - pos % mmap.PAGESIZE
        if isinstance(text, mmap.mmap) and page - released >= _CHUNK_BYTES:
            # Decoded: drop those file pages from the resident set (re-read if touched again).
            text.madvise(mmap.MADV_DONTNEED, released, page - released)
            released = page


def _columns_from_segm_structs(items: list, source: str, base: int = 0) -> DetColumns:
    """Decoded segm structs -> columns; an entry without a mask raises, naming it."""
    n = len(items)
    segs = list(map(attrgetter("segmentation"), items))
    if None in segs:
        i = segs.index(None)
        d = items[i]
        raise DetectionFormatError(
            f"{source}: detection #{base + i} (image_id {d.image_id}, category_id "
            f"{d.category_id}) has no 'segmentation'; {MIXED_FIX}"
        )
    try:
        masks = mask_column(
            list(map(attrgetter("counts"), segs)),
            np.fromiter(chain.from_iterable(map(attrgetter("size"), segs)), np.int64, 2 * n),
        )
    except ValueError:
        raise _NotRle from None
    return DetColumns(
        np.fromiter(map(attrgetter("image_id"), items), np.int64, n),
        np.fromiter(map(attrgetter("category_id"), items), np.int64, n),
        _NO_BOXES,
        np.fromiter(map(attrgetter("score"), items), np.float64, n),
        source,
        masks,
    )


def _columns_from_structs(items: list, source: str, base: int = 0) -> DetColumns:
    """Decoded structs -> columns (ids already checked to be integers by the decoder; one outside
    int64 raises OverflowError)."""
    n = len(items)
    image_id = np.fromiter(map(attrgetter("image_id"), items), np.int64, n)
    category_id = np.fromiter(map(attrgetter("category_id"), items), np.int64, n)
    score = np.fromiter(map(attrgetter("score"), items), np.float64, n)
    bbox = np.fromiter(
        chain.from_iterable(map(attrgetter("bbox"), items)), np.float64, 4 * n
    ).reshape(n, 4)
    return DetColumns(image_id, category_id, bbox, score, source)


def _load_result_json_whole(path, text, segm=False) -> DetColumns:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DetectionFormatError(f"{path}: malformed json ({e})") from None
    if not isinstance(doc, list):
        raise DetectionFormatError(f"{path}: a result file must hold a json list of result dicts")
    return _columns_from_result_dicts(doc, source=path, segm=segm)


def _concat(parts, source) -> DetColumns:
    if not parts:
        return empty_columns(source)
    segm = None if parts[0].segm is None else concat_mask_columns([p.segm for p in parts])
    return DetColumns(
        np.concatenate([p.image_id for p in parts]),
        np.concatenate([p.category_id for p in parts]),
        np.concatenate([p.bbox for p in parts]),
        np.concatenate([p.score for p in parts]),
        source,
        segm,
    )


def _columns_from_result_dicts(items, source: str, segm: bool = False) -> DetColumns:
    """List of LVIS/COCO result dicts -> columns; errors name the entry by its position."""
    if segm:
        return _columns_from_segm_dicts(items, source)
    try:
        image_id = [d["image_id"] for d in items]
        category_id = [d["category_id"] for d in items]
        score = np.array([d["score"] for d in items], dtype=np.float64)
        bbox = np.array([d["bbox"] for d in items], dtype=np.float64).reshape(len(items), 4)
    except (KeyError, TypeError, ValueError):
        _raise_bad_result_dict(items, source)
    image_id = _int_ids(image_id, "image_id", items, source)
    category_id = _int_ids(category_id, "category_id", items, source)
    return DetColumns(image_id, category_id, bbox, score, source)


def _columns_from_segm_dicts(items, source: str) -> DetColumns:
    """Segm result dicts -> columns; an entry without a compressed RLE ``segmentation``, or
    with a malformed one, raises naming it (position, image_id, category_id) and the fix."""

    def name(i):
        d = items[i]
        return (
            f"{source}: detection #{i} (image_id {d.get('image_id')!r}, category_id "
            f"{d.get('category_id')!r})"
        )

    for i, d in enumerate(items):
        if not isinstance(d, dict):
            raise DetectionFormatError(
                f"{source}: detection #{i} is a {type(d).__name__}, expected a result dict"
            )
        seg = d.get("segmentation")
        if seg is None:
            raise DetectionFormatError(f"{name(i)} has no 'segmentation'; {MIXED_FIX}")
        if isinstance(seg, list):
            raise DetectionFormatError(
                f"{name(i)}: 'segmentation' is a polygon list; segm results must be compressed "
                f"RLE (as lvis and pycocotools require): {RLE_FIX}"
            )
        if not (
            isinstance(seg, dict)
            and isinstance(seg.get("counts"), (str, bytes))
            and isinstance(seg.get("size"), (list, tuple))
            and len(seg["size"]) == 2
            and all(type(v) is int or isinstance(v, np.integer) for v in seg["size"])
        ):
            raise DetectionFormatError(
                f"{name(i)}: 'segmentation' must be a compressed RLE {{'size': [height, width], "
                f"'counts': str}}, got {_short(seg)}: {RLE_FIX}"
            )
        for k in ("image_id", "category_id", "score"):
            if k not in d:
                raise DetectionFormatError(f"{name(i)} misses key {k!r}")
    try:
        score = np.array([d["score"] for d in items], dtype=np.float64).reshape(len(items))
    except (TypeError, ValueError):
        i = next(i for i, d in enumerate(items) if not isinstance(d["score"], (int, float)))
        raise DetectionFormatError(f"{name(i)}: score must be a number") from None
    try:
        masks = mask_column(
            [d["segmentation"]["counts"] for d in items], [d["segmentation"]["size"] for d in items]
        )
    except ValueError as e:
        i = int(str(e)[1:].split(":")[0])
        raise DetectionFormatError(
            f"{name(i)}: 'segmentation' counts hold non-ASCII "
            f"characters, not a compressed RLE: {RLE_FIX}"
        ) from None
    image_id = _int_ids([d["image_id"] for d in items], "image_id", items, source)
    category_id = _int_ids([d["category_id"] for d in items], "category_id", items, source)
    return DetColumns(image_id, category_id, np.zeros((len(items), 4)), score, source, masks)


def _short(v, n=60):
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _is_int_type(t) -> bool:
    """``int`` or a numpy integer; not ``bool`` (a subclass of int), float (even 3.0), str..."""
    return t is int or issubclass(t, np.integer)


def _int_ids(values, name, items, source):
    """A list of ids from result dicts -> int64 [n]; a non-integer id raises naming the entry.
    One ``set(map(type, values))`` (C speed); entries are scanned only on the error path."""
    types = set(map(type, values))
    if not types <= {int}:
        bad = {t for t in types if not _is_int_type(t)}
        if bad:
            i = next(i for i, v in enumerate(values) if type(v) in bad)
            v = values[i]
            raise DetectionFormatError(
                f"{source}: detection #{i} {items[i]!r}: {name} must be an integer, got "
                f"{v!r} ({type(v).__name__}); ids are integers"
            )
    try:
        return np.array(values, dtype=np.int64).reshape(len(values))
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -(1 << 63) <= int(v) < (1 << 63))
        raise DetectionFormatError(
            f"{source}: detection #{i} {items[i]!r}: {name} {values[i]} is outside the int64 range"
        ) from None


def _raise_bad_result_dict(items, source):
    """Find and name the first entry that does not convert (only runs on the error path)."""
    for i, d in enumerate(items):
        problem = None
        if not isinstance(d, dict):
            problem = f"is a {type(d).__name__}, expected a dict with keys {RESULT_KEYS}"
        elif any(k not in d for k in RESULT_KEYS):
            problem = f"misses key(s) {[k for k in RESULT_KEYS if k not in d]}"
        else:
            try:
                for k in ("image_id", "category_id", "score"):
                    float(d[k])
                box = [float(v) for v in d["bbox"]]
                if len(box) != 4:
                    problem = f"bbox must be [x, y, w, h], got {len(box)} numbers"
            except (TypeError, ValueError):
                problem = "holds a non-numeric image_id / category_id / score / bbox value"
        if problem:
            raise DetectionFormatError(f"{source}: detection #{i} {d!r} {problem}")
    raise DetectionFormatError(f"{source}: detections do not convert to numeric columns")


def _columns_from_tensors(items, segm: bool = False) -> DetColumns:
    """Per-image tensor dicts (xyxy boxes; for segm masks, encoded here) -> columns."""
    keys = SEGM_TENSOR_KEYS if segm else TENSOR_KEYS
    ids, cats, boxes, scores, masks = [], [], [], [], []
    for n, d in enumerate(items):
        missing = [k for k in keys if k not in d]
        if missing:
            why = f" ({MIXED_FIX})" if segm and "masks" in missing else ""
            raise DetectionFormatError(
                f"detections[{n}] (per-image tensor dict) misses key(s) {missing}; expected "
                f"{keys}{why}"
            )
        s = torch.as_tensor(d["scores"]).detach().to("cpu", torch.float64).reshape(-1)
        c = torch.as_tensor(d["category_ids"]).detach().to("cpu").reshape(-1)
        if segm and "boxes" not in d:
            b = torch.zeros(s.shape[0], 4, dtype=torch.float64)
        else:
            b = torch.as_tensor(d["boxes"]).detach().to("cpu", torch.float64)
        if b.numel() == 0:  # an image without detections may come as an empty [0] tensor
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] != s.shape[0] or c.shape[0] != s.shape[0]:
            raise DetectionFormatError(
                f"detections[{n}] (image_id {d['image_id']!r}): boxes must be [K, 4] and "
                f"scores / category_ids [K]; got {tuple(b.shape)}, {tuple(s.shape)}, "
                f"{tuple(c.shape)}"
            )
        if not _is_int_dtype(c.dtype):
            raise DetectionFormatError(
                f"detections[{n}] (image_id {d['image_id']!r}): category_ids must be an integer "
                f"tensor, got {c.dtype}; ids are integers"
            )
        ids.append(np.full(s.shape[0], _tensor_dict_image_id(d["image_id"], n), np.int64))
        cats.append(c.to(torch.int64).numpy())
        if segm:
            m = torch.as_tensor(d["masks"])
            shape_ok = (m.ndim == 4 and m.shape[1] == 1) or m.ndim == 3
            if not shape_ok or m.shape[0] != s.shape[0]:
                if m.numel() == 0 and s.shape[0] == 0:
                    m = m.reshape(0, 1, 0, 0)
                else:
                    raise DetectionFormatError(
                        f"detections[{n}] (image_id {d['image_id']!r}): masks must be "
                        f"[K, 1, H, W] (or [K, H, W]) with K = {s.shape[0]} scores; got "
                        f"{tuple(m.shape)}"
                    )
            rles = encode_tensor_masks(m)
            masks.append(mask_column([r["counts"] for r in rles], [r["size"] for r in rles]))
        xywh = b.clone()
        xywh[:, 2:] = b[:, 2:] - b[:, :2]
        boxes.append(xywh.numpy())
        scores.append(s.numpy())
    return DetColumns(
        np.concatenate(ids),
        np.concatenate(cats),
        np.concatenate(boxes).reshape(-1, 4),
        np.concatenate(scores),
        "detections",
        concat_mask_columns(masks) if segm else None,
    )


def _is_int_dtype(dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _tensor_dict_image_id(v, n) -> int:
    """A per-image dict's ``image_id``: an int, numpy integer or one-element integer tensor."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and _is_int_dtype(v.dtype):
            return int(v)
    elif _is_int_type(type(v)):
        return int(v)
    raise DetectionFormatError(
        f"detections[{n}] (per-image tensor dict): image_id must be an integer, got {v!r} "
        f"({type(v).__name__}); ids are integers"
    )


def _check_values(cols: DetColumns):
    """NaN / negative scores and negative-size or non-finite boxes are errors, named by entry."""
    checks = (
        (~(cols.score >= 0), "score must be a finite number >= 0"),
        (~np.isfinite(cols.score), "score must be a finite number >= 0"),
        (~np.isfinite(cols.bbox).all(axis=1), "bbox holds a non-finite value"),
        ((cols.bbox[:, 2:] < 0).any(axis=1), "bbox has negative width or height (expected xywh)"),
    )
    for bad, why in checks:
        idx = np.flatnonzero(bad)
        if idx.size:
            i = int(idx[0])
            raise DetectionFormatError(
                f"{cols.source}: detection #{i} {cols.entry(i)}: {why} ({idx.size} such entries)"
            )
    if cols.segm is not None:
        if len(cols.segm) != len(cols):
            raise DetectionFormatError(
                f"{cols.source}: {len(cols.segm)} masks for {len(cols)} detections"
            )
        # One pass over the bytes; full validity (whole tokens, counts adding up to h * w) is
        # checked on the detections that are evaluated (ltdet.evaluation.prepare).
        bad = bad_characters(cols.segm)
        if bad.size:
            i = int(bad[0])
            raise DetectionFormatError(
                f"{cols.source}: detection #{i} {cols.entry(i)}: 'segmentation' counts is not a "
                f"compressed RLE string (empty, or a character outside '0'..'o'; {bad.size} such "
                f"entries): {RLE_FIX}"
            )
