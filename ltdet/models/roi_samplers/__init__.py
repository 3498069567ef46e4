"""RoI samplers for `LTRoIHeads`: which proposals the box head learns from, and how much.

- `random` (`random.py`): torchvision's `BalancedPositiveNegativeSampler` (same random draws),
  plus Fast R-CNN's lower IoU bound for negatives `bg_iou_lo`;
- `ohem` (`ohem.py`): online hard example mining (Shrivastava et al., CVPR 2016, Sec. 4);
- `pisa` (`pisa.py`): prime sample attention (Cao et al., CVPR 2020) and its ranking maths.

The contract (`base.py`): a sampler subclasses `RoISampler` and is called as
`sampler(scorer, candidates)` with a `RoIScorer`, the narrow view of the head it may use
(`scoring.py` holds the head's implementation, `HeadScorer`). Build one with
`build_roi_sampler({"type": "ohem", "nms_thresh": 0.7})`; a new sampler is one file and one
line in `ROI_SAMPLERS` (`registry.py`).
"""

from .base import (
    RoICandidates,
    RoISampler,
    RoISamples,
    RoIScorer,
    RoISelection,
    matched_boxes,
    random_subset,
)
from .ohem import OHEMRoISampler, ohem_select
from .pisa import (
    PISARoISampler,
    aligned_iou,
    hierarchical_rank,
    importance_weights,
    iou_hlr,
    score_hlr,
)
from .random import RandomRoISampler
from .registry import ROI_SAMPLERS, build_roi_sampler
from .scoring import HeadScorer, box_loss_of_positives, cls_loss_per_roi, roi_logits, roi_loss

__all__ = [
    "HeadScorer",
    "OHEMRoISampler",
    "PISARoISampler",
    "ROI_SAMPLERS",
    "RandomRoISampler",
    "RoICandidates",
    "RoISampler",
    "RoISamples",
    "RoIScorer",
    "RoISelection",
    "aligned_iou",
    "box_loss_of_positives",
    "build_roi_sampler",
    "cls_loss_per_roi",
    "hierarchical_rank",
    "importance_weights",
    "iou_hlr",
    "matched_boxes",
    "ohem_select",
    "random_subset",
    "roi_logits",
    "roi_loss",
    "score_hlr",
]
