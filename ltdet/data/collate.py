"""Batch collation for detection: images differ in size, so a batch stays a pair of lists.

``collate_detection([(image [3, H_i, W_i], target_i), ...]) -> ([image_i], [target_i])``, the
input format of torchvision detectors (which pad and batch the images themselves).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["collate_detection"]


def collate_detection(batch: Sequence[tuple[Any, dict]]) -> tuple[list, list[dict]]:
    """``[(image, target), ...] -> (list of images, list of targets)``."""
    if len(batch) == 0:
        raise ValueError(
            "collate_detection got an empty batch; check that the sampler yields "
            "non-empty batches (data.batch_size >= 1)"
        )
    images, targets = zip(*batch)
    return list(images), list(targets)
