"""The training state a checkpoint carries besides the weights, and how a resumed run gets it
back: every rank's data position and RNG states, the optimizer, schedule and GradScaler, and the
class information (`training_meta`) that evaluating the checkpoint needs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import torch

from . import distributed as du
from .checkpoint import rng_state, set_rng_state
from .nonfinite import NonFiniteLossError, nonfinite_state
from .resume import apply_solver

__all__ = ["gather_rank_states", "restore_train_state", "training_meta"]

logger = logging.getLogger(__name__)


def training_meta(cat_ids, stats, stage2: bool) -> dict:
    """The checkpoint's ``meta``: the training classes and statistics, and whether the model is
    a stage-2 model (`evaluate_checkpoint` rebuilds the model from it)."""
    return {
        "cat_ids": list(cat_ids),
        "stage2": stage2,
        "stats": {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)},
    }


def gather_rank_states(
    model: torch.nn.Module,
    *,
    it: int,
    epoch: int,
    position: int,
    name: str,
    advice_tail: Callable[[], str],
) -> list[dict]:
    """Every rank's data position (epoch, batches done) and RNG states, for checkpoint ``name``.

    Steps with a non-finite loss or gradient are never applied, but a finite step can still
    overflow a weight: such a model is never written. Every rank checks its own state
    (BatchNorm statistics differ between ranks) and they decide together - one rank raising
    alone would leave the others in the collective - by raising `NonFiniteLossError`."""
    rank_states = du.all_gather_object(
        {
            "epoch": epoch,
            "position": position,
            "rng": rng_state(),
            "nonfinite": nonfinite_state(model),
        },
        op="all_gather_object of rank states",
    )
    bad = [
        f"rank {r}: {', '.join(state['nonfinite'])}"
        for r, state in enumerate(rank_states)
        if state["nonfinite"]
    ]
    for state in rank_states:
        del state["nonfinite"]
    if bad:
        raise NonFiniteLossError(
            f"the weights are non-finite after iteration {it} ({'; '.join(bad)}); the "
            f"checkpoint {name} was not written. " + advice_tail()
        )
    return rank_states


def restore_train_state(
    ckpt: dict,
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    scaler,
    solver: dict,
    info: du.DistInfo,
) -> tuple[int, int, int]:
    """Load ``ckpt`` (read from ``path``) into the model, optimizer, schedule and scaler and set
    this rank's RNG states; returns (iteration, epoch, position) to continue from."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    # The saved optimizer / schedule carry the old lr, momentum and weight decay.
    apply_solver(optimizer, scheduler, ckpt["config"]["solver"], solver)
    if ckpt.get("scaler") is not None and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    states = ckpt["rank_states"]
    if len(states) == info.world_size:
        mine = states[info.rank]
        epoch, position = mine["epoch"], mine["position"]
        set_rng_state(mine["rng"])
    else:
        # The data shards depend on the world size: the interrupted epoch cannot be
        # continued sample for sample, so the next epoch starts.
        epoch, position = max(s["epoch"] for s in states) + 1, 0
        logger.warning(
            "checkpoint %s was written by %d processes, this run has %d: "
            "resuming at the start of epoch %d",
            path,
            len(states),
            info.world_size,
            epoch,
        )
    logger.info(
        "resumed from %s at iteration %d (epoch %d, batch %d)",
        path,
        ckpt["iteration"],
        epoch,
        position,
    )
    return ckpt["iteration"], epoch, position
