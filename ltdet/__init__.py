"""ltdet: long-tailed object detection on top of torchvision.

`ltdet.patch(model, cls_loss=..., box_loss=..., sampler=..., stats=...)` swaps the losses and
RoI sampler of an existing torchvision detector in place; `ltdet.torchvision_state_dict(model)` is
its state dict without ltdet's loss / sampler state, loadable by the unpatched torchvision model."""
import importlib

# name -> submodule. Exports resolve lazily (PEP 562) so one unfinished module never breaks
# importing its siblings.
_EXPORTS = {
    "patch": "models.patch",
    "torchvision_state_dict": "models.patch",
    "build_detector": "models.build",
    "init_sigmoid_classifier": "models.init",
    "build_loss": "losses.registry",
    "evaluate_lvis": "evaluation.lvis_eval",
    "ClassStats": "data.class_stats",
    "load_config": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
