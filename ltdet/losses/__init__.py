"""Imbalance losses: one file per family, each a pure function plus a thin nn.Module.

`build_loss(cfg, num_classes=None, stats=None)` builds one from a config dict (`{"type": "eqlv2"}`).
"""
import importlib

_EXPORTS = {
    "build_loss": "registry",
    "LOSSES": "registry",
    "hyper_parameters": "registry",
    "reduce_loss": "reduction",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
