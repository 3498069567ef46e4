"""SGD and the learning-rate schedule: linear warm-up, then step decay or cosine annealing.

The schedule is a `LambdaLR` over optimizer steps (iterations), so its state_dict is a counter
and resume restores it exactly.
"""

import math
from typing import Iterable

import torch

from ltdet.spec import check_number

__all__ = ["build_lr_scheduler", "build_optimizer", "check_solver", "lr_factor"]


def check_solver(solver: dict) -> None:
    """Raise `ltdet.spec.SpecError` (a ValueError) for a ``solver`` value training cannot run
    with: counts below their minimum, a non-positive lr or clip_grad_norm."""
    for key, low in (
        ("max_iter", 1),
        ("checkpoint_period", 1),
        ("log_period", 1),
        ("eval_period", 0),
        ("skip_nonfinite", 0),
    ):
        check_number(f"solver.{key}", solver[key], low=low)
    for key in ("lr", "clip_grad_norm"):
        if solver[key] is not None:
            check_number(f"solver.{key}", solver[key], low=0, low_open=True)


def lr_factor(
    it: int,
    *,
    max_iter: int,
    warmup_iters: int,
    warmup_factor: float,
    schedule: str,
    steps: Iterable[int],
    gamma: float,
) -> float:
    """Multiplier of the base lr at iteration `it` (0-based).

    warm-up (Goyal et al., 2017): `warmup_factor * (1 - a) + a` with `a = it / warmup_iters`;
    step: `gamma ** (number of milestones <= it)`; cosine: `0.5 * (1 + cos(pi * it / max_iter))`.
    """
    if schedule == "step":
        factor = gamma ** sum(1 for s in steps if s <= it)
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max(max_iter, 1)))
    else:
        raise ValueError(f"solver.schedule must be 'step' or 'cosine', got {schedule!r}")
    if it < warmup_iters:
        alpha = it / warmup_iters
        factor *= warmup_factor * (1.0 - alpha) + alpha
    return factor


def build_optimizer(params: Iterable, solver: dict) -> torch.optim.SGD:
    """SGD with momentum over `params` (an iterable of tensors or of param-group dicts)."""
    params = list(params)
    if not params:
        raise ValueError("no parameters to optimise: every parameter has requires_grad=False")
    return torch.optim.SGD(
        params, lr=solver["lr"], momentum=solver["momentum"], weight_decay=solver["weight_decay"]
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, solver: dict
) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` of the ``solver`` config as a `LambdaLR` over iterations."""
    steps = sorted(solver["steps"])
    kwargs = dict(
        max_iter=solver["max_iter"],
        warmup_iters=solver["warmup_iters"],
        warmup_factor=solver["warmup_factor"],
        schedule=solver["schedule"],
        steps=steps,
        gamma=solver["gamma"],
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, **kwargs))
