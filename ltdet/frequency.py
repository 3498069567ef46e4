"""The long-tail groups of a class, defined once for the whole package.

LVIS (Gupta et al., CVPR 2019, sec. 3) groups a category by the number of *training images* it
appears in: rare 1-10, common 11-100, frequent > 100. COCO-LT (Wang et al., "The Devil is in
Classification", ECCV 2020) bins categories by *training instances*: AP1 [1, 20), AP2 [20, 400),
AP3 [400, 8000), AP4 >= 8000.

This module imports only numpy, so the evaluator (which stands alone) and the data package both
read their thresholds from here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: LVIS r / c / f group names, in table order.
FREQ_GROUPS = ("r", "c", "f")
#: Largest training image count of a rare and of a common class: r <= 10 < c <= 100 < f.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
FREQ_THRESHOLDS = (RARE_MAX_IMAGES, COMMON_MAX_IMAGES)

#: Lower edges of the COCO-LT bins on training instance counts, and the bins' metric names.
COCO_LT_BIN_EDGES = (1, 20, 400, 8000)
COCO_LT_BIN_NAMES = ("AP1", "AP2", "AP3", "AP4")

#: One line for help texts and reports.
FREQ_RULE = "training images r: 1-10, c: 11-100, f: > 100"


def frequency_from_counts(image_count: Sequence[float] | np.ndarray) -> list[str]:
    """'r' / 'c' / 'f' per class from its training image count (r <= 10, c <= 100, f > 100).

    Accepts a list, a numpy array or a CPU torch tensor (anything ``np.asarray`` reads)."""
    counts = np.asarray(image_count, dtype=np.float64).reshape(-1)
    groups = np.where(
        counts <= RARE_MAX_IMAGES, "r", np.where(counts <= COMMON_MAX_IMAGES, "c", "f")
    )
    return groups.tolist()


def coco_lt_bins(instance_count: Sequence[float] | np.ndarray) -> np.ndarray:
    """COCO-LT bin index 0-3 per class from its training instance count; -1 for a class
    without training instances (it belongs to no bin)."""
    counts = np.asarray(instance_count, dtype=np.float64).reshape(-1)
    return np.searchsorted(np.asarray(COCO_LT_BIN_EDGES, np.float64), counts, side="right") - 1
