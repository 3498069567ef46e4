"""Instance masks for ``iou_type="segm"``: compressed RLE columns, their validation, and the
conversions the references make (pycocotools' ``frPyObjects`` / ``merge`` / ``encode``).

Detections keep their RLE strings compressed: one contiguous byte buffer with offsets
(:class:`MaskColumn`), so a result file of 1.5M masks costs the bytes of its strings and no Python
object per mask. A Python ``{"size", "counts"}`` dict is made only for the masks that reach an IoU
call (after the cap and the federated filter), and each string is decoded by pycocotools once, in
the one ``maskUtils.iou`` call of its (image, class) block (:func:`ltdet.evaluation.iou.mask_iou`).
Areas and validity come from :func:`rle_stats`, a vectorised reading of the same string format.

Ground truth follows ``lvis.LVIS.ann_to_rle`` (lvis/lvis.py) and pycocotools' ``annToRLE``: a
polygon list -> ``frPyObjects(polys, h, w)`` then ``merge``; an uncompressed RLE (``counts`` a
list) -> ``frPyObjects``; a compressed RLE is used as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pycocotools.mask as mask_utils
import torch

# The alphabet of pycocotools' compressed RLE (maskApi.c rleToString): 6-bit groups + 48.
_RLE_MIN, _RLE_MAX = 48, 48 + 63
# rle_stats works on at most this many characters at a time (int64 temporaries of ~8 bytes each).
_STATS_CHARS = 1 << 22

RLE_FIX = (
    "encode masks with pycocotools.mask.encode(np.asfortranarray(mask_uint8)) and store "
    "{'size': [height, width], 'counts': rle['counts'].decode()}, or pass the model's "
    "'masks' tensors directly"
)


@dataclass
class MaskColumn:
    """Compressed RLE masks as columns: ``counts`` uint8 [total bytes] (every string back to
    back), ``offsets`` int64 [N + 1], ``size`` int64 [N, 2] (height, width)."""

    counts: np.ndarray
    offsets: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return int(self.size.shape[0])

    def string(self, i: int) -> bytes:
        return self.counts[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def rles(self, rows: np.ndarray) -> list:
        """pycocotools RLE dicts (``counts`` bytes) of ``rows``."""
        counts = self.counts
        return [
            {"size": s, "counts": counts[a:b].tobytes()}
            for s, a, b in zip(
                self.size[rows].tolist(),
                self.offsets[rows].tolist(),
                self.offsets[rows + 1].tolist(),
            )
        ]

    def take(self, rows: np.ndarray) -> MaskColumn:
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lens = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        idx = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1])
        return MaskColumn(self.counts[idx], offsets, self.size[rows])


def empty_mask_column() -> MaskColumn:
    return MaskColumn(np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros((0, 2), np.int64))


def mask_column(strings: list, sizes) -> MaskColumn:
    """Column from RLE strings (``str`` or ``bytes``) and their [h, w] sizes. A ``str`` that is
    not ASCII cannot be an RLE: raises ``ValueError`` naming its position."""
    n = len(strings)
    if n and isinstance(strings[0], str) and all(type(s) is str for s in strings):
        joined = "".join(strings)
        if not joined.isascii():
            i = next(i for i, s in enumerate(strings) if not s.isascii())
            raise ValueError(f"#{i}: RLE counts hold non-ASCII characters")
        buf = joined.encode("ascii")
        lens = np.fromiter(map(len, strings), np.int64, n)
    else:
        parts = []
        for i, s in enumerate(strings):
            if isinstance(s, str):
                if not s.isascii():
                    raise ValueError(f"#{i}: RLE counts hold non-ASCII characters")
                s = s.encode("ascii")
            parts.append(s)
        buf = b"".join(parts)
        lens = np.fromiter(map(len, parts), np.int64, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    size = np.asarray(sizes, dtype=np.int64).reshape(n, 2)
    return MaskColumn(np.frombuffer(buf, np.uint8), offsets, size)


def concat_mask_columns(parts: list) -> MaskColumn:
    if not parts:
        return empty_mask_column()
    shift = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
    offsets = np.concatenate(
        [parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shift)]
    )
    return MaskColumn(
        np.concatenate([p.counts for p in parts]),
        offsets.astype(np.int64),
        np.concatenate([p.size for p in parts]).reshape(-1, 2),
    )


def bad_characters(col: MaskColumn) -> np.ndarray:
    """Rows whose string holds a character outside the RLE alphabet (or is empty)."""
    c = col.counts
    lens = np.diff(col.offsets)
    bad = lens == 0
    # min / max first: no temporary the size of the buffer unless a character is out of range.
    if c.size and (int(c.min()) < _RLE_MIN or int(c.max()) > _RLE_MAX):
        bad_char = (c < _RLE_MIN) | (c > _RLE_MAX)
        pos = np.flatnonzero(bad_char)
        bad[np.searchsorted(col.offsets, pos, side="right") - 1] = True
    return np.flatnonzero(bad)


def rle_stats(col: MaskColumn, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area (foreground pixels) int64 and validity bool of the masks at ``rows``, read from the
    compressed strings exactly as maskApi.c ``rleFrString`` decodes them: a string is valid when
    it holds whole tokens of at most 7 characters in the alphabet, every decoded count fits an
    unsigned 32-bit int, and the counts add up to height * width."""
    area = np.zeros(len(rows), np.int64)
    ok = np.zeros(len(rows), bool)
    lens = col.offsets[rows + 1] - col.offsets[rows]
    lo = 0
    while lo < len(rows):
        # Strings [lo, hi) with at most _STATS_CHARS characters (at least one string).
        cum = np.cumsum(lens[lo:])
        hi = lo + max(1, int(np.searchsorted(cum, _STATS_CHARS, side="right")))
        a, v = _stats_block(col, rows[lo:hi], lens[lo:hi])
        area[lo:hi], ok[lo:hi] = a, v
        lo = hi
    return area, ok


