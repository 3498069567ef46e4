"""ltdet: long-tailed object detection on top of torchvision.

`ltdet.patch(model, cls_loss=..., box_loss=..., sampler=..., stats=...)` swaps the losses and
RoI sampler of an existing torchvision detector in place; `ltdet.torchvision_state_dict(model)` is
its state dict without ltdet's loss / sampler state, loadable by the unpatched torchvision model."""

from .config import load_config
from .data import ClassStats
from .evaluation import evaluate_lvis
from .losses import build_loss
from .models import build_detector, init_sigmoid_classifier, patch, torchvision_state_dict

__all__ = [
    "ClassStats",
    "build_detector",
    "build_loss",
    "evaluate_lvis",
    "init_sigmoid_classifier",
    "load_config",
    "patch",
    "torchvision_state_dict",
]
