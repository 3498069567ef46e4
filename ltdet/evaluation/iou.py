"""The IoU seam: one entry per ``iou_type``, the only place where the geometry is read.

Ground truth and detections carry their geometry per IoU type as columns in their own row order
(``bbox``: float64 ``[n, 4]`` xywh, :attr:`GroundTruth.ann_bbox` / :attr:`DetColumns.bbox`).
Selection and matching never touch it: they pass row indices, and get back

- :func:`detection_area`: the area of detections (the area ranges and the LVIS ``0 < area``
  filter read it), and
- :func:`compute_iou`: the IoU of candidate (detection, gt) pairs of the same (image, class).
  The pairs come grouped by detection, detections grouped by (image, class), gts of a detection
  in gt order: the non-empty blocks of the references' per-(image, class) IoU matrices, flattened
  row-major. Matching consumes these values whatever the type.

A type is one :class:`IouType` entry: where its geometry lives, its area and its pairwise IoU
(and, for masks, their size, checked against the image). ``segm``: compressed RLE masks
(:class:`.masks.MaskColumn`), area = foreground pixels (``maskUtils.area``), IoU through
``pycocotools.mask.iou`` once per non-empty (image, class) block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pycocotools.mask as mask_utils
import torch

from .masks import MaskColumn, rle_stats


class InvalidGeometry(ValueError):
    """Geometry that cannot be evaluated; ``index`` is the position in the rows passed."""

    def __init__(self, index: int, count: int, why: str):
        super().__init__(why)
        self.index, self.count, self.why = index, count, why


def box_area(boxes: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
    """``w * h`` of the xywh ``boxes`` at ``rows`` (LVISResults / loadRes: lvis/results.py:51)."""
    box = torch.from_numpy(boxes).to(rows.device)[rows]
    return box[:, 2] * box[:, 3]


def box_iou(
    dt_boxes: np.ndarray,
    gt_boxes: np.ndarray,
    dt_rows: torch.Tensor,
    gt_rows: torch.Tensor,
    gt_crowd: torch.Tensor,
) -> torch.Tensor:
    """pycocotools' ``bbIou`` on paired rows -> float64 [P]: detection ``dt_rows[p]`` against gt
    ``gt_rows[p]``; ``gt_crowd`` bool [P]: that gt is a crowd region (union = detection area).

    Same operation order as maskApi.c (intersection from x + w, union = da + ga - i, or da for a
    crowd gt) so values, and hence threshold comparisons, are bit-identical.
    """
    d = torch.from_numpy(dt_boxes).to(dt_rows.device)[dt_rows]
    g = torch.from_numpy(gt_boxes).to(gt_rows.device)[gt_rows]
    w = torch.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - torch.maximum(d[:, 0], g[:, 0])
    h = torch.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - torch.maximum(d[:, 1], g[:, 1])
    inter = w * h
    da = d[:, 2] * d[:, 3]
    union = torch.where(gt_crowd, da, da + g[:, 2] * g[:, 3] - inter)
    iou = inter / union
    # maskApi.c: "if(w<=0) continue; ... if(h<=0) continue;" leaves o = 0: a zero-width or
    # zero-height box (detection or gt) never overlaps anything.
    return torch.where((w <= 0) | (h <= 0), torch.zeros_like(iou), iou)


def mask_area(masks: MaskColumn, rows: torch.Tensor) -> torch.Tensor:
    """Foreground pixels of the masks at ``rows`` (``maskUtils.area``, as LVISResults /
    loadRes set a segm result's area); an invalid RLE raises :class:`InvalidGeometry`."""
    area, ok = rle_stats(masks, rows.cpu().numpy())
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise InvalidGeometry(
            int(bad[0]), bad.size, "'segmentation' is not a valid compressed RLE of its size"
        )
    return torch.from_numpy(area.astype(np.float64)).to(rows.device)


def mask_iou(
    dt_masks: MaskColumn,
    gt_masks: MaskColumn,
    dt_rows: torch.Tensor,
    gt_rows: torch.Tensor,
    gt_crowd: torch.Tensor,
) -> torch.Tensor:
    """``pycocotools.mask.iou`` on the candidate pairs, one call per (image, class) block.

    The pairs of a block are its full detection x gt matrix, row-major (the module docstring):
    a new detection starts where ``dt_rows`` changes, a new block where a detection's first gt
    differs from the previous detection's (a gt belongs to one block). Every RLE string is turned
    into a dict once and decoded by pycocotools once, in its block's call.
    """
    device = dt_rows.device
    P = dt_rows.shape[0]
    if P == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    dr, gr = dt_rows.cpu().numpy(), gt_rows.cpu().numpy()
    crowd = gt_crowd.cpu().numpy().astype(np.uint8)
    det_start = np.flatnonzero(np.concatenate([[True], dr[1:] != dr[:-1]]))
    first_gt = gr[det_start]
    blk = np.concatenate([[True], first_gt[1:] != first_gt[:-1]])
    blk_det = np.flatnonzero(blk)  # block -> index of its first detection (in det_start)
    n_gt = np.diff(np.append(det_start, P))[blk_det]  # gts per block
    n_det = np.diff(np.append(blk_det, det_start.shape[0]))
    gt_pos = np.concatenate([np.arange(s, s + k) for s, k in zip(det_start[blk_det], n_gt)])
    dts = dt_masks.rles(dr[det_start])
    gts = gt_masks.rles(gr[gt_pos])
    crowd_l = crowd[gt_pos].tolist()
    out = []
    d0 = g0 = 0
    for nd, ng in zip(n_det.tolist(), n_gt.tolist()):
        out.append(
            np.asarray(
                mask_utils.iou(dts[d0 : d0 + nd], gts[g0 : g0 + ng], crowd_l[g0 : g0 + ng])
            ).ravel()
        )
        d0 += nd
        g0 += ng
    return torch.from_numpy(np.concatenate(out)).to(device)


def mask_size(masks: MaskColumn) -> np.ndarray:
    return masks.size


@dataclass(frozen=True)
class IouType:
    """One IoU type: the attribute holding its geometry on :class:`DetColumns` and on
    :class:`GroundTruth`, the detection area and the pairwise IoU (see the module docstring)."""

    det_field: str
    gt_field: str
    area: Callable[[Any, torch.Tensor], torch.Tensor]
    iou: Callable[[Any, Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # int64 [N, 2] (height, width) of each detection's geometry, to check against its image.
    size: Callable[[Any], np.ndarray] | None = None


IOU_TYPES = {
    "bbox": IouType(det_field="bbox", gt_field="ann_bbox", area=box_area, iou=box_iou),
    "segm": IouType(
        det_field="segm", gt_field="ann_segm", area=mask_area, iou=mask_iou, size=mask_size
    ),
}


def check_iou_type(iou_type: str) -> IouType:
    if iou_type not in IOU_TYPES:
        raise ValueError(
            f"iou_type {iou_type!r} is not supported; ltdet evaluates "
            f"{' / '.join(repr(t) for t in IOU_TYPES)}"
        )
    return IOU_TYPES[iou_type]


def detection_geometry(iou_type: str, cols: Any) -> Any:
    """The detections' geometry for ``iou_type`` (rows in input order)."""
    return getattr(cols, check_iou_type(iou_type).det_field)


def gt_geometry(iou_type: str, gt: Any) -> Any:
    """The ground truth's geometry for ``iou_type`` (rows in annotation order)."""
    return getattr(gt, check_iou_type(iou_type).gt_field)


def detection_area(iou_type: str, dt_geom: Any, rows: torch.Tensor) -> torch.Tensor:
    """float64 area of the detections at ``rows`` (may raise :class:`InvalidGeometry`)."""
    return check_iou_type(iou_type).area(dt_geom, rows)


def detection_size(iou_type: str, dt_geom: Any) -> np.ndarray | None:
    """int64 [N, 2] (height, width) the detections' geometry is drawn on, or None (boxes)."""
    size = check_iou_type(iou_type).size
    return None if size is None else size(dt_geom)


def compute_iou(
    iou_type: str,
    dt_geom: Any,
    gt_geom: Any,
    dt_rows: torch.Tensor,
    gt_rows: torch.Tensor,
    gt_crowd: torch.Tensor,
) -> torch.Tensor:
    """float64 [P] IoU of the candidate pairs (``dt_rows[p]``, ``gt_rows[p]``), rows into the
    geometry of :func:`detection_geometry` / :func:`gt_geometry`; ``gt_crowd`` bool [P] marks
    pairs whose gt is a COCO ``iscrowd`` region (IoU = intersection / detection area)."""
    return check_iou_type(iou_type).iou(dt_geom, gt_geom, dt_rows, gt_rows, gt_crowd)
