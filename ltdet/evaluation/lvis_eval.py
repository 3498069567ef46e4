"""LVIS-style box AP, exact against the official ``lvis`` package (and ``pycocotools`` for COCO gt).

Reference: Gupta, Dollar, Girshick, "LVIS: A Dataset for Large Vocabulary Instance
Segmentation", CVPR 2019, Sec. 5 (federated evaluation); the ``lvis`` package's ``LVISEval`` is
the reference implementation, ``pycocotools``' ``COCOeval`` for COCO-format ground truth.

Rules reproduced (LVIS ground truth, i.e. images carry ``neg_category_ids`` /
``not_exhaustive_category_ids``):
  1. keep the top ``max_dets`` detections per image across classes (ties: input order);
  2. federated filter: a detection of class c on image i is evaluated only if c has a ground-truth
     box on i or is in i's ``neg_category_ids``; all others are dropped;
  3. per (image, class), greedy matching in score order at IoU 0.50:0.05:0.95: each detection takes
     the unmatched non-ignored gt of highest IoU >= threshold (ties: the later gt), else an
     ignored gt (gt ``ignore`` flag or area outside the range); unmatched detections outside the
     area range, or of a class listed in the image's ``not_exhaustive_category_ids``, are ignored;
  4. per class: detections of all images sorted by score, cumulative TP / FP, precision made
     monotone and read at 101 recall points; classes without (non-ignored) gt are excluded;
  5. AP / AR are means over classes (and IoU thresholds, recall points); APr / APc / APf over the
     classes whose json ``frequency`` is r / c / f.
COCO ground truth (no federated fields): no federated filter, at most ``max_dets`` detections per
(image, class) as COCOeval's ``maxDets``, ``iscrowd`` gts are ignored regions (IoU = intersection
/ detection area, matchable any number of times).

Implementation: detections are flat columns; matching loops only over the rank position of a
detection inside its (image, class) group, processing every group, IoU threshold and area range at
once (state ``gt_matched`` [T, A, G]); accumulation is one sort + segmented cumulative sums, and
"precision at recall >= r" is a scatter-max into 101 recall buckets followed by a suffix max.
Everything runs in float64 with the reference's operation order, so results are bit-for-bit the
reference's up to summation order in the final means.

Shapes: T = 10 IoU thresholds, A = 4 area ranges (all, small, medium, large), R = 101 recall
points, K classes, G ground-truth boxes, N detections.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from .results_io import DetColumns, DetectionFormatError, load_detections

logger = logging.getLogger(__name__)

# Same construction as the references (np.linspace, not arange: exact 0.75 etc.).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = ((0.0, 1e5 ** 2), (0.0, 32.0 ** 2), (32.0 ** 2, 96.0 ** 2), (96.0 ** 2, 1e5 ** 2))
AREA_NAMES = ("all", "small", "medium", "large")
FREQ_GROUPS = ("r", "c", "f")
# LVIS frequency thresholds on training image counts: r <= 10 < c <= 100 < f.
FREQ_THRESHOLDS = (10, 100)
# COCO-LT bins on training instance counts:
# AP1 [1, 20), AP2 [20, 400), AP3 [400, 8000), AP4 >= 8000.
COCO_LT_BINS = (1, 20, 400, 8000, float("inf"))
_EPS = np.spacing(1)


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
            raise error_cls(f"{describe(i)} has {field} {v!r} ({type(v).__name__}); ids are integers")
    try:
        return np.array(values, dtype=np.int64).reshape(len(values))
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -(1 << 63) <= int(v) < (1 << 63))
        raise error_cls(f"{describe(i)} has {field} {values[i]!r}, outside the int64 range") \
            from None


def _field_list(records, key, describe):
    """``[r[key] for r in records]``; a record that is not a dict or lacks ``key`` raises naming it."""
    try:
        return [r[key] for r in records]
    except (KeyError, TypeError, IndexError):
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise GroundTruthFormatError(f"{describe(i)} is a {type(r).__name__}, not a dict") \
                    from None
            if key not in r:
                raise GroundTruthFormatError(f"{describe(i)} misses {key!r}") from None
        raise


def load_ground_truth(gt) -> GroundTruth:
    """LVIS v1 or COCO json (path or dict) -> :class:`GroundTruth`."""
    doc, src = _read_json(gt, "gt")
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise GroundTruthFormatError(f"{src}: missing top-level key {key!r}")
    images, anns, cats = doc["images"], doc["annotations"], doc["categories"]
    raw_img_ids = _id_array(_field_list(images, "id", lambda i: f"image #{i} in {src}"),
                            lambda i: f"image #{i} in {src}", "id")
    raw_cat_ids = _id_array(_field_list(cats, "id", lambda i: f"category #{i} in {src}"),
                            lambda i: f"category #{i} ({cats[i].get('name')!r}) in {src}", "id")
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

    ann_img = _index_of(img_ids, a_img, "image_id", describe, GroundTruthFormatError)
    ann_cat = _index_of(cat_ids, a_cat, "category_id", describe, GroundTruthFormatError)

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
            logger.info("%s: %d gt annotations with area <= 0 (or not finite) are not evaluated "
                        "(as in lvis)", src, int((~keep).sum()))
            ann_img, ann_cat, a_box, a_area, a_ign, a_crowd, a_id = (
                x[keep] for x in (ann_img, ann_cat, a_box, a_area, a_ign, a_crowd, a_id))
    return GroundTruth(
        is_lvis, img_ids, cat_ids, cats, ann_img, ann_cat, a_box, a_area, a_ign, a_crowd,
        neg, nel, a_id, src,
    )


def _index_of(sorted_ids, ids, field, describe, error_cls):
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


def training_counts(train, cat_ids):
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


def frequency_from_counts(image_counts):
    """LVIS r / c / f from training image counts (r <= 10, c <= 100, f > 100)."""
    lo, hi = FREQ_THRESHOLDS
    return ["r" if n <= lo else ("c" if n <= hi else "f") for n in image_counts.tolist()]


# ---------------------------------------------------------------------------------------------
# torch core


def _stable_order(*keys):
    """Indices sorting by ``keys`` lexicographically, the LAST key most significant; stable
    (remaining ties keep index order), like ``np.lexsort``."""
    n = keys[0].shape[0]
    order = torch.arange(n, device=keys[0].device)
    for k in keys:
        order = order[torch.sort(k[order], stable=True).indices]
    return order


def _rank_in_group(sorted_keys):
    """Position of each element inside its run of equal keys; ``sorted_keys`` is grouped."""
    n = sorted_keys.shape[0]
    ar = torch.arange(n, device=sorted_keys.device)
    first = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    start = torch.where(first, ar, torch.zeros_like(ar))
    if n:
        start = torch.cummax(start, 0).values
    return ar - start, start


def _box_iou_coco(d, g, crowd):
    """pycocotools' ``bbIou`` on paired rows: d, g float64 [P, 4] xywh, crowd bool [P] -> [P].

    Same operation order as maskApi.c (intersection from x + w, union = da + ga - i, or da for a
    crowd gt) so values, and hence threshold comparisons, are bit-identical.
    """
    w = torch.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - torch.maximum(d[:, 0], g[:, 0])
    h = torch.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - torch.maximum(d[:, 1], g[:, 1])
    inter = w * h
    da = d[:, 2] * d[:, 3]
    union = torch.where(crowd, da, da + g[:, 2] * g[:, 3] - inter)
    iou = inter / union
    # maskApi.c: "if(w<=0) continue; ... if(h<=0) continue;" leaves o = 0: a zero-width or
    # zero-height box (detection or gt) never overlaps anything.
    return torch.where((w <= 0) | (h <= 0), torch.zeros_like(iou), iou)


def _group_sizes(keys, num_keys):
    """Occurrences of each key (only the maximum is used): bincount when the key space is small."""
    if num_keys <= (1 << 24):
        return torch.bincount(keys, minlength=1)
    return torch.unique(keys, return_counts=True)[1]


def _pair_lookup(pairs, num_pairs):
    """Membership test for (image, class) pair keys: a dense table when it is small (one byte
    per pair: 24M for LVIS v1 val), else ``torch.isin``."""
    if num_pairs <= (1 << 27):
        table = torch.zeros(num_pairs, dtype=torch.bool, device=pairs.device)
        table[pairs] = True
        return lambda keys: table[keys]
    return lambda keys: torch.isin(keys, pairs)


def _select_detections(gt: GroundTruth, cols: DetColumns, max_dets: int, device):
    """Validate ids, apply the per-image (LVIS) or per-(image, class) (COCO) cap and the federated
    filter. Returns tensors on ``device`` for the kept detections, in input order."""
    K = len(gt.cat_ids)

    def describe(i):
        return f"{cols.source}: detection #{i} {cols.entry(i)}"

    img = _index_of(gt.img_ids, cols.image_id, "image_id", describe, DetectionFormatError)
    cat = _index_of(gt.cat_ids, cols.category_id, "category_id", describe, DetectionFormatError)
    t_img = torch.from_numpy(img).to(device)
    t_cat = torch.from_numpy(cat).to(device)
    score = torch.from_numpy(cols.score).to(device)
    pair = t_img * K + t_cat
    # LVISResults caps per image (sorted by score, stable); COCOeval caps per (image, class).
    group = t_img if gt.is_lvis else pair
    keep = torch.arange(pair.shape[0], device=device)
    if pair.numel() and int(_group_sizes(group, len(gt.img_ids) * K).max()) > max_dets:
        order = _stable_order(-score, group)
        rank, _ = _rank_in_group(group[order])
        keep = torch.sort(order[rank < max_dets]).values
    if gt.is_lvis:
        pos_pairs = torch.from_numpy(gt.ann_img * K + gt.ann_cat).to(device)
        allowed = _pair_lookup(torch.cat([pos_pairs, torch.from_numpy(gt.neg_pairs).to(device)]),
                               len(gt.img_ids) * K)
        keep = keep[allowed(pair[keep])]
        nel = _pair_lookup(torch.from_numpy(gt.not_exhaustive_pairs).to(device),
                           len(gt.img_ids) * K)(pair[keep])
    else:
        nel = torch.zeros(keep.shape[0], dtype=torch.bool, device=device)
    box = torch.from_numpy(cols.bbox).to(device)[keep]
    area = box[:, 2] * box[:, 3]  # LVISResults / loadRes: area = w * h (lvis/results.py:51)
    if gt.is_lvis:
        # LVISEval._prepare loads the detections through get_ann_ids(img_ids, cat_ids) as well,
        # which keeps only 0 < area < inf (lvis/lvis.py:85-96, lvis/eval.py:67-69): a zero-width
        # or zero-height detection is dropped (not a false positive). It still counted towards
        # the per-image cap above (LVISResults caps first, results.py:39-40). COCOeval keeps it.
        ok = (area > 0) & (area < float("inf"))
        if not bool(ok.all()):
            keep, box, area, nel = keep[ok], box[ok], area[ok], nel[ok]
    return dict(
        orig=keep, img=t_img[keep], cat=t_cat[keep], pair=pair[keep], score=score[keep],
        box=box, area=area, nel=nel,
    )


def _match(det, gt_t, device):
    """Greedy COCO/LVIS matching for all (image, class) groups at once.

    ``det`` tensors are sorted by (pair, -score, input order); ``gt_t`` by (pair, json order).
    Returns ``matched`` (the references' ``dt_m != 0``) and ``matched_ignored`` (matched to an
    ignored gt) bool [T, A, N].
    """
    T, A = len(IOU_THRS), len(AREA_RNGS)
    N, G = det["pair"].shape[0], gt_t["pair"].shape[0]
    matched = torch.zeros(T, A, N, dtype=torch.bool, device=device)
    matched_ig = torch.zeros(T, A, N, dtype=torch.bool, device=device)
    if N == 0 or G == 0:
        return matched, matched_ig
    # Candidate (det, gt) pairs: same (image, class), IoU >= the lowest threshold.
    gpairs, gcounts = torch.unique_consecutive(gt_t["pair"], return_counts=True)
    gstart = torch.cumsum(gcounts, 0) - gcounts
    pos = torch.searchsorted(gpairs, det["pair"]).clamp(max=gpairs.shape[0] - 1)
    has = gpairs[pos] == det["pair"]
    n_g = torch.where(has, gcounts[pos], torch.zeros_like(gcounts[pos]))
    d_rep = torch.repeat_interleave(torch.arange(N, device=device), n_g)
    offs = torch.cumsum(n_g, 0) - n_g
    g_idx = gstart[pos][d_rep] + torch.arange(d_rep.shape[0], device=device) - offs[d_rep]
    iou = _box_iou_coco(det["box"][d_rep], gt_t["box"][g_idx], gt_t["crowd"][g_idx])
    thrs = torch.tensor(np.minimum(IOU_THRS, 1 - 1e-10), dtype=torch.float64, device=device)
    keep = iou >= thrs.min()
    d_rep, g_idx, iou = d_rep[keep], g_idx[keep], iou[keep]
    if d_rep.numel() == 0:
        return matched, matched_ig
    # Matching is sequential only inside a group: step r handles, in every group at once, the
    # r-th detection (score order) among those that have candidates.
    cand_dets = torch.unique_consecutive(d_rep)
    step_of_det, _ = _rank_in_group(det["pair"][cand_dets])
    step = torch.full((N,), -1, dtype=torch.int64, device=device)
    step[cand_dets] = step_of_det
    by_step = torch.sort(step[d_rep], stable=True)
    d_rep, g_idx, iou = d_rep[by_step.indices], g_idx[by_step.indices], iou[by_step.indices]
    bounds = torch.cumsum(torch.bincount(by_step.values), 0).tolist()

    gt_matched = torch.zeros(T, A, G, dtype=torch.bool, device=device)
    gt_ig = gt_t["ignore_area"]  # [A, G]
    crowd = gt_t["crowd"]
    # The references record a match as dt_m = gt["id"] and count "dt_m != 0" as matched
    # (lvis/eval.py:264, 358; pycocotools/cocoeval.py:295, 375): a detection that takes a gt
    # whose annotation id is 0 consumes it but is not a true positive (a FP unless ignored).
    counts_as_match = gt_t["id"] != 0
    a_ar = torch.arange(A, device=device)[None, :, None]
    t_ar = torch.arange(T, device=device)[:, None, None]
    lo = 0
    for hi in bounds:
        pd, pg, piou = d_rep[lo:hi], g_idx[lo:hi], iou[lo:hi]
        lo = hi
        ldet, inv = torch.unique_consecutive(pd, return_inverse=True)
        P, L = pd.shape[0], ldet.shape[0]
        inv3 = inv.expand(T, A, P)
        free = ~gt_matched[:, :, pg] | crowd[pg]  # crowd regions match any number of times
        cand = (piou[None, None, :] >= thrs[:, None, None]) & free  # [T, A, P]
        nig = ~gt_ig[:, pg]  # [A, P]
        # A detection prefers non-ignored gts; only without one does it take an ignored gt.
        has_nig = torch.zeros(T, A, L, dtype=torch.int32, device=device).scatter_reduce(
            2, inv3, (cand & nig).to(torch.int32), "amax")
        elig = cand & (nig.to(torch.int32)[None] == has_nig.gather(2, inv3))
        iou_e = torch.where(elig, piou.expand(T, A, P), torch.full_like(piou, -1.0))
        best = torch.full((T, A, L), -1.0, dtype=torch.float64, device=device).scatter_reduce(
            2, inv3, iou_e, "amax")
        # Equal IoU: the reference keeps the later gt in its (ignore-last, json) order.
        win = elig & (iou_e == best.gather(2, inv3))
        gsel = torch.where(win, pg.expand(T, A, P), torch.full_like(pg, -1))
        bestg = torch.full((T, A, L), -1, dtype=torch.int64, device=device).scatter_reduce(
            2, inv3, gsel, "amax")
        ok = bestg >= 0
        g_safe = bestg.clamp(min=0)
        gt_matched[t_ar.expand_as(g_safe)[ok], a_ar.expand_as(g_safe)[ok], g_safe[ok]] = True
        matched[:, :, ldet] = ok & counts_as_match[g_safe]
        matched_ig[:, :, ldet] = ok & gt_ig[a_ar, g_safe]
    return matched, matched_ig


def _accumulate(det, matched, matched_ig, num_gt, num_cats, device):
    """Per-class precision averaged over the R recall points [T, A, K] and recall [T, A, K]
    (-1 where a class has no gt)."""
    T, A, R, K = len(IOU_THRS), len(AREA_RNGS), len(REC_THRS), num_cats
    lo = torch.tensor([r[0] for r in AREA_RNGS], dtype=torch.float64, device=device)
    hi = torch.tensor([r[1] for r in AREA_RNGS], dtype=torch.float64, device=device)
    area = det["area"][None, :]
    ignored_if_unmatched = (area < lo[:, None]) | (area > hi[:, None]) | det["nel"][None, :]
    # The references' dt_ig = gt_ig[m] if matched, or (dt_m == 0) & out of range / not exhaustive.
    tp = matched & ~matched_ig  # [T, A, N]
    fp = ~matched & ~matched_ig & ~ignored_if_unmatched[None]
    # Reference order: class, score descending, image order, input order.
    order = _stable_order(det["orig"], det["img"], -det["score"], det["cat"])
    cat = det["cat"][order]
    tp, fp = tp[:, :, order], fp[:, :, order]
    _, seg_start = _rank_in_group(cat)
    tp_cum = torch.cumsum(tp, 2, dtype=torch.int32)
    fp_cum = torch.cumsum(fp, 2, dtype=torch.int32)
    # Interpolated precision at recall r = max precision over positions with recall >= r. Only
    # true positives can attain it: after a FP or an ignored detection the recall is unchanged
    # and the precision is not higher. So: precision / recall at the TP positions, scatter-max
    # into the bucket of the highest recall point <= recall, then a suffix max over buckets.
    t_i, a_i, n_i = tp.nonzero(as_tuple=True)
    s0 = seg_start[n_i]
    tp_at = tp_cum[t_i, a_i, n_i] - tp_cum[t_i, a_i, s0] + tp[t_i, a_i, s0]
    fp_at = fp_cum[t_i, a_i, n_i] - fp_cum[t_i, a_i, s0] + fp[t_i, a_i, s0]
    c_at = cat[n_i]
    tpf, fpf = tp_at.to(torch.float64), fp_at.to(torch.float64)
    rc = tpf / num_gt[a_i, c_at].clamp(min=1).to(torch.float64)
    pr = tpf / (fpf + tpf + _EPS)
    rec = torch.tensor(REC_THRS, dtype=torch.float64, device=device)
    bucket = torch.searchsorted(rec, rc, right=True) - 1
    tak = (t_i * A + a_i) * K + c_at
    # Only (threshold, area, class) rows with a TP have non-zero precision: compact them.
    rows, row_of = torch.unique(tak, return_inverse=True)
    curve = torch.zeros(rows.shape[0] * R, dtype=torch.float64, device=device).scatter_reduce(
        0, row_of * R + bucket, pr, "amax").view(-1, R)
    curve = curve.flip(1).cummax(1).values.flip(1)
    prec = torch.zeros(T * A * K, dtype=torch.float64, device=device)
    prec[rows] = curve.mean(1)
    prec = prec.view(T, A, K)
    tp_total = torch.bincount(tak, minlength=T * A * K).view(T, A, K).to(torch.float64)
    valid = (num_gt > 0)[None]  # [1, A, K]
    recall = torch.where(valid, tp_total / num_gt.clamp(min=1)[None], torch.full_like(tp_total, -1))
    prec = torch.where(valid, prec, torch.full_like(prec, -1))
    return prec, recall


def evaluate_arrays(gt: GroundTruth, cols: DetColumns, max_dets=300, device=None):
    """Core: returns (precision [T, A, K] averaged over the 101 recall points, recall [T, A, K])
    as float64 numpy arrays; -1 marks classes without gt in that area range."""
    device = torch.device(device or "cpu")
    K = len(gt.cat_ids)
    det = _select_detections(gt, cols, max_dets, device)
    order = _stable_order(-det["score"], det["pair"])  # det["orig"] is ascending already
    det = {k: v[order] for k, v in det.items()}
    g_pair = torch.from_numpy(gt.ann_img * K + gt.ann_cat).to(device)
    g_order = _stable_order(g_pair)
    g_area = torch.from_numpy(gt.ann_area).to(device)[g_order]
    g_ign = torch.from_numpy(gt.ann_ignore).to(device)[g_order]
    lo = torch.tensor([r[0] for r in AREA_RNGS], dtype=torch.float64, device=device)[:, None]
    hi = torch.tensor([r[1] for r in AREA_RNGS], dtype=torch.float64, device=device)[:, None]
    gt_t = dict(
        pair=g_pair[g_order],
        box=torch.from_numpy(gt.ann_bbox).to(device)[g_order],
        crowd=torch.from_numpy(gt.ann_crowd).to(device)[g_order],
        id=torch.from_numpy(gt.ann_id).to(device)[g_order],
        ignore_area=g_ign[None] | (g_area[None] < lo) | (g_area[None] > hi),  # [A, G]
    )
    g_cat = torch.from_numpy(gt.ann_cat).to(device)[g_order]
    num_gt = torch.zeros(len(AREA_RNGS), K, dtype=torch.int64, device=device).scatter_add(
        1, g_cat.expand(len(AREA_RNGS), -1), (~gt_t["ignore_area"]).long())
    matched, matched_ig = _match(det, gt_t, device)
    prec, recall = _accumulate(det, matched, matched_ig, num_gt, K, device)
    return prec.cpu().numpy(), recall.cpu().numpy()


def _mean_valid(x):
    v = x[x > -1]
    return float(v.mean()) if v.size else -1.0


def evaluate_lvis(gt, dets, iou_type="bbox", max_dets=300, device=None, train=None) -> dict:
    """LVIS-style (or, for COCO-format ``gt``, COCOeval-style) box AP.

    Args:
        gt: LVIS v1 / COCO json path or loaded dict.
        dets: result json path, list of result dicts (``image_id, category_id, bbox xywh,
            score``) or list of per-image tensor dicts ``{"image_id", "boxes" [K, 4] xyxy in
            original image coordinates, "scores" [K], "category_ids" [K]}``.
        iou_type: only ``"bbox"``.
        max_dets: per image across classes (LVIS) / per (image, class) (COCO maxDets).
        device: torch device for matching and accumulation (default: the input tensors' device,
            else CPU).
        train: training json (path or dict) giving per-class training counts; for COCO gt it
            defines r / c / f (LVIS thresholds on image counts) and the COCO-LT bins AP1-AP4
            (training instances [1, 20), [20, 400), [400, 8000), [8000, inf)).

    Returns:
        dict with AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AP50r, AP50c, AP50f, AR@{max_dets}, ARs@, ARm@, ARl@
        (floats; -1 where undefined, as in the reference), AP1-AP4 for COCO gt with ``train``, and
        ``per_class``: list of {id, name, frequency, image_count, instance_count, AP (None when
        the class has no gt)}.
    """
    if iou_type != "bbox":
        raise ValueError(f"iou_type {iou_type!r} is not supported; ltdet evaluates boxes ('bbox')")
    if not isinstance(max_dets, int) or max_dets <= 0:
        raise ValueError(f"max_dets must be a positive int, got {max_dets!r}")
    if device is None and isinstance(dets, (list, tuple)) and dets and isinstance(dets[0], dict) \
            and isinstance(dets[0].get("boxes"), torch.Tensor):
        device = dets[0]["boxes"].device
    gtd = load_ground_truth(gt)
    cols = load_detections(dets)
    prec, recall = evaluate_arrays(gtd, cols, max_dets=max_dets, device=device)
    K = len(gtd.cat_ids)

    if train is not None:
        image_count, instance_count = training_counts(train, gtd.cat_ids)
    elif gtd.is_lvis:
        image_count = np.array([c.get("image_count", -1) for c in gtd.categories], np.int64)
        instance_count = np.array([c.get("instance_count", -1) for c in gtd.categories], np.int64)
    else:
        image_count = instance_count = None
    if gtd.is_lvis:
        freq = [c.get("frequency") for c in gtd.categories]
        bad = [c["id"] for c, f in zip(gtd.categories, freq) if f not in FREQ_GROUPS]
        if bad:
            if image_count is None or (image_count < 0).any():
                raise GroundTruthFormatError(
                    f"{gtd.source}: categories {bad[:5]} have no 'frequency' in {FREQ_GROUPS}; "
                    f"add it or pass train= to derive it from training image counts"
                )
            freq = frequency_from_counts(image_count)
    elif image_count is not None:
        freq = frequency_from_counts(image_count)
    else:
        freq = [None] * K
        logger.warning("COCO-format gt without train=: APr/APc/APf are undefined (-1)")

    t75 = int(np.flatnonzero(np.isclose(IOU_THRS, 0.75))[0])
    res = {
        "AP": _mean_valid(prec[:, 0]),
        "AP50": _mean_valid(prec[0, 0]),
        "AP75": _mean_valid(prec[t75, 0]),
        "APs": _mean_valid(prec[:, 1]),
        "APm": _mean_valid(prec[:, 2]),
        "APl": _mean_valid(prec[:, 3]),
    }
    freq_arr = np.array([f or "" for f in freq])
    for g in FREQ_GROUPS:
        res[f"AP{g}"] = _mean_valid(prec[:, 0, freq_arr == g])
    # AP50 per frequency group: not in the official summary, but the easiest-to-read signal of
    # whether a short run learned a group at all (same precision array, IoU 0.5 only).
    for g in FREQ_GROUPS:
        res[f"AP50{g}"] = _mean_valid(prec[0, 0, freq_arr == g])
    res[f"AR@{max_dets}"] = _mean_valid(recall[:, 0])
    for a, name in enumerate(AREA_NAMES[1:], start=1):
        res[f"AR{name[0]}@{max_dets}"] = _mean_valid(recall[:, a])
    if not gtd.is_lvis and instance_count is not None:
        for b in range(4):
            in_bin = (instance_count >= COCO_LT_BINS[b]) & (instance_count < COCO_LT_BINS[b + 1])
            res[f"AP{b + 1}"] = _mean_valid(prec[:, 0, in_bin])

    # A class is valid (has gt) at every threshold or at none.
    per_class_ap = [a if ok else None for a, ok in
                    zip(prec[:, 0].mean(0).tolist(), (recall[0, 0] > -1).tolist())]
    per_class_ap50 = [a if ok else None for a, ok in
                      zip(prec[0, 0].tolist(), (recall[0, 0] > -1).tolist())]
    res["per_class"] = [
        {
            "id": int(c["id"]),
            "name": c.get("name", str(c["id"])),
            "frequency": freq[k],
            "image_count": None if image_count is None or image_count[k] < 0
            else int(image_count[k]),
            "instance_count": None if instance_count is None or instance_count[k] < 0
            else int(instance_count[k]),
            "AP": per_class_ap[k],
            "AP50": per_class_ap50[k],
        }
        for k, c in enumerate(gtd.categories)
    ]
    logger.info(
        "evaluated %d detections on %d images, %d classes: AP %.4f", len(cols), len(gtd.img_ids),
        K, res["AP"],
    )
    return res
