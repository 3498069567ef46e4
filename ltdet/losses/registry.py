"""`build_loss(cfg, num_classes=None, stats=None)`: every ltdet loss is one config line.

`LOSSES` maps a config `type` to its module class (a classification loss's `cls_channels` says
how many logits its classifier has: C + 1, or C + 2 for `seesaw`). The remaining keys of the
config are the class's keyword-only constructor arguments (read with `inspect`, so the error for a misspelt
hyper-parameter lists exactly the valid ones). `num_classes` and `stats` are injected by the
builder, never written in the config: `stats` is a `ltdet.data.ClassStats` (duck-typed:
`.image_count`, `.instance_count` float tensors `[C]` with index i = label i+1, `.num_images`).
"""
import inspect
from collections.abc import Mapping

from .balanced_l1 import BalancedL1Loss
from .balanced_softmax import BalancedSoftmaxLoss
from .class_balanced import ClassBalancedLoss
from .cross_entropy import CrossEntropyLoss
from .eql import EQLLoss
from .eqlv2 import EQLv2Loss
from .federated import FederatedLoss
from .focal import FocalLoss
from .focal_r import FocalRLoss
from .ghm import GHMCLoss, GHMRLoss
from .giou import GIoULoss
from .label_smoothing import LabelAwareSmoothingLoss
from .seesaw import SeesawLoss, SeesawSoftmaxLoss
from .smooth_l1 import L1Loss, SmoothL1Loss

LOSSES = {
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
    # regression: pred, target [P, 4]
    "smooth_l1": SmoothL1Loss,
    "l1": L1Loss,
    "giou": GIoULoss,
    "ghmr": GHMRLoss,
    "focal_r": FocalRLoss,
    "balanced_l1": BalancedL1Loss,
}

# Arguments the builder supplies; a config that sets them is rejected as unknown.
_INJECTED = ("num_classes", "stats")


def _stats_num_classes(stats):
    try:
        return int(stats.instance_count.numel())
    except AttributeError as e:
        raise TypeError(
            f"stats must be a ltdet.data.ClassStats (with .image_count / .instance_count tensors "
            f"[C], .num_images), got {type(stats).__name__}") from e


def hyper_parameters(loss_cls):
    """The config keys a loss class accepts (its constructor's arguments minus injected ones)."""
    params = inspect.signature(loss_cls.__init__).parameters
    return [n for n, p in params.items()
            if n != "self" and n not in _INJECTED
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def build_loss(cfg, num_classes=None, stats=None):
    """Build a loss module from `{"type": name, **hyper_parameters}`.

    Args:
        cfg: mapping with key `type` (one of `LOSSES`) and that loss's hyper-parameters.
        num_classes: C, the number of foreground classes (logits have C+1 columns); taken from
            `stats` when omitted.
        stats: class statistics, required by the losses that use training frequencies
            (cb, balanced_softmax, eql, federated, las).
    Raises ValueError for an unknown type or hyper-parameter, missing statistics, or
    num_classes disagreeing with stats.
    """
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ValueError(f"loss config must be a mapping with a 'type' key (one of "
                         f"{sorted(LOSSES)}), got {cfg!r}")
    kwargs = dict(cfg)
    name = kwargs.pop("type")
    if name not in LOSSES:
        raise ValueError(f"unknown loss type {name!r}; valid types: {sorted(LOSSES)}")
    loss_cls = LOSSES[name]
    valid = hyper_parameters(loss_cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"loss {name!r}: unknown hyper-parameter(s) {unknown}; valid ones: {valid}")

    if stats is not None:
        stats_c = _stats_num_classes(stats)
        if num_classes is None:
            num_classes = stats_c
        elif int(num_classes) != stats_c:
            raise ValueError(f"loss {name!r}: num_classes={num_classes} but the class statistics "
                             f"have {stats_c} classes; build both from the same training json")

    params = inspect.signature(loss_cls.__init__).parameters
    if "num_classes" in params:
        if num_classes is None and params["num_classes"].default is inspect.Parameter.empty:
            raise ValueError(f"loss {name!r} needs num_classes (the number of foreground classes "
                             f"C): call build_loss(cfg, num_classes=C) or pass stats")
        if num_classes is not None:
            kwargs["num_classes"] = int(num_classes)
    if "stats" in params:
        if stats is None and params["stats"].default is inspect.Parameter.empty:
            raise ValueError(
                f"loss {name!r} needs class statistics (per-class training counts): call "
                f"build_loss(cfg, stats=ClassStats.from_json(train_json)) "
                f"(in a config run, the training set provides them)")
        kwargs["stats"] = stats
    return loss_cls(**kwargs)
