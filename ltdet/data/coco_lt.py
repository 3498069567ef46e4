"""COCO-LT builder: a long-tailed subset of a COCO-format json that keeps whole images.

COCO-LT (Wang et al., ECCV 2020, "The Devil is in Classification: A Simple Framework for
Long-tail Instance Segmentation", Sec. 5) is COCO train2017 sampled so that its per-class
instance counts follow LVIS's long tail; results are reported as AP1..AP4 over classes binned by
training instance count: [1, 20), [20, 400), [400, 8000), [8000, inf) (`ltdet.frequency`).

The target profile (instances per class, by class rank) is either a Zipf law
``n_k = n_0 / (k + 1)^s`` with ``s = ln(imbalance) / ln(C)`` (so ``n_0 / n_{C-1} = imbalance``,
``n_0 = min_k available_k (k + 1)^s``: the largest such law the source can supply at every
rank), or the sorted class counts of another json
(e.g. LVIS v1 train) resampled to ``C`` classes by interpolating log counts over rank quantiles.
Class ranks follow the source's own instance counts (the most frequent class stays the head).

Images are selected greedily, classes needing the largest share of their supply first: for class c with deficit ``d_c`` the
candidates (unselected images containing c) are ordered by how far they would overshoot the
remaining targets of all classes (then a seeded random tie-break), and the shortest prefix whose
c-instances cover ``d_c`` is taken. Costs are vectorised over (image, class) pairs; the loop is
over classes only. Deterministic for a seed.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Mapping, Sequence

import numpy as np

from ltdet.frequency import COCO_LT_BIN_NAMES, FREQ_GROUPS, coco_lt_bins, frequency_from_counts

from .class_stats import FlatAnnotations

logger = logging.getLogger(__name__)

__all__ = ["bin_sizes", "build_coco_lt", "profile_from_counts", "zipf_profile"]


def bin_sizes(instance_count: Sequence[float] | np.ndarray) -> dict[str, int]:
    """Number of classes in each COCO-LT bin (`ltdet.frequency.coco_lt_bins`):
    ``{"AP1": n1, ..., "AP4": n4}``."""
    bins = coco_lt_bins(instance_count)
    sizes = np.bincount(bins[bins >= 0], minlength=len(COCO_LT_BIN_NAMES))
    return {name: int(n) for name, n in zip(COCO_LT_BIN_NAMES, sizes)}


def zipf_profile(num_classes: int, head: float, imbalance: float) -> np.ndarray:
    """``head / (k + 1)^s`` for ranks ``k = 0..C-1`` with ``s = ln(imbalance) / ln(C)``."""
    if num_classes < 1:
        raise ValueError(f"zipf_profile: num_classes must be >= 1, got {num_classes}")
    if imbalance < 1:
        raise ValueError(
            f"zipf_profile: imbalance is max/min instance count, must be >= 1, got {imbalance}"
        )
    if num_classes == 1:
        return np.asarray([float(head)])
    s = math.log(imbalance) / math.log(num_classes)
    return float(head) / np.arange(1, num_classes + 1, dtype=np.float64) ** s


def profile_from_counts(counts: Sequence[float], num_classes: int) -> np.ndarray:
    """Descending counts resampled to ``num_classes`` ranks (log-linear over rank quantiles)."""
    src = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    src = src[src > 0]
    if src.size == 0:
        raise ValueError("profile_from_counts: the profile json has no annotated class")
    if src.size == 1 or num_classes == 1:
        return np.full(num_classes, src[0])
    q_src = np.linspace(0.0, 1.0, src.size)
    q_dst = np.linspace(0.0, 1.0, num_classes)
    return np.exp(np.interp(q_dst, q_src, np.log(src)))


def _pair_counts(flat: FlatAnnotations):
    """(image index, label, instances) per (image, class) present, sorted by image."""
    c1 = flat.num_classes + 1
    keys, counts = np.unique(flat.ann_image_index * c1 + flat.ann_labels, return_counts=True)
    return keys // c1, keys % c1, counts


def build_coco_lt(
    data: Mapping,
    *,
    imbalance: float = 100.0,
    profile: Sequence[float] | None = None,
    seed: int = 0,
    json_path: str | None = None,
    skip_invalid: bool = False,
) -> tuple[dict, dict]:
    """Select whole images of ``data`` (COCO format) to follow a long-tailed instance profile.

    Returns ``(subset json dict, summary)``; the summary holds ``target`` and ``achieved``
    instance counts per label (index = label - 1), ``num_images``, ``num_instances``,
    ``frequency_sizes`` ({r, c, f}) and ``bin_sizes`` ({AP1..AP4}).
    ``profile``: counts of another data set (any order) to imitate instead of the Zipf law.
    ``skip_invalid``: drop boxes with zero/negative width or height (also from the output)
    instead of raising.
    """
    flat = FlatAnnotations.from_dict(data, json_path=json_path, skip_invalid=skip_invalid)
    num_classes, num_images = flat.num_classes, flat.num_images
    rng = np.random.default_rng(seed)
    pair_img, pair_lab, pair_cnt = _pair_counts(flat)
    available = np.bincount(flat.ann_labels, minlength=num_classes + 1)[1:].astype(np.float64)
    if available.sum() == 0:
        raise ValueError(f"build_coco_lt: {json_path or 'the json'} has no non-crowd annotation")

    # Rank classes by the source's own counts (ties broken by the seeded generator).
    rank_order = np.lexsort((rng.random(num_classes), -available))
    if profile is not None:
        shape = profile_from_counts(profile, num_classes)
    else:
        # The largest Zipf profile the source can supply: n_0 = min_k available_k (k + 1)^s.
        unit = zipf_profile(num_classes, 1.0, imbalance)
        shape = unit * np.min(available[rank_order] / unit)
    target = np.zeros(num_classes + 1)
    target[rank_order + 1] = np.minimum(np.maximum(np.round(shape), 1), available[rank_order])

    selected = np.zeros(num_images, bool)
    current = np.zeros(num_classes + 1)
    by_class = np.argsort(pair_lab, kind="stable")
    starts = np.searchsorted(pair_lab[by_class], np.arange(num_classes + 2))
    # Classes that need the largest share of their images go first (a class whose target is its
    # whole supply must take every image it is on, co-occurring classes included); the rest then
    # see those instances in their deficits. Ties: rarest target first.
    need = target[1:] / np.maximum(available, 1)
    for label in np.lexsort((target[1:], -need)) + 1:
        deficit = target[label] - current[label]
        if deficit <= 0:
            continue
        own = by_class[starts[label] : starts[label + 1]]
        own = own[~selected[pair_img[own]]]
        if own.size == 0:
            continue
        cand_img, cand_cnt = pair_img[own], pair_cnt[own]
        remaining = np.maximum(target - current, 0)
        is_cand = np.zeros(num_images, bool)
        is_cand[cand_img] = True
        others = is_cand[pair_img] & (pair_lab != label)
        over = np.maximum(pair_cnt[others] - remaining[pair_lab[others]], 0)
        cost = np.bincount(pair_img[others], weights=over, minlength=num_images)[
            cand_img
        ] + np.maximum(cand_cnt - deficit, 0)
        order = np.lexsort((rng.random(own.size), cost))
        covered = np.cumsum(cand_cnt[order])
        take = order[: int(np.searchsorted(covered, deficit)) + 1]
        new_imgs = cand_img[take]
        selected[new_imgs] = True
        newly = np.zeros(num_images, bool)
        newly[new_imgs] = True
        current += np.bincount(
            pair_lab[newly[pair_img]], weights=pair_cnt[newly[pair_img]], minlength=num_classes + 1
        )

    keep_ids = set(flat.image_ids[selected].tolist())
    out = copy.copy(dict(data))
    out["images"] = [im for im in data["images"] if im["id"] in keep_ids]
    valid = set(flat.ann_ids.tolist()) if skip_invalid else None
    out["annotations"] = [
        a
        for a in data["annotations"]
        if a["image_id"] in keep_ids and (valid is None or a["id"] in valid or a.get("iscrowd", 0))
    ]
    sub = FlatAnnotations.from_dict(out, json_path=json_path)
    achieved = np.bincount(sub.ann_labels, minlength=num_classes + 1)[1:]
    _, lab = sub.image_label_pairs()
    image_count = np.bincount(lab, minlength=num_classes + 1)[1:]
    cats = sorted(data["categories"], key=lambda c: c["id"])
    out["categories"] = [
        dict(c, image_count=int(ni), instance_count=int(na))
        for c, ni, na in zip(cats, image_count, achieved)
    ]
    info = dict(data.get("info") or {})
    info["coco_lt"] = {
        "seed": int(seed),
        "imbalance": None if profile is not None else imbalance,
        "profile": "custom" if profile is not None else "zipf",
        "source": json_path,
    }
    out["info"] = info
    freq = frequency_from_counts(image_count)
    summary = {
        "target": target[1:],
        "achieved": achieved,
        "image_count": image_count,
        "num_images": len(out["images"]),
        "num_instances": int(achieved.sum()),
        "frequency_sizes": {g: freq.count(g) for g in FREQ_GROUPS},
        "bin_sizes": bin_sizes(achieved),
        "empty_classes": int((achieved == 0).sum()),
    }
    logger.info(
        "COCO-LT: %d of %d images, %d instances",
        summary["num_images"],
        num_images,
        summary["num_instances"],
    )
    return out, summary
