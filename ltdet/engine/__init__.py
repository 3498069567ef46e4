"""Training engine: loop, DDP, AMP, checkpoint/resume, logging, stage-2 refinement."""
import importlib

# name -> submodule. Exports resolve lazily (PEP 562) so one unfinished module never breaks
# importing its siblings.
_EXPORTS = {
    "Trainer": "trainer",
    "NonFiniteLossError": "trainer",
    "Checkpointer": "checkpoint",
    "load_checkpoint": "checkpoint",
    "atomic_write": "checkpoint",
    "init_distributed": "distributed",
    "build_optimizer": "solver",
    "build_lr_scheduler": "solver",
    "lr_factor": "solver",
    "TrainLogger": "logger",
    "setup_logging": "logger",
    "setup_console_logging": "logger",
    "inference": "evaluate",
    "evaluate_model": "evaluate",
    "evaluate_checkpoint": "evaluate",
    "evaluate_detections": "evaluate",
    "resolve_data_paths": "data",
    "prepare_stage2": "refine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
