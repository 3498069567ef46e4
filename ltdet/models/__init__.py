"""Models: LTRoIHeads, RetinaNet heads, RoI samplers, classifier heads, build_detector, patch."""
import importlib

# name -> submodule. Exports resolve lazily (PEP 562) so one unfinished module never breaks
# importing its siblings.
_EXPORTS = {
    "LTRoIHeads": "roi_heads",
    "build_roi_sampler": "roi_samplers",
    "patch": "patch",
    "torchvision_state_dict": "patch",
    "build_detector": "build",
    "init_sigmoid_classifier": "init",
    "CosinePredictor": "classifiers",
    "LWSPredictor": "classifiers",
    "tau_normalize": "classifiers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
