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
import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

POINTER = "last_checkpoint"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write_fn) -> None:
    """Call `write_fn(file_object)` on a temporary file next to `path`, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
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

    Only call `save` on the main process; all ranks may `load`.
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    def save(self, name: str, state: dict) -> Path:
        path = self.folder / name
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write(self.folder / POINTER, lambda f: f.write(name.encode()))
        logger.info("saved checkpoint %s", path)
        return path

    def last(self):
        """Path of the last complete checkpoint, or None when there is none."""
        pointer = self.folder / POINTER
        if not pointer.is_file():
            return None
        name = pointer.read_text().strip()
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{pointer} names {name}, which does not exist in {self.folder}; delete the "
                "pointer to start from scratch, or write the name of an existing checkpoint in it")
        return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by `Checkpointer` (or any dict with a `model` state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Checkpoints hold RNG states and the config (numpy / python objects), hence not weights_only.
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {e}; the file is damaged or not a "
                           "torch checkpoint") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RuntimeError(f"{path} is not an ltdet checkpoint (no 'model' entry)")
    return ckpt
