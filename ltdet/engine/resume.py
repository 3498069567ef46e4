"""What `--resume` may change, and applying those changes to the restored optimizer and schedule.

On resume the newly resolved config is compared with the checkpoint's. Keys of the schedule and
of the bookkeeping (`RESUMABLE`) may change: they take effect from the resume iteration and are
logged. Every other key defines the model, the data or the sampling (arch, backbone, classes,
losses, samplers, data files, batch size, seed, ...): a difference stops the run, with one message
listing each differing key and both values, before anything in output_dir is written.
"""

import logging

from ltdet.config import ConfigError, load_schema

logger = logging.getLogger(__name__)

#: Dotted keys (or prefixes ending in ".") that may differ between a checkpoint and its resume.
RESUMABLE = (
    "solver.lr",
    "solver.momentum",
    "solver.weight_decay",
    "solver.max_iter",
    "solver.warmup_iters",
    "solver.warmup_factor",
    "solver.schedule",
    "solver.steps",
    "solver.gamma",
    "solver.clip_grad_norm",
    "solver.skip_nonfinite",
    "solver.checkpoint_period",
    "solver.eval_period",
    "solver.log_period",
    "solver.keep_checkpoints",
    # evaluation and loading only: nothing the weights or the training samples depend on
    "data.val.",
    "data.test_min_size",
    "data.num_workers",
    "test.",
    "device",
    "output_dir",
    "dist_timeout",
    # only the initial weights depend on it, and on resume they come from the checkpoint
    "model.cls_prior_prob",
)


class ResumeConfigError(ConfigError):
    """The config given to --resume differs from the checkpoint's in keys that cannot change."""


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"solver.lr": 0.02, ...}: every leaf of a nested config (lists are leaves)."""
    flat = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


_MISSING = "<absent>"


def compare_configs(saved: dict, new: dict, checkpoint) -> dict:
    """{key: (saved value, new value)} of the resumable keys that changed.

    Raises ResumeConfigError listing every other changed key with both values."""
    # A key the checkpoint's config lacks was added to the schema after it was written: it had
    # the schema's default then (so an old checkpoint resumes under a newer ltdet).
    defaults = flatten(load_schema())
    old_flat, new_flat = flatten(saved), flatten(new)
    for key in set(new_flat) - set(old_flat):
        if key in defaults:
            old_flat[key] = defaults[key]
    changed = {
        k: (old_flat.get(k, _MISSING), new_flat.get(k, _MISSING))
        for k in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(k, _MISSING) != new_flat.get(k, _MISSING)
    }
    fixed = {k: v for k, v in changed.items() if not _resumable(k)}
    if fixed:
        lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in fixed.items())
        raise ResumeConfigError(
            f"--resume from {checkpoint}: the config changes {len(fixed)} key(s) that define the "
            f"model or the data and cannot change on resume: {lines}. Resume with the "
            f"checkpoint's values (its config.yaml), or start a new run in another output_dir "
            f"(stage 2 / model.weights to start from these weights). Nothing was written."
        )
    return {k: v for k, v in changed.items() if _resumable(k)}


def apply_solver(optimizer, scheduler, saved_solver: dict, solver: dict) -> None:
    """Make the restored optimizer and schedule follow `solver` from the resume iteration.

    `optimizer.load_state_dict` restores the saved lr / momentum / weight decay of every param
    group and `LambdaLR.load_state_dict` the saved base lrs, so without this a changed
    `solver.lr` would be silently ignored. Only changed keys are applied: a changed lr scales
    every group's base lr (per-group ratios are kept); a changed momentum / weight decay is set
    in the groups that had the old global value (a group with its own, e.g. stage 2's scales
    without weight decay, keeps it). The lr of the next step is recomputed with the new schedule
    (`scheduler.lr_lambdas` are built from the new config); with an unchanged config every value
    is recomputed bit for bit."""
    old_lr, new_lr = float(saved_solver["lr"]), float(solver["lr"])
    for i, group in enumerate(optimizer.param_groups):
        if new_lr != old_lr:
            base = scheduler.base_lrs[i] * new_lr / old_lr if old_lr != 0 else new_lr
            scheduler.base_lrs[i] = base
            group["initial_lr"] = base
        for key in ("momentum", "weight_decay"):
            old, new = saved_solver.get(key, solver[key]), solver[key]
            if new != old and group.get(key) == old:
                group[key] = new
        group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
