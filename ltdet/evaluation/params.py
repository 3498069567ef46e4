"""The evaluation grid shared by matching, accumulation and the summary (lvis-api's ``Params``).

Shapes used across the evaluator: T = 10 IoU thresholds, A = 4 area ranges (all, small, medium,
large), R = 101 recall points, K classes, G ground-truth annotations, N detections.
"""

from __future__ import annotations

import numpy as np

# Same construction as the references (np.linspace, not arange: exact 0.75 etc.).
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_NAMES = ("all", "small", "medium", "large")
EPS = np.spacing(1)
