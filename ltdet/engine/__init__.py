"""Training engine: loop, DDP, AMP, checkpoint/resume, logging, stage-2 refinement."""

from .checkpoint import Checkpointer, load_checkpoint
from .distributed import init_distributed
from .loaders import locate_or_generate_data
from .logger import TrainLogger, setup_console_logging, setup_logging
from .refine import prepare_stage2
from .solver import build_lr_scheduler, build_optimizer
from .trainer import NonFiniteLossError, OutputDirError, Trainer
from .validation import evaluate_checkpoint, evaluate_detections, evaluate_model, inference

__all__ = [
    "Checkpointer",
    "NonFiniteLossError",
    "OutputDirError",
    "TrainLogger",
    "Trainer",
    "build_lr_scheduler",
    "build_optimizer",
    "evaluate_checkpoint",
    "evaluate_detections",
    "evaluate_model",
    "inference",
    "init_distributed",
    "load_checkpoint",
    "locate_or_generate_data",
    "prepare_stage2",
    "setup_console_logging",
    "setup_logging",
]
