"""OpenCV / NumPy detection transforms on ``(image, target)`` pairs.

``image``: ndarray ``[H, W, 3]`` uint8 RGB until `ToTensor`, then FloatTensor ``[3, H, W]`` in
``[0, 1]``. ``target``: the data set's dict; ``boxes`` float32 ``[K, 4]`` xyxy pixels, ``labels``
int64 ``[K]`` in ``1..C`` (torchvision convention, 0 = background) are left untouched. Geometric
transforms keep ``target["scale"]`` (resized / original size, composed multiplicatively) and
``target["flipped"]`` up to date so predictions can be mapped back to the original image.
Instance masks (``target["masks"]``, uint8 ``[K, H, W]`` tensors, Mask R-CNN) move with the
image: resized by nearest neighbour to the resized image's size (torchvision's
``GeneralizedRCNNTransform`` rule for target masks), mirrored with it (flipping twice is the
identity).

Random choices use torch's global generator, which the DataLoader seeds per worker.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Compose",
    "RandomHorizontalFlip",
    "ResizeShortestEdge",
    "ToTensor",
    "build_transforms",
    "resize_masks",
]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Iterable[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self):
        return f"Compose({self.transforms!r})"


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 masks ``[K, h, w]`` -> ``[K, height, width]`` by nearest neighbour (source pixel
    ``floor(i * h / height)``), as torchvision's ``GeneralizedRCNNTransform`` resizes masks."""
    if tuple(masks.shape[-2:]) == (height, width):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width))
    return F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0].to(
        masks.dtype
    )


class ResizeShortestEdge:
    """Resize so the shorter side is ``s`` (drawn uniformly from ``min_sizes`` - multi-scale
    training; pass one size at test time) unless the longer side would exceed ``max_size``, in
    which case the longer side becomes ``max_size`` (Faster R-CNN's rule, as in detectron2).

    One scale factor ``scale = s / min(h, w)`` (or ``max_size / max(h, w)``) multiplies the boxes;
    the output size is ``round(h * scale), round(w * scale)``, so boxes divided by
    ``target["scale"]`` are exactly the original boxes.
    """

    def __init__(self, min_sizes: int | Sequence[int], max_size: int):
        sizes = (min_sizes,) if isinstance(min_sizes, (int, np.integer)) else tuple(min_sizes)
        if len(sizes) == 0 or any(int(s) <= 0 for s in sizes):
            raise ValueError(
                f"ResizeShortestEdge: min_sizes must be positive sizes, got {min_sizes!r}"
            )
        if max_size is None or int(max_size) <= 0:
            raise ValueError(
                f"ResizeShortestEdge: max_size must be a positive size, got {max_size!r}"
            )
        self.min_sizes = tuple(int(s) for s in sizes)
        self.max_size = int(max_size)

    def get_scale(self, h: int, w: int, min_size: int) -> float:
        scale = min_size / min(h, w)
        if max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return scale

    def __call__(self, image: np.ndarray, target: dict):
        h, w = image.shape[:2]
        if len(self.min_sizes) == 1:
            size = self.min_sizes[0]
        else:
            size = self.min_sizes[int(torch.randint(len(self.min_sizes), ()).item())]
        scale = self.get_scale(h, w, size)
        new_h, new_w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        # INTER_LINEAR matches torchvision's bilinear resize of the image tensor.
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        target = dict(target)
        boxes = target["boxes"] * scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_h)
        target["boxes"] = boxes
        target["scale"] = float(target.get("scale", 1.0)) * scale
        if "masks" in target:
            target["masks"] = resize_masks(target["masks"], new_h, new_w)
        return image, target

    def __repr__(self):
        return f"ResizeShortestEdge(min_sizes={self.min_sizes}, max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror the image with probability ``p``; boxes ``x1' = W - x2, x2' = W - x1``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, image: np.ndarray, target: dict):
        if self.p <= 0.0 or torch.rand(()).item() >= self.p:
            return image, target
        w = image.shape[1]
        image = np.ascontiguousarray(image[:, ::-1])
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, 0] = w - target["boxes"][:, 2]
        boxes[:, 2] = w - target["boxes"][:, 0]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        target["flipped"] = not target.get("flipped", False)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class ToTensor:
    """HWC uint8 RGB ndarray -> FloatTensor ``[3, H, W]`` in ``[0, 1]``."""

    def __call__(self, image: np.ndarray, target: dict):
        tensor = (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        )
        return tensor, target

    def __repr__(self):
        return "ToTensor()"


def build_transforms(cfg_data: Mapping, train: bool) -> Compose:
    """Training: multi-scale `ResizeShortestEdge(min_size, max_size)` + flip (``hflip_prob``);
    test: `ResizeShortestEdge(test_min_size, max_size)`; both end with `ToTensor`."""
    max_size = cfg_data["max_size"]
    if train:
        steps: list = [ResizeShortestEdge(cfg_data["min_size"], max_size)]
        prob = float(cfg_data["hflip_prob"])
        if prob > 0:
            steps.append(RandomHorizontalFlip(prob))
    else:
        steps = [ResizeShortestEdge(cfg_data["test_min_size"], max_size)]
    steps.append(ToTensor())
    return Compose(steps)
