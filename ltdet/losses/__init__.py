"""Imbalance losses: one file per family, each a pure element-wise function plus a thin module.

`build_loss(cfg, num_classes=None, stats=None)` builds one from a config dict (`{"type": "eqlv2"}`);
`LOSSES` is the table of names. The base classes are the extension points: a new loss subclasses
`ClassificationLoss` (softmax), `SigmoidClassificationLoss` or `RegressionLoss` and writes its
`elementwise` (`ltdet.losses.base`).
"""

from .base import (
    ClassificationLoss,
    ClassStatsLike,
    LossModule,
    RegressionLoss,
    SigmoidClassificationLoss,
    classes_from_stats,
)
from .reduction import reduce_loss
from .registry import LOSSES, build_loss, hyper_parameters

__all__ = [
    "LOSSES",
    "ClassStatsLike",
    "ClassificationLoss",
    "LossModule",
    "RegressionLoss",
    "SigmoidClassificationLoss",
    "build_loss",
    "classes_from_stats",
    "hyper_parameters",
    "reduce_loss",
]
