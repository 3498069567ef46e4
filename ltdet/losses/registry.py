"""`build_loss(cfg, num_classes=None, stats=None)`: every ltdet loss is one config line.

`LOSSES` maps a config `type` to its module class: a new loss is one file (its element-wise
function and a `ClassificationLoss` / `RegressionLoss` subclass, `ltdet.losses.base`) and one line
here; the contract tests (tests/losses/test_losses_contract.py) then cover it. The remaining keys
of the config are the class's keyword-only constructor arguments (`ltdet.spec.build_from_spec`,
so the error for a misspelt hyper-parameter lists exactly the valid ones). `num_classes` and
`stats` are injected by the builder, never written in the config: `stats` is a
`ltdet.data.ClassStats` (duck-typed: `.image_count`, `.instance_count` float tensors `[C]` with
index i = label i+1, `.num_images`).
"""

import inspect
from collections.abc import Mapping
from typing import Any, Optional

from ..spec import SpecError, build_from_spec, spec_keys
from .balanced_l1 import BalancedL1Loss
from .balanced_softmax import BalancedSoftmaxLoss
from .base import ClassStatsLike, LossModule, classes_from_stats
from .class_balanced import ClassBalancedLoss
from .cross_entropy import CrossEntropyLoss
from .efl import EqualizedFocalLoss, EqualizedQualityFocalLoss
from .eql import EQLLoss
from .eqlv2 import EQLv2Loss
from .federated import FederatedLoss
from .focal import FocalLoss
from .focal_r import FocalRLoss
from .gfl import DistributionFocalLoss, QualityFocalLoss
from .ghm import GHMCLoss, GHMRLoss
from .giou import GIoULoss
from .label_smoothing import LabelAwareSmoothingLoss
from .seesaw import SeesawLoss, SeesawSoftmaxLoss
from .smooth_l1 import L1Loss, SmoothL1Loss

__all__ = ["LOSSES", "build_loss", "hyper_parameters"]

LOSSES: dict[str, type[LossModule]] = {
    # classification: logits [N, C+1], labels [N] in [0, C]
    "ce": CrossEntropyLoss,
    "focal": FocalLoss,
    "cb": ClassBalancedLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "eql": EQLLoss,
    "eqlv2": EQLv2Loss,
    "seesaw": SeesawLoss,  # logits [N, C+2] (C classes + 2-way objectness), scores [N, C+1]
    "seesaw_softmax": SeesawSoftmaxLoss,
    "federated": FederatedLoss,
    "ghmc": GHMCLoss,
    "las": LabelAwareSmoothingLoss,
    "efl": EqualizedFocalLoss,
    "eqfl": EqualizedQualityFocalLoss,  # target labels or (labels, quality [N])
    "qfl": QualityFocalLoss,  # target labels or (labels, quality [N])
    # regression: pred, target [P, 4]
    "smooth_l1": SmoothL1Loss,
    "l1": L1Loss,
    "giou": GIoULoss,
    "ghmr": GHMRLoss,
    "focal_r": FocalRLoss,
    "balanced_l1": BalancedL1Loss,
    "dfl": DistributionFocalLoss,  # pred [P, 4, reg_max + 1] side distributions, target [P, 4]
}

# Arguments the builder supplies; a config that sets them is rejected as unknown.
_INJECTED = ("num_classes", "stats")


def hyper_parameters(loss_cls: type) -> list[str]:
    """The config keys a loss class accepts (its constructor's arguments minus injected ones)."""
    return spec_keys(loss_cls, _INJECTED)


def _required(loss_cls: type, name: str) -> bool:
    """True when `loss_cls.__init__` takes `name` without a default."""
    param = inspect.signature(loss_cls).parameters.get(name)
    return param is not None and param.default is inspect.Parameter.empty


def build_loss(
    cfg: Mapping, num_classes: Optional[int] = None, stats: Optional[ClassStatsLike] = None
) -> LossModule:
    """Build a loss module from `{"type": name, **hyper_parameters}`.

    Args:
        cfg: mapping with key `type` (one of `LOSSES`) and that loss's hyper-parameters.
        num_classes: C, the number of foreground classes (logits have C+1 columns); taken from
            `stats` when omitted.
        stats: class statistics, required by the losses that use training frequencies
            (cb, balanced_softmax, eql, federated, las).
    Raises `ltdet.spec.SpecError` (a ValueError) for an unknown type or hyper-parameter, missing
    statistics or num_classes, or num_classes disagreeing with stats; TypeError when `stats` is
    not a ClassStats.
    """
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise SpecError(
            f"loss config must be a mapping with a 'type' key (one of "
            f"{sorted(LOSSES)}), got {cfg!r}"
        )
    name = cfg["type"]
    if name not in LOSSES:
        # The wording config errors and ltdet.patch users see (before build_from_spec's own).
        raise SpecError(f"unknown loss type {name!r}; valid types: {sorted(LOSSES)}")
    loss_cls = LOSSES[name]
    if stats is not None:
        try:
            num_classes = classes_from_stats(stats, num_classes)
        except ValueError as e:
            raise SpecError(f"loss {name!r}: {e}") from e
    if _required(loss_cls, "num_classes") and num_classes is None:
        raise SpecError(
            f"loss {name!r} needs num_classes (the number of foreground classes "
            f"C): call build_loss(cfg, num_classes=C) or pass stats"
        )
    if _required(loss_cls, "stats") and stats is None:
        raise SpecError(
            f"loss {name!r} needs class statistics (per-class training counts): call "
            f"build_loss(cfg, stats=ClassStats.from_json(train_json)) "
            f"(in a config run, the training set provides them)"
        )
    context: dict[str, Any] = {
        "num_classes": None if num_classes is None else int(num_classes),
        "stats": stats,
    }
    return build_from_spec(LOSSES, "loss", cfg, **context)
