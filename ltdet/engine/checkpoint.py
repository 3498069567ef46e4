"""Atomic checkpoints and exact-resume state.

A checkpoint is written to a temporary file in the target folder, flushed and fsync'ed, then
`os.replace`d onto its final name (atomic on POSIX), and only then does the `last_checkpoint`
pointer (itself replaced atomically) move to it. A crash at any moment therefore leaves the
previous checkpoint and a pointer to it intact.

Checkpoint contents (a dict saved with `torch.save`):
  model, optimizer, scheduler, scaler (state dicts; scaler None without AMP), iteration (number of
  optimizer steps done), config, and `rank_states`: one entry per rank with its data position
  (epoch, batches consumed in that epoch) and its python / numpy / torch (CPU and CUDA) RNG states.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ltdet.fileio import atomic_write, remove_stale_tmp

__all__ = ["Checkpointer", "CheckpointError", "load_checkpoint", "rng_state", "set_rng_state"]

logger = logging.getLogger(__name__)

POINTER = "last_checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the model or the run."""


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves `model_{iteration:07d}.pth` files in `folder` and keeps the `last_checkpoint` pointer.

    keep: keep only the newest `keep` model files (`solver.keep_checkpoints`; None keeps all);
    older ones are deleted after each successful save, never the one just written.
    Only call `save` and `remove_stale_tmp` on the main process; all ranks may load.
    """

    def __init__(self, folder: str | Path, keep: int | None = None):
        self.folder = Path(folder)
        if keep is not None and keep < 1:
            raise ValueError(f"solver.keep_checkpoints must be >= 1 or null, got {keep}")
        self.keep = keep

    def save(self, name: str, state: dict, protect: Iterable = ()) -> Path:
        """Write `name` atomically and point `last_checkpoint` at it; with `keep`, delete the
        oldest model files beyond it, except `name` and the paths in `protect`."""
        path = self.folder / name
        atomic_write(path, lambda f: torch.save(state, f))
        self.point_to(path)
        logger.info("saved checkpoint %s", path)
        if self.keep is not None:
            keep = {Path(p) for p in protect} | {path}
            for old in self.checkpoints()[: -self.keep]:
                if old not in keep:
                    old.unlink()
                    logger.info("removed %s (solver.keep_checkpoints=%d)", old, self.keep)
        return path

    def point_to(self, path: str | Path) -> None:
        """Make `last_checkpoint` name `path` (a file in this folder)."""
        atomic_write(self.folder / POINTER, lambda f: f.write(Path(path).name.encode()))

    def checkpoints(self) -> list[Path]:
        """The model files in the folder, oldest (lowest iteration) first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("model_*.pth") if p.is_file())

    def remove_stale_tmp(self) -> list[Path]:
        """Delete the temporary files of checkpoint writes a killed process left behind."""
        return remove_stale_tmp(self.folder)

    def last(self) -> Path | None:
        """Path of the last complete checkpoint, or None when there is none."""
        pointer = self.folder / POINTER
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{pointer} names {name}, which does not exist in {self.folder}; delete the "
                "pointer to start from scratch, or write the name of an existing checkpoint in it"
            )
        return path

    def load_last(self) -> tuple[Path | None, dict | None]:
        """(path, checkpoint) of the newest checkpoint that loads, or (None, None) when the
        folder has none. A damaged or missing last checkpoint (a truncated file, a pointer to a
        deleted file) falls back to the newest older one that loads, with a warning naming
        both; when none loads, the error lists what was tried."""
        pointer = self.folder / POINTER
        if not pointer.is_file() and not self.checkpoints():
            return None, None
        named = self.folder / pointer.read_text().strip() if pointer.is_file() else None
        # fall back to older checkpoints only: a newer file than the pointer's is a leftover of
        # a run that was continued from an earlier checkpoint (e.g. after a divergence)
        candidates = [p for p in reversed(self.checkpoints()) if named is None or p < named]
        if named is not None:
            candidates.insert(0, named)
        errors = []
        for path in candidates:
            try:
                ckpt = load_checkpoint(path)
            except (CheckpointError, FileNotFoundError) as e:
                errors.append(f"{path.name}: {e}")
                continue
            if errors:
                logger.warning(
                    "--resume: %s; resuming from %s, the newest checkpoint that loads",
                    "; ".join(errors),
                    path,
                )
            return path, ckpt
        raise CheckpointError(
            f"--resume: no checkpoint in {self.folder} loads "
            f"({'; '.join(errors)}); start a new run (another output_dir, "
            f"or --overwrite)"
        )


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by `Checkpointer` (or any dict with a `model` state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Checkpoints hold RNG states and the config (numpy / python objects), hence not
        # weights_only.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {e}; the file is damaged or not a torch checkpoint"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not an ltdet checkpoint (no 'model' entry)")
    return ckpt
