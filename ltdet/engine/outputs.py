"""From a detector's outputs to evaluation inputs: original-image boxes and RLE masks.

A Mask R-CNN output's ``masks`` are the head's ``[N, 1, 28, 28]`` probabilities when the model's
`NoResizeTransform` has ``paste_masks`` off (`unpasted_masks`): they are pasted here straight
into the *original* image with the original-coordinate boxes (torchvision's
``paste_masks_in_image``, as its own transform does when it resized the input), thresholded at
0.5 and run-length encoded (pycocotools' compressed RLE, ``{"size": [h, w], "counts": str}``), a
chunk of masks at a time so that no ``[N, H, W]`` float tensor of a whole image is held. Masks
already pasted at the model's input size (a model whose transform pastes) are resized to the
original size (bilinear) before thresholding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import paste_masks_in_image

__all__ = ["MASK_THRESHOLD", "encode_rle", "masks_to_rle", "unpasted_masks"]

#: torchvision's and detectron2's binarisation of mask probabilities
MASK_THRESHOLD = 0.5
# masks pasted at once: [64, H, W] float32 of a 640x480 LVIS image is 79 MB
_CHUNK = 64


@contextlib.contextmanager
def unpasted_masks(model: torch.nn.Module) -> Iterator[bool]:
    """Within the block the model's transform leaves masks unpasted (yields whether it could)."""
    transform = getattr(model, "transform", None)
    if transform is None or not hasattr(transform, "paste_masks"):
        yield False
        return
    before = transform.paste_masks
    transform.paste_masks = False
    try:
        yield True
    finally:
        transform.paste_masks = before


def encode_rle(masks: Tensor) -> list[dict[str, Any]]:
    """Binary masks ``[N, H, W]`` (bool / uint8) -> compressed RLE dicts with ``counts`` str, one
    ``pycocotools.mask.encode`` call (its input: Fortran-ordered uint8 ``[H, W, N]``)."""
    if masks.shape[0] == 0:
        return []
    # [N, W, H] C-contiguous is the memory of a Fortran-ordered [H, W, N] array
    arr = masks.to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy().transpose(2, 1, 0)
    return [
        {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
        for r in mask_utils.encode(np.asfortranarray(arr))
    ]


def masks_to_rle(
    masks: Tensor, boxes: Tensor, size: tuple[int, int], *, pasted: bool = False
) -> list[dict[str, Any]]:
    """RLE masks in the original image (``size`` = (h, w)) of ``masks``: ``[N, 1, M, M]`` head
    probabilities pasted with ``boxes`` (``[N, 4]`` xyxy, original pixels), or with ``pasted``
    ``[N, 1, h', w']`` probabilities already pasted at the model's input size, resized;
    thresholded at `MASK_THRESHOLD`."""
    h, w = int(size[0]), int(size[1])
    out: list[dict[str, Any]] = []
    for a in range(0, masks.shape[0], _CHUNK):
        m = masks[a : a + _CHUNK].float()
        if not pasted:
            m = paste_masks_in_image(m, boxes[a : a + _CHUNK].to(m.device).float(), (h, w))
        elif tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out.extend(encode_rle(m[:, 0] > MASK_THRESHOLD))
    return out
