"""Detections -> flat columns, validated against the ground truth's ids.

The evaluator never holds one Python object per detection longer than one parse chunk: an LVIS v1
val result file has ~6M result dicts, and a list of dicts costs ~450 bytes each (the official
`lvis` package keeps several copies). Everything here returns :class:`DetColumns` - five flat
arrays, one row per detection, in input order:

- ``image_id`` int64 [N]
- ``category_id`` int64 [N]
- ``bbox`` float64 [N, 4] ``x, y, w, h`` in original image pixels (the LVIS / COCO result format)
- ``score`` float64 [N]

Accepted inputs (``load_detections``): a path to a result json (a list of
``{"image_id", "category_id", "bbox", "score"}``), the same list in memory, or a list of per-image
dicts of tensors ``{"image_id": int, "boxes": [K, 4] xyxy, "scores": [K], "category_ids": [K]}``
as the training loop produces them.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
TENSOR_KEYS = ("image_id", "boxes", "scores", "category_ids")

# Parse chunks of about this many bytes: big enough that json's C scanner dominates, small enough
# that the chunk's dicts (about 5x the text) stay a few tens of MB.
_CHUNK_BYTES = 4 << 20
_AFTER_OBJECT = re.compile(rb"\s*([,\]])")


class DetectionFormatError(ValueError):
    """A detection entry (or the result file) is malformed; the message names the entry."""


@dataclass
class DetColumns:
    image_id: np.ndarray  # int64 [N]
    category_id: np.ndarray  # int64 [N]
    bbox: np.ndarray  # float64 [N, 4] xywh
    score: np.ndarray  # float64 [N]
    source: str = "detections"  # names the input in error messages

    def __len__(self):
        return int(self.score.shape[0])

    def entry(self, i: int) -> dict:
        """Detection ``i`` as a result dict, for error messages."""
        return {
            "image_id": int(self.image_id[i]),
            "category_id": int(self.category_id[i]),
            "bbox": [float(v) for v in self.bbox[i]],
            "score": float(self.score[i]),
        }


def empty_columns(source="detections") -> DetColumns:
    return DetColumns(
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), source
    )


def load_detections(dets, source=None) -> DetColumns:
    """Any accepted detection input -> validated-shape :class:`DetColumns` (ids not yet checked)."""
    if isinstance(dets, (str, os.PathLike)):
        cols = _load_result_json(os.fspath(dets))
    elif isinstance(dets, DetColumns):
        cols = dets
    elif isinstance(dets, (list, tuple)):
        if len(dets) == 0:
            cols = empty_columns()
        elif isinstance(dets[0], dict) and "boxes" in dets[0]:
            cols = _columns_from_tensors(dets)
        else:
            cols = _columns_from_result_dicts(dets, offset=0, source=source or "detections")
    else:
        raise TypeError(
            f"dets must be a result json path, a list of result dicts or a list of per-image "
            f"tensor dicts {TENSOR_KEYS}; got {type(dets).__name__}"
        )
    if source is not None:
        cols.source = source
    _check_values(cols)
    return cols


def _load_result_json(path: str) -> DetColumns:
    """Parse a result json straight to columns, one chunk of the top-level list at a time.

    The list is cut after a ``}`` that is followed by ``,``. A chunk whose objects all have the
    first object's keys in the same order with plain numbers as values (what every detector's
    json writer produces) is read as a numeric table (:func:`_parse_uniform_chunk`, ~2x faster
    than building dicts); any other chunk is parsed with the json module. A cut that lands inside a
    nested object or a string makes that chunk invalid json, in which case the whole file is parsed
    in one go (which also yields json's own error message, with line and column, for a malformed
    file).
    """
    with open(path, "rb") as f:
        text = f.read()
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != b"[":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DetectionFormatError(f"{path}: malformed json ({e})") from None
        raise DetectionFormatError(
            f"{path}: a result file must hold a json list of {{{', '.join(RESULT_KEYS)}}} dicts, "
            f"got a {type(doc).__name__}"
        )
    parts, count = [], 0
    pos, end = start + 1, len(text)
    if text[pos:].strip() == b"]":
        return empty_columns(path)
    layout = _uniform_layout(text, pos)
    while True:
        if pos + _CHUNK_BYTES < end:
            cut = text.find(b"}", pos + _CHUNK_BYTES)
        else:
            cut = text.rfind(b"}", pos)
        after = _AFTER_OBJECT.match(text, cut + 1) if cut >= 0 else None
        if after is None:
            return _load_result_json_whole(path, text)
        piece = text[pos:cut + 1]
        cols = _parse_uniform_chunk(piece, layout, count, path) if layout else None
        if cols is None:
            try:
                chunk = json.loads(b"[" + piece + b"]")
            except json.JSONDecodeError:
                return _load_result_json_whole(path, text)
            cols = _columns_from_result_dicts(chunk, offset=count, source=path)
        parts.append(cols)
        count += len(cols)
        pos = after.end()
        if after.group(1) == b"]":
            if text[pos:].strip():
                return _load_result_json_whole(path, text)
            break
    return _concat(parts, path)


# Bytes that may occur in a plain json number (exponents excluded: an "e" outside the keys breaks
# the skeleton comparison, so such chunks take the json path). The dot is removed in a second step:
# the skeleton with dots shows whether an id value has a fraction part.
_NUMBER_BYTES = b"0123456789.-+"
_NUMBER_BYTES_BUT_DOT = b"0123456789-+"
# An id written with a dot ("image_id": 12.0 / 2299.5) leaves this in the dotted skeleton.
_ID_WITH_DOT = (b'"image_id":.', b'"category_id":.')
# float64 holds every integer below 2^53 exactly (a larger token may round to 2^53 itself); larger
# id tokens take the json path (exact Python ints).
_EXACT_INT = float(1 << 53)
_SPACE_BYTES = b" \t\n\r"
_KEY_BYTES = bytes(range(ord("a"), ord("z") + 1)) + bytes(range(ord("A"), ord("Z") + 1)) + b'_":[]'


def _uniform_layout(text, pos):
    """From the first result object: (skeleton template, column of each field), or None when the
    first object is not a flat ``image_id / category_id / bbox[4] / score`` dict."""
    first_end = text.find(b"}", pos)
    try:
        first = json.loads(text[pos:first_end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(first, dict) or sorted(first) != sorted(RESULT_KEYS) \
            or not isinstance(first["bbox"], list) or len(first["bbox"]) != 4:
        return None
    fields, columns = [], {}
    for k in first:
        columns[k] = len(fields) if k != "bbox" else slice(len(fields), len(fields) + 4)
        fields += [k] * (4 if k == "bbox" else 1)
    template = b"{" + b",".join(
        b'"%s":%s' % (k.encode(), b"[,,,]" if k == "bbox" else b"") for k in first) + b"}"
    return template, columns, len(fields)


def _parse_uniform_chunk(piece, layout, offset, source):
    """Chunk of ``{...},{...}`` -> columns when every object matches the layout's skeleton (same
    keys, same order, plain numbers); else None (the caller then uses the json module)."""
    template, columns, width = layout
    n = piece.count(b"{")
    dotted = piece.translate(None, _NUMBER_BYTES_BUT_DOT + _SPACE_BYTES)
    if n == 0 or dotted.translate(None, b".") != b",".join([template] * n):
        return None
    if any(p in dotted for p in _ID_WITH_DOT):
        return None  # a float id: the json path rejects it, naming the entry
    body = piece.translate(None, _KEY_BYTES + _SPACE_BYTES + b"{}")
    table = _parse_short_decimals(body, n * width)
    if table is None:
        try:
            table = np.loadtxt(io.BytesIO(body.replace(b",", b"\n")), dtype=np.float64,
                               comments=None)
        except ValueError:
            return None
    if table.size != n * width:
        return None
    table = table.reshape(n, width)
    for k in ("image_id", "category_id"):
        if not (np.abs(table[:, columns[k]]) < _EXACT_INT).all():
            return None  # not exact in float64 (or not finite): the json path reads Python ints
    return _make_columns(table[:, columns["image_id"]], table[:, columns["category_id"]],
                         np.ascontiguousarray(table[:, columns["bbox"]]),
                         np.ascontiguousarray(table[:, columns["score"]]), offset, source)


_POW10 = 10.0 ** np.arange(23)  # exact in float64 up to 1e22


def _parse_short_decimals(body: bytes, count: int):
    """Comma-separated plain decimals (``-?digits[.digits]``) -> float64 [count], vectorised.

    Exact (identical to ``float(token)``) because a token of at most 15 digits is an integer
    mantissa m < 2^53 and a power of ten 10^f <= 1e22, both exact in float64, and ``m / 10^f`` is
    one correctly rounded IEEE division (Clinger's fast path). Returns None when a token is not of
    that form (more digits, exponent, '+', empty), leaving it to numpy's general text parser.
    """
    u = np.frombuffer(body, dtype=np.uint8)
    sep = u == ord(",")
    n_tok = int(np.count_nonzero(sep)) + 1
    if n_tok != count or np.count_nonzero(u == ord("+")):
        return None
    tid = np.cumsum(sep, dtype=np.int32)  # token of each byte (separators: the next token)
    digit = (u >= ord("0")) & (u <= ord("9"))
    cd = np.cumsum(digit, dtype=np.int32)
    ends = np.append(np.flatnonzero(sep), u.size)  # one past each token
    cd_end = cd[ends - 1]
    n_digits = np.diff(cd_end, prepend=0)
    if n_digits.min(initial=1) < 1 or n_digits.max(initial=0) > 15:
        return None
    d_pos = np.flatnonzero(digit)
    d_tid = tid[d_pos]
    place = cd_end[d_tid] - cd[d_pos]  # digits to the right of this one in its token
    mantissa = np.bincount(d_tid, weights=(u[d_pos] - ord("0")) * _POW10[place],
                           minlength=n_tok)
    dot_pos = np.flatnonzero(u == ord("."))
    dot_tid = tid[dot_pos]
    minus_pos = np.flatnonzero(u == ord("-"))
    minus_tid = tid[minus_pos]
    starts = np.append(0, ends[:-1] + 1)
    if dot_tid.size and np.any(np.diff(dot_tid) == 0) \
            or minus_tid.size and (np.any(np.diff(minus_tid) == 0)
                                   or np.any(minus_pos != starts[minus_tid])):
        return None  # two dots / two minus signs in a token, or a minus not at its start
    frac = np.zeros(n_tok, dtype=np.int64)
    frac[dot_tid] = cd_end[dot_tid] - cd[dot_pos]
    value = mantissa / _POW10[frac]
    value[minus_tid] = -value[minus_tid]
    return value


def _load_result_json_whole(path, text) -> DetColumns:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DetectionFormatError(f"{path}: malformed json ({e})") from None
    if not isinstance(doc, list):
        raise DetectionFormatError(f"{path}: a result file must hold a json list of result dicts")
    return _columns_from_result_dicts(doc, offset=0, source=path)


def _concat(parts, source) -> DetColumns:
    if not parts:
        return empty_columns(source)
    return DetColumns(
        np.concatenate([p.image_id for p in parts]),
        np.concatenate([p.category_id for p in parts]),
        np.concatenate([p.bbox for p in parts]),
        np.concatenate([p.score for p in parts]),
        source,
    )


def _columns_from_result_dicts(items, offset: int, source: str) -> DetColumns:
    """List of LVIS/COCO result dicts -> columns; ``offset`` numbers entries in error messages."""
    try:
        image_id = [d["image_id"] for d in items]
        category_id = [d["category_id"] for d in items]
        score = np.array([d["score"] for d in items], dtype=np.float64)
        bbox = np.array([d["bbox"] for d in items], dtype=np.float64).reshape(len(items), 4)
    except (KeyError, TypeError, ValueError):
        _raise_bad_result_dict(items, offset, source)
    image_id = _int_ids(image_id, "image_id", items, offset, source)
    category_id = _int_ids(category_id, "category_id", items, offset, source)
    return _make_columns(image_id, category_id, bbox, score, offset, source)


def _is_int_type(t) -> bool:
    """``int`` or a numpy integer; not ``bool`` (a subclass of int), float (even 3.0), str..."""
    return t is int or issubclass(t, np.integer)


def _int_ids(values, name, items, offset, source):
    """A list of ids from result dicts -> int64 [n]; a non-integer id raises naming the entry.
    One ``set(map(type, values))`` (C speed); entries are scanned only on the error path."""
    types = set(map(type, values))
    if not types <= {int}:
        bad = {t for t in types if not _is_int_type(t)}
        if bad:
            i = next(i for i, v in enumerate(values) if type(v) in bad)
            v = values[i]
            raise DetectionFormatError(
                f"{source}: detection #{offset + i} {items[i]!r}: {name} must be an integer, got "
                f"{v!r} ({type(v).__name__}); ids are integers"
            )
    try:
        return np.array(values, dtype=np.int64).reshape(len(values))
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -(1 << 63) <= int(v) < (1 << 63))
        raise DetectionFormatError(
            f"{source}: detection #{offset + i} {items[i]!r}: {name} {values[i]} is outside the "
            f"int64 range"
        ) from None


def _make_columns(image_id, category_id, bbox, score, offset, source) -> DetColumns:
    """Id columns (int64, or float64 from the numeric-table path) -> :class:`DetColumns`,
    rejecting non-integer ids by entry."""
    for name, ids in (("image_id", image_id), ("category_id", category_id)):
        if ids.dtype.kind in "iu":
            continue
        bad = np.flatnonzero(ids != np.round(ids))
        if bad.size:
            i = int(bad[0])
            raise DetectionFormatError(
                f"{source}: detection #{offset + i} (image_id {image_id[i]}, category_id "
                f"{category_id[i]}, score {score[i]}): {name} must be an integer"
            )
    return DetColumns(image_id.astype(np.int64), category_id.astype(np.int64), bbox, score, source)


def _raise_bad_result_dict(items, offset, source):
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
            raise DetectionFormatError(f"{source}: detection #{offset + i} {d!r} {problem}")
    raise DetectionFormatError(f"{source}: detections do not convert to numeric columns")


def _columns_from_tensors(items) -> DetColumns:
    """Per-image tensor dicts (xyxy boxes) -> columns with xywh boxes."""
    ids, cats, boxes, scores = [], [], [], []
    for n, d in enumerate(items):
        missing = [k for k in TENSOR_KEYS if k not in d]
        if missing:
            raise DetectionFormatError(
                f"detections[{n}] (per-image tensor dict) misses key(s) {missing}; expected "
                f"{TENSOR_KEYS}"
            )
        b = torch.as_tensor(d["boxes"]).detach().to("cpu", torch.float64)
        s = torch.as_tensor(d["scores"]).detach().to("cpu", torch.float64).reshape(-1)
        c = torch.as_tensor(d["category_ids"]).detach().to("cpu").reshape(-1)
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
        xywh = b.clone()
        xywh[:, 2:] = b[:, 2:] - b[:, :2]
        boxes.append(xywh.numpy())
        scores.append(s.numpy())
    return DetColumns(
        np.concatenate(ids), np.concatenate(cats), np.concatenate(boxes).reshape(-1, 4),
        np.concatenate(scores), "detections",
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
