"""LVIS-style evaluation (exact against the official `lvis` package), reports."""

from .calibration import evaluate_calibration
from .ground_truth import GroundTruthFormatError
from .lvis_eval import evaluate_lvis
from .report import format_table, write_report
from .results_io import DetectionFormatError, load_detections

__all__ = [
    "DetectionFormatError",
    "GroundTruthFormatError",
    "evaluate_calibration",
    "evaluate_lvis",
    "format_table",
    "load_detections",
    "write_report",
]