def _stats_block(col, rows, lens):
    n = len(rows)
    total_chars = int(lens.sum())
    ok = lens > 0
    if total_chars == 0:
        return np.zeros(n, np.int64), ok
    starts = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    nonempty = lens > 0
    string_of = np.repeat(np.arange(n), lens)
    idx = np.repeat(col.offsets[rows] - starts, lens) + np.arange(total_chars)
    c = col.counts[idx].astype(np.int64) - 48
    ok &= np.bincount(string_of, weights=(c < 0) | (c > 63), minlength=n) == 0
    more = (c & 0x20) != 0
    last = (starts + lens - 1)[nonempty]
    ok[nonempty] &= ~more[last]  # the string ends inside a token
    end = ~more
    end[last] = True  # a token never runs into the next string
    tok_of = np.cumsum(end) - end  # token index of each character
    n_tok = int(tok_of[-1]) + 1
    tok_start = np.flatnonzero(np.concatenate([[True], end[:-1]]))
    tok_len = np.diff(np.append(tok_start, total_chars))
    tok_string = string_of[tok_start]
    ok &= np.bincount(tok_string, weights=tok_len > 7, minlength=n) == 0
    k = np.minimum(np.arange(total_chars) - tok_start[tok_of], 7)
    x = np.add.reduceat((c & 0x1F) << (5 * k), tok_start)
    # maskApi.c: "if(!more && (c & 0x10)) x |= -1 << 5*k" (x < 2^(5k): the same as subtracting)
    neg = (c[tok_start + tok_len - 1] & 0x10) != 0
    x = np.where(neg, x - (np.int64(1) << (5 * np.minimum(tok_len, 7))), x)
    first_tok = np.searchsorted(tok_string, np.arange(n))
    m = np.arange(n_tok) - first_tok[tok_string]
    # cnts[m] = x[m] + cnts[m - 2] for m > 2 (maskApi.c): per string, running sums over
    # m = 1, 3, 5, ... and over m = 2, 4, ...; m = 0 stands alone. A running sum per string is
    # the global cumsum minus its value before the string's first token.
    odd = (m & 1) == 1
    cnts = x.copy()
    for sel in (odd, ~odd & (m > 0)):
        cs = np.cumsum(np.where(sel, x, 0))
        f = np.minimum(first_tok, n_tok - 1)  # (an empty string has no token: unused)
        before = cs[f] - np.where(sel[f], x[f], 0)
        cnts = np.where(sel, cs - before[tok_string], cnts)
    ok &= np.bincount(tok_string, weights=(cnts < 0) | (cnts >= (1 << 32)), minlength=n) == 0
    # Counts < 2^32 over < 2^22 tokens: the int64 sums are exact.
    total = np.zeros(n, np.int64)
    fg = np.zeros(n, np.int64)
    s = first_tok[nonempty]
    total[nonempty] = np.add.reduceat(cnts, s)
    fg[nonempty] = np.add.reduceat(np.where(m % 2 == 1, cnts, 0), s)
    hw = col.size[rows]
    ok &= total == hw[:, 0] * hw[:, 1]
    return fg, ok


