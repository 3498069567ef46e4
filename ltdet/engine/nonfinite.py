"""Non-finite training steps: what counts as one, what is never saved, and the stop message.

A step is non-finite when a loss term (averaged over ranks, so every rank agrees) or, without
AMP, the global gradient norm is NaN or infinite. Such a step is never applied: the optimizer
does not step and no checkpoint holds its result. With AMP the gradient check is GradScaler's
(it skips an overflowing step and lowers its scale), so only the loss is checked here.

`solver.skip_nonfinite: N` skips up to N consecutive non-finite steps (the learning-rate schedule
still advances, as with GradScaler) and stops at the (N + 1)-th in a row; 0 stops at the first.

The stop message names a checkpoint to continue from and the options to continue with. It does
not blindly name the last checkpoint: a run that diverges slowly writes finite but already ruined
weights before the first NaN (a step with loss 3.8e19 leaves weights of 1e23), and resuming from
those fails again whatever the options. A checkpoint is *healthy* when the mean loss of the
`LOSS_WINDOW` steps before it is at most `HEALTHY_LOSS_RATIO` times the run's best such mean so
far (the best, not the initial loss: from scratch the initial loss is the run's largest, and a
diverging run passes through it on the way up). The advice names the newest healthy checkpoint
that still exists, or says to restart when there is none.
"""

import math
from pathlib import Path

import torch

#: A checkpoint whose recent loss exceeds this multiple of the run's best loss has diverged.
HEALTHY_LOSS_RATIO = 2.0
#: Consecutive steps whose mean loss is a checkpoint's recent loss (and the run's best).
LOSS_WINDOW = 5
#: Gradient-norm cap the advice proposes when the run had none.
ADVISED_CLIP = 10.0


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient became NaN or infinite; the message names the iteration, the
    term and how to continue."""


def global_grad_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients of `params` together (what `clip_grad_norm_` measures)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        return total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def clip_with_norm(params, max_norm: float, total_norm: torch.Tensor) -> None:
    """`clip_grad_norm_` given the norm already measured (no second pass over the gradients)."""
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if clip is not None:
        clip(params, max_norm, total_norm)
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def nonfinite_state(module: torch.nn.Module, limit: int = 3) -> list:
    """Names of (at most `limit`) parameters / buffers of `module` holding NaN or inf."""
    bad = []
    for name, t in module.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


class LossHistory:
    """The run's best and most recent losses, to rate checkpoints as healthy.

    `best` (the lowest mean of `LOSS_WINDOW` consecutive steps so far) survives resume: it is
    stored in every checkpoint's `health`."""

    def __init__(self, best=None):
        self.best = best
        self._recent = []

    def add(self, loss: float) -> None:
        self._recent = (self._recent + [loss])[-LOSS_WINDOW:]
        mean = sum(self._recent) / len(self._recent)
        if math.isfinite(mean) and (self.best is None or mean < self.best):
            self.best = mean

    def health(self) -> dict:
        recent = sum(self._recent) / len(self._recent) if self._recent else None
        return {"best_loss": self.best, "recent_loss": recent}


def is_healthy(health) -> bool:
    """Whether a checkpoint with this `health` predates a divergence."""
    if not health or health.get("recent_loss") is None:
        return False
    recent = health["recent_loss"]
    best = health.get("best_loss", health.get("initial_loss"))
    return (
        math.isfinite(recent)
        and best is not None
        and math.isfinite(best)
        and recent <= HEALTHY_LOSS_RATIO * best
    )


def advice(*, lr: float, base_lr: float, clip, checkpoints: list, config="CONFIG") -> str:
    """How to continue after a non-finite stop, as a command to run as it is.

    checkpoints: [(path, health)], oldest first; config: the run's resolved config.yaml (the
    command must not depend on the options the run was started with)."""
    healthy = [path for path, health in checkpoints if is_healthy(health) and Path(path).is_file()]
    new_clip = ADVISED_CLIP if clip is None else clip / 2
    opts = f"--opts solver.lr={base_lr / 2:g} solver.clip_grad_norm={new_clip:g}"
    text = (
        f"Training stopped; no step with a non-finite loss or gradient was applied or "
        f"checkpointed. The lr was {lr:.4g} (solver.lr {base_lr:g})."
    )
    if healthy:
        return text + (
            f" Continue from {healthy[-1]} (the newest checkpoint whose loss was "
            f"within {HEALTHY_LOSS_RATIO:g}x of the run's best) with a lower "
            f"solver.lr and a gradient cap: tools/train.py {config} --resume-from "
            f"{healthy[-1]} {opts}"
        )
    return text + (
        f" No checkpoint of this run predates the divergence: restart with a lower "
        f"solver.lr, a longer solver.warmup_iters and a gradient cap, e.g. "
        f"tools/train.py {config} {opts} output_dir=NEW_DIR"
    )


def stop_message(
    *,
    it: int,
    epoch: int,
    terms: list,
    lr: float,
    base_lr: float,
    clip,
    streak: int,
    allowed: int,
    checkpoints: list,
    config="CONFIG",
) -> str:
    """The message of the NonFiniteLossError raised at iteration `it` (1-based)."""
    what = ", ".join(terms)
    if allowed:
        head = (
            f"{streak} non-finite steps in a row at iteration {it} (epoch {epoch}; "
            f"solver.skip_nonfinite={allowed}): {what}."
        )
    else:
        head = f"non-finite loss at iteration {it} (epoch {epoch}): {what}."
    hint = advice(lr=lr, base_lr=base_lr, clip=clip, checkpoints=checkpoints, config=config)
    return f"{head} {hint}."
