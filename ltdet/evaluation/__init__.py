"""LVIS-style evaluation (exact against the official `lvis` package), reports."""
import importlib

# name -> submodule. Exports resolve lazily (PEP 562) so one unfinished module never breaks
# importing its siblings.
_EXPORTS = {
    "evaluate_lvis": "lvis_eval",
    "GroundTruthFormatError": "lvis_eval",
    "DetectionFormatError": "results_io",
    "load_detections": "results_io",
    "format_table": "report",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
