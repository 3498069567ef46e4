"""Image-level mixup for detection training.

Zhang et al., "Bag of Freebies for Training Object Detection Neural Networks", 2019, Sec. 3.1:
two training images are blended, ``x = lambda * x_i + (1 - lambda) * x_j`` with
``lambda ~ Beta(alpha, alpha)`` (the paper uses ``alpha = 1.5``), on a canvas of the larger
height and width (each image anchored at the top-left corner, the rest zero, so box coordinates
are unchanged); the boxes of *both* images are kept, and each box's loss is weighted by its
image's blending ratio. The weights go in ``targets[k]["weights"]`` (float ``[K]``), which
``LTRoIHeads`` multiplies into the per-RoI losses of the RoIs matched to that box.

Shapes: ``images`` list of ``[3, H_k, W_k]`` float tensors; ``targets`` list of dicts with
``boxes [K, 4]`` xyxy, ``labels int64 [K]`` in ``[1, C]`` and optionally ``weights [K]`` and
``masks [K, H_k, W_k]`` (Mask R-CNN: each image's masks are zero-padded to the canvas, anchored at
the top-left as the image, and concatenated like the boxes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["mixup_detection"]

# The per-box fields "boxes", "labels", "weights" (and "masks", padded to the canvas) are merged
# across the two images; every other field is per image and is taken from the base image.
# Keypoints would need their visibility merged as well, which mixup does not do:
_UNSUPPORTED_KEYS = ("keypoints",)


def _box_weights(target: Mapping) -> Tensor:
    boxes = target["boxes"]
    w = target.get("weights")
    if w is None:
        return torch.ones(boxes.shape[0], dtype=torch.float32, device=boxes.device)
    return w.to(torch.float32)


def _pad_to(image: Tensor, height: int, width: int) -> Tensor:
    return torch.nn.functional.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))


def mixup_detection(
    images: Sequence[Tensor],
    targets: Sequence[Mapping],
    *,
    alpha: float = 1.5,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[dict]]:
    """Mix each image of a batch, with probability ``prob``, with another image of the batch.

    Pairing: a random cyclic shift ``s in [1, B-1]`` pairs image ``i`` with image ``(i + s) % B``
    (never itself). For each mixed image a fresh ``lambda ~ Beta(alpha, alpha)`` is drawn; its boxes
    get weight ``lambda`` (times any existing weight), the partner's boxes ``1 - lambda``. Images
    that are not mixed are returned unchanged with weights 1, so every output target carries
    ``weights``. The inputs are not modified.

    Args:
        images, targets: one training batch (after the data transforms, any device).
        alpha: Beta concentration (``> 0``).
        prob: probability that an image is mixed (``[0, 1]``).
        generator: CPU ``torch.Generator`` driving all the randomness (pairing, coin flips, and the
            seed of the NumPy Beta sampler, since torch's Beta sampler takes no generator).
    Returns:
        ``(images, targets)``: new lists.
    """
    if len(images) != len(targets):
        raise ValueError(f"mixup_detection: {len(images)} images but {len(targets)} targets")
    if not alpha > 0:
        raise ValueError(f"data.mixup.alpha must be > 0, got {alpha}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"data.mixup.prob must be in [0, 1], got {prob}")
    for k, t in enumerate(targets):
        bad = [key for key in _UNSUPPORTED_KEYS if key in t]
        if bad:
            raise ValueError(
                f"mixup_detection: target {k} (image_id {t.get('image_id')}) has {bad}; "
                "image mixup supports boxes and masks only - disable data.mixup for keypoint "
                "training"
            )
    with_masks = ["masks" in t for t in targets]
    if any(with_masks) and not all(with_masks):
        k = with_masks.index(False)
        raise ValueError(
            f"mixup_detection: target {k} (image_id {targets[k].get('image_id')}) "
            "has no 'masks' while others have; give every image masks or none"
        )
    n = len(images)
    out_images = list(images)
    out_targets = [{**t, "weights": _box_weights(t)} for t in targets]
    if n < 2 or prob == 0.0:
        return out_images, out_targets
    shift = int(torch.randint(1, n, (1,), generator=generator))
    coins = torch.rand(n, generator=generator) < prob
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lambdas = np.random.default_rng(seed).beta(alpha, alpha, size=n)
    for i in range(n):
        if not coins[i]:
            continue
        j = (i + shift) % n
        lam = float(lambdas[i])
        a, b = images[i], images[j]
        h, w = max(a.shape[-2], b.shape[-2]), max(a.shape[-1], b.shape[-1])
        out_images[i] = lam * _pad_to(a, h, w) + (1.0 - lam) * _pad_to(b.to(a), h, w)
        ti, tj = targets[i], targets[j]
        wj = _box_weights(tj).to(ti["boxes"].device)
        out_targets[i] = {
            **ti,
            "boxes": torch.cat([ti["boxes"], tj["boxes"].to(ti["boxes"])]),
            "labels": torch.cat([ti["labels"], tj["labels"].to(ti["labels"])]),
            "weights": torch.cat([lam * _box_weights(ti), (1.0 - lam) * wj]),
        }
        if "masks" in ti:
            out_targets[i]["masks"] = torch.cat(
                [_pad_to(ti["masks"], h, w), _pad_to(tj["masks"].to(ti["masks"]), h, w)]
            )
    return out_images, out_targets
