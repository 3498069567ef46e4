"""Atomic file writes: the one writer behind config.yaml, checkpoints, detections and data sets.

`atomic_write(path, write_fn)` writes to a temporary file next to `path`, flushes and fsyncs it,
then `os.replace`s it onto `path` (atomic on POSIX), so a reader or a crash never sees half a
file. Two things `tempfile.mkstemp` gets wrong for output files are fixed here:

* permissions: mkstemp creates mode 0600; the final file gets the mode any other file of the
  user gets (0666 minus the umask), so a group-readable run folder stays group-readable;
* a full disk: the write fails with `OSError(ENOSPC)` (or torch's opaque `enforce fail` for a
  checkpoint); it is re-raised as `OSError` saying "no space left on device while writing FILE",
  and the temporary file is removed.

Temporary files are named `.NAME.XXXXXXXX.tmp`; `remove_stale_tmp(folder)` deletes those a killed
process left behind.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["atomic_write", "remove_stale_tmp"]

TMP_SUFFIX = ".tmp"
#: Below this much free space a failed checkpoint write is reported as a full disk.
FULL_DISK_BYTES = 64 * 2**20


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save reports a failed write from its C++ zip writer as an opaque RuntimeError
    # ("[enforce fail at inline_container.cc:...]"); it is a full disk when the disk is full.
    return (
        isinstance(exc, RuntimeError)
        and "inline_container" in str(exc)
        and _free_bytes(folder) < FULL_DISK_BYTES
    )


def _free_bytes(folder: Path) -> float:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return float("inf")


def atomic_write(
    path: str | os.PathLike, write_fn: Callable[[IO[Any]], Any], *, text: bool = False
) -> None:
    """Call `write_fn(file_object)` on a temporary file next to `path`, then move it onto `path`.

    text: open the temporary file in text mode (utf-8) instead of binary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        mode = "w" if text else "wb"
        with os.fdopen(fd, mode, encoding="utf-8" if text else None) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # measured before the partial file is removed: that file is what filled the disk
        full, free = _is_disk_full(e, path.parent), _free_bytes(path.parent)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while writing {path} "
                f"({free / 2**20:.0f} MiB free in {path.parent}); free "
                f"space or choose another output_dir",
            ) from e
        raise
    _fsync_dir(path.parent)


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted `atomic_write`s in `folder`; returns them.

    Only call it where no other process is writing (rank 0, before training starts)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)
    ]
    for p in stale:
        p.unlink()
    if stale:
        logger.info(
            "removed %d temporary file(s) left by an interrupted write in %s: %s",
            len(stale),
            folder,
            ", ".join(p.name for p in stale),
        )
    return stale