def encode_tensor_masks(masks: torch.Tensor, threshold: float = 0.5) -> list:
    """Masks of one image ``[N, 1, H, W]`` (or ``[N, H, W]``; float probabilities, or bool /
    integer) -> pycocotools RLE dicts with ``counts`` bytes, as torchvision's references encode
    Mask R-CNN outputs: ``mask > threshold`` as Fortran-ordered uint8, one ``maskUtils.encode``
    call per image."""
    m = torch.as_tensor(masks).detach()
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, 1, H, W] or [N, H, W], got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        m = m > threshold
    # [N, W, H] contiguous is the memory of a Fortran-ordered [H, W, N] array.
    arr = m.transpose(1, 2).contiguous().to(torch.uint8).cpu().numpy().transpose(2, 1, 0)
    if arr.shape[2] == 0:
        return []
    return mask_utils.encode(np.asfortranarray(arr))


def encode_masks(masks: torch.Tensor, threshold: float = 0.5) -> list:
    """Result-json form of :func:`encode_tensor_masks`: ``{"size": [h, w], "counts": str}``."""
    return [
        {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
        for r in encode_tensor_masks(masks, threshold)
    ]


def gt_masks(
    anns: list,
    ann_img: np.ndarray,
    img_hw: np.ndarray,
    describe: Callable[[int], str],
    error_cls: type[Exception],
) -> MaskColumn:
    """Ground-truth ``segmentation`` fields -> compressed RLE, as ``lvis``' ``ann_to_rle``
    (polygons: ``frPyObjects`` then ``merge``; uncompressed RLE: ``frPyObjects``; compressed RLE
    as is). Polygons of one image go through one ``frPyObjects`` call (a single-polygon mask is
    what ``merge`` would return, byte for byte). A malformed polygon or RLE, or an RLE whose
    size is not its image's, raises ``error_cls`` naming the annotation (``describe(i)``)."""
    n = len(anns)
    strings: list = [None] * n
    given = []  # rows whose compressed string comes from the json (pycocotools' are valid)
    poly_of_img: dict = {}
    for i, a in enumerate(anns):
        seg = a.get("segmentation") if isinstance(a, dict) else None
        h, w = (int(v) for v in img_hw[ann_img[i]])
        if isinstance(seg, list):
            if not seg or not all(_valid_polygon(p) for p in seg):
                raise error_cls(
                    f"{describe(i)}: 'segmentation' is not a valid polygon list (each polygon a "
                    f"list of an even number >= 6 of finite x, y coordinates); fix or drop the "
                    f"annotation"
                )
            poly_of_img.setdefault(int(ann_img[i]), []).append(i)
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            size = seg["size"]
            if not (
                isinstance(size, (list, tuple))
                and len(size) == 2
                and [int(size[0]), int(size[1])] == [h, w]
            ):
                raise error_cls(
                    f"{describe(i)}: RLE size {size!r} differs from its image's [height, width] "
                    f"[{h}, {w}]; masks must be in original image pixels"
                )
            counts = seg["counts"]
            if isinstance(counts, list):
                if not all(type(v) is int and v >= 0 for v in counts) or sum(counts) != h * w:
                    raise error_cls(
                        f"{describe(i)}: uncompressed RLE counts must be non-negative integers "
                        f"adding up to height * width = {h * w}"
                    )
                strings[i] = mask_utils.frPyObjects(seg, h, w)["counts"]
            elif isinstance(counts, (str, bytes)):
                strings[i] = counts
                given.append(i)
            else:
                raise error_cls(f"{describe(i)}: RLE counts must be a string or a list of ints")
        else:
            raise error_cls(
                f"{describe(i)}: iou_type='segm' needs a 'segmentation' (polygons or RLE) on "
                f"every annotation, got {type(seg).__name__}"
            )
    for img, rows in poly_of_img.items():
        h, w = (int(v) for v in img_hw[img])
        flat = [p for i in rows for p in anns[i]["segmentation"]]
        rles = mask_utils.frPyObjects(flat, h, w)
        pos = 0
        for i in rows:
            k = len(anns[i]["segmentation"])
            strings[i] = (
                rles[pos]["counts"] if k == 1 else mask_utils.merge(rles[pos : pos + k])["counts"]
            )
            pos += k
    try:
        col = mask_column(strings, img_hw[ann_img] if n else np.zeros((0, 2)))
    except ValueError as e:
        i = int(str(e)[1:].split(":")[0])
        raise error_cls(f"{describe(i)}: RLE counts hold non-ASCII characters") from None
    if given:
        _, ok = rle_stats(col, np.array(given, np.int64))
        if not ok.all():
            i = given[int(np.flatnonzero(~ok)[0])]
            raise error_cls(
                f"{describe(i)}: 'segmentation' is not a valid compressed RLE of "
                f"its size ({int((~ok).sum())} such annotations)"
            )
    return col


def _valid_polygon(p) -> bool:
    if not isinstance(p, list) or len(p) < 6 or len(p) % 2:
        return False
    try:
        return bool(np.isfinite(np.asarray(p, dtype=np.float64)).all())
    except (TypeError, ValueError):
        return False
