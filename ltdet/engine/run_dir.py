"""A run's output_dir before training starts: continue the run in it (``--resume``), refuse to
overwrite a previous run by accident, or delete it on purpose (``--overwrite``).

`open_run_dir` is called by every rank with the same arguments; only rank 0 writes, and every
rank leaves it after the barrier that follows rank 0's cleaning.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ltdet.config import ConfigError
from ltdet.fileio import remove_stale_tmp

from . import distributed as du
from .checkpoint import Checkpointer, load_checkpoint
from .resume import compare_configs

__all__ = ["OutputDirError", "RUN_FILES", "ResumePoint", "open_run_dir"]

logger = logging.getLogger(__name__)

#: What --overwrite deletes besides the checkpoints: the previous run's log and results, so
#: that nothing stale (e.g. its metrics.json) is read as this run's.
RUN_FILES = (
    "log.jsonl",
    "metrics.json",
    "detections.json",
    "per_class_ap.csv",
    "ap_vs_frequency.png",
    "demo_summary.json",
    # a mask model's segm report, test.topk_per_class's Fixed AP report
    "per_class_ap_segm.csv",
    "ap_vs_frequency_segm.png",
    "detections_topk.json",
    "per_class_ap_fixed.csv",
    "ap_vs_frequency_fixed.png",
    "per_class_ap_segm_fixed.csv",
    "ap_vs_frequency_segm_fixed.png",
)


class OutputDirError(ConfigError):
    """A fresh run was pointed at an output_dir holding a previous run."""


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from (``path`` None: none, start from scratch)
    and the resumable config keys that changed since it was written (key -> (old, new))."""

    path: Path | None = None
    checkpoint: dict | None = None
    changes: dict = field(default_factory=dict)


def open_run_dir(
    cfg: dict,
    output_dir: Path,
    checkpointer: Checkpointer,
    *,
    resume: bool,
    resume_from=None,
    overwrite: bool,
    is_main: bool,
) -> ResumePoint:
    """Check and prepare ``output_dir`` for a run; returns where a resumed run continues.

    resume: continue from the last checkpoint of ``output_dir`` (or ``resume_from``); its config
        is compared with ``cfg`` first (`ltdet.engine.resume.compare_configs`).
    overwrite: a fresh run into an output_dir holding a previous run's checkpoints or log.jsonl
        is refused (`OutputDirError`) unless this is set; then they are deleted first.
    Nothing in ``output_dir`` is written before every check has passed."""
    point = ResumePoint()
    outside = False
    if resume:
        if resume_from is not None:
            point.path = Path(resume_from)
            point.checkpoint = load_checkpoint(point.path, map_location="cpu")
            outside = point.path.resolve().parent != checkpointer.folder.resolve()
        else:
            point.path, point.checkpoint = checkpointer.load_last()
        if point.path is not None and point.checkpoint is not None:  # both or neither
            point.changes = compare_configs(point.checkpoint["config"], cfg, point.path)
    if not resume or outside:
        # a fresh run, or one continuing another run's checkpoint, writes into output_dir
        previous = _previous_run(output_dir, checkpointer)
        if previous and not overwrite:
            raise OutputDirError(
                f"output_dir {output_dir} holds a previous run ({', '.join(previous)}); "
                f"continue it with --resume, choose another output_dir, or pass --overwrite "
                f"to delete its checkpoints and log.jsonl and start again"
            )
    if is_main:
        remove_stale_tmp(output_dir)
        checkpointer.remove_stale_tmp()
        if overwrite:
            _delete_previous_run(output_dir, checkpointer)
        if point.path is not None and not outside:
            # Continue from this checkpoint: the pointer moves back to it at once, so a kill
            # before the next save does not resume from a newer (diverged) checkpoint.
            checkpointer.point_to(point.path)
    # no rank looks at output_dir again before rank 0 has cleaned it
    du.barrier("barrier after cleaning output_dir")
    return point


def _previous_run(output_dir: Path, checkpointer: Checkpointer) -> list:
    """What a previous run left in output_dir that a fresh run would overwrite."""
    found = [p.name for p in checkpointer.checkpoints()]
    if (checkpointer.folder / "last_checkpoint").is_file():
        found.append("checkpoints/last_checkpoint")
    log = output_dir / "log.jsonl"
    if log.is_file() and log.stat().st_size > 0:
        found.append("log.jsonl")
    if len(found) > 4:
        found = found[:3] + [f"... {len(found) - 3} more"]
    return found


def _delete_previous_run(output_dir: Path, checkpointer: Checkpointer) -> None:
    files = [
        p
        for p in checkpointer.checkpoints()
        + [checkpointer.folder / "last_checkpoint"]
        + [output_dir / name for name in RUN_FILES]
        if p.is_file()
    ]
    for path in files:
        path.unlink()
    if (output_dir / "eval").is_dir():
        shutil.rmtree(output_dir / "eval")
        files.append(output_dir / "eval")
    if files:
        logger.warning(
            "--overwrite: deleted the previous run in %s: %s",
            output_dir,
            ", ".join(p.name for p in files),
        )
