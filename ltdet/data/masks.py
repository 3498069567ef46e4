"""Instance masks of LVIS / COCO annotations: validation and decoding for Mask R-CNN training.

A ``segmentation`` is decoded exactly as ``lvis.LVIS.ann_to_mask`` (and pycocotools'
``COCO.annToMask``) do: a polygon list -> ``frPyObjects(polygons, h, w)`` then ``merge``; an
uncompressed RLE (``counts`` a list) -> ``frPyObjects``; a compressed RLE as it is; then
``decode``, at the image's json ``height`` x ``width``.

pycocotools does not check its input: a polygon with an odd number of coordinates is read past its
end and a compressed RLE whose counts exceed the image is decoded past the output buffer. So every
mask is checked first (`segmentation_problem`), once, when the data set is built; a problem is an
error naming the json, the annotation id and the fix (`MaskError`).

Shapes: ``decode_masks`` returns uint8 ``[K, H, W]`` (0 / 1), torchvision Mask R-CNN's
``targets[i]["masks"]`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch

__all__ = ["MASK_FIX", "MaskError", "ann_to_rle", "decode_masks", "segmentation_problem"]

MASK_FIX = (
    "fix or remove the annotation, or set data.skip_invalid: true to leave its image out "
    "of training"
)

# The alphabet of pycocotools' compressed RLE strings (maskApi.c rleToString): 6-bit groups + 48.
_RLE_MIN, _RLE_MAX = 48, 48 + 63


class MaskError(ValueError):
    """An annotation's ``segmentation`` that cannot be a training mask."""


def _polygon_problem(poly: Any) -> str | None:
    if not isinstance(poly, (list, tuple)):
        return f"a polygon is a {type(poly).__name__}, not a list of coordinates"
    if len(poly) < 6 or len(poly) % 2:
        return (
            f"a polygon has {len(poly)} coordinates; a polygon is a flat list "
            "[x1, y1, x2, y2, ...] of at least 3 points (an even number >= 6)"
        )
    try:
        # bool is an int to isfinite; a json coordinate is never one
        if not all(map(math.isfinite, poly)) or any(type(v) is bool for v in poly):
            return "a polygon holds a non-finite or non-numeric coordinate"
    except TypeError:
        return "a polygon holds a non-numeric coordinate"
    return None


def _compressed_counts(counts: bytes) -> list[int] | None:
    """The run lengths of a compressed RLE string, decoded as maskApi.c ``rleFrString`` does, or
    None where the string is not one (a character outside the alphabet, a cut-off token)."""
    if any(c < _RLE_MIN or c > _RLE_MAX for c in counts):
        return None
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why ``seg`` (an annotation's ``segmentation``) cannot be decoded at ``height`` x ``width``,
    or None. Polygons: a non-empty list of flat coordinate lists of >= 3 points, finite numbers.
    RLE: ``{"size": [height, width], "counts": ...}`` of the image's size, counts non-negative
    run lengths adding up to ``height * width`` (a list, or pycocotools' compressed string)."""
    if seg is None:
        return "it has no 'segmentation' (Mask R-CNN trains on a mask for every box)"
    if isinstance(seg, list):
        if not seg:
            return "its 'segmentation' is an empty polygon list"
        for poly in seg:
            why = _polygon_problem(poly)
            if why is not None:
                return f"its 'segmentation' is not a valid polygon list: {why}"
        return None
    if not isinstance(seg, Mapping) or "counts" not in seg or "size" not in seg:
        return (
            f"its 'segmentation' is a {type(seg).__name__} that is neither a polygon list "
            "nor an RLE {'size': [height, width], 'counts': ...}"
        )
    size = seg["size"]
    if not (
        isinstance(size, (list, tuple)) and len(size) == 2 and all(type(v) is int for v in size)
    ):
        return f"its RLE 'size' is {size!r}; expected [height, width]"
    if list(size) != [height, width]:
        return (
            f"its RLE size [height, width] {list(size)} differs from its image's "
            f"[{height}, {width}] (masks must be in the image's pixels)"
        )
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(type(v) is int and v >= 0 for v in counts):
            return "its uncompressed RLE counts are not all non-negative integers"
        runs = counts
    elif isinstance(counts, (str, bytes)):
        raw = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
        decoded = _compressed_counts(raw)
        if decoded is None:
            return "its compressed RLE counts are not a pycocotools RLE string"
        if any(v < 0 for v in decoded):
            return "its compressed RLE counts decode to a negative run length"
        runs = decoded
    else:
        return f"its RLE counts are a {type(counts).__name__}, not a string or a list of ints"
    if sum(runs) != height * width:
        return (
            f"its RLE run lengths add up to {sum(runs)} pixels, not height * width = "
            f"{height * width}"
        )
    return None


def ann_to_rle(seg: Any, height: int, width: int) -> dict:
    """``lvis.LVIS.ann_to_rle`` of one checked ``segmentation`` (compressed RLE dict)."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"]
    return {
        "size": list(seg["size"]),
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def decode_masks(segs: Sequence[Any], height: int, width: int) -> torch.Tensor:
    """uint8 ``[K, height, width]`` masks of checked ``segmentation`` fields (one
    ``mask_utils.decode`` call for the image)."""
    if len(segs) == 0:
        return torch.zeros((0, height, width), dtype=torch.uint8)
    rles = [ann_to_rle(s, height, width) for s in segs]
    decoded = mask_utils.decode(rles)  # [H, W, K], Fortran order
    return torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1)))
