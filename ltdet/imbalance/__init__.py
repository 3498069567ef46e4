"""Model-agnostic imbalance core: class-balanced weights, label-aware smoothing, LDS, FDS, mixup, shifted BN."""
import importlib

# name -> submodule. Exports resolve lazily (PEP 562) so one unfinished module never breaks
# importing its siblings.
_EXPORTS = {
    "class_balanced_weights": "class_balanced",
    "label_aware_smoothing": "label_smoothing",
    "smoothing_targets": "label_smoothing",
    "RoILDS": "lds",
    "build_lds": "lds",
    "smoothing_kernel": "lds",
    "RoIFDS": "fds",
    "build_fds": "fds",
    "mixup_detection": "mixup",
    "freeze_batchnorm": "shifted_bn",
    "shift_batchnorm": "shifted_bn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
