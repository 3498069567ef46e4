"""Model-agnostic imbalance core: per-class loss weights, label-aware smoothing factors, LDS, FDS,
mixup, shifted BN."""

from .class_weights import CB_MODES, class_balanced_weights
from .fds import RoIFDS, build_fds
from .las_factors import LAS_SHAPES, label_aware_smoothing
from .lds import RoILDS, build_lds, smoothing_kernel
from .mixup import mixup_detection
from .shifted_bn import freeze_batchnorm, shift_batchnorm

__all__ = [
    "CB_MODES",
    "LAS_SHAPES",
    "RoIFDS",
    "RoILDS",
    "build_fds",
    "build_lds",
    "class_balanced_weights",
    "freeze_batchnorm",
    "label_aware_smoothing",
    "mixup_detection",
    "shift_batchnorm",
    "smoothing_kernel",
]
