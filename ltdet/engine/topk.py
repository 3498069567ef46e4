"""Top-k-per-class inference: the K best detections of each class over a whole evaluation set.

Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in the Details", 2021
(github:achalddave/large-vocab-devil): Fixed AP ranks each class's detections over the data set,
so the detector must output the top K of every class (K = 10,000 for LVIS), not the top 300 of
every image. `TopKPerClass` keeps them with bounded memory:

* a per-class threshold - the score of the class's K-th kept detection once it has K, else
  -inf - refuses at once every candidate that cannot enter (a heap's test, vectorised over the
  image's candidates: `admits`), so masks need only be encoded for the admitted ones;
* admitted candidates wait in a buffer; when the buffer holds `merge_every` entries, pool and
  buffer are merged: one stable sort by score (descending) and one by class, a rank within the
  class from the class's first position, entries of rank < K kept. No Python loop over boxes.

Memory: at most ``C * K + merge_every + (one image's candidates)`` entries (`peak_size` records
it). The result equals a brute-force top-K per class of all candidates, ties broken by arrival
order (the earlier candidate first), whatever `merge_every` is.

Entries are columns: ``labels`` int64 (``1..C``), ``scores`` float32, ``image_ids`` int64,
``boxes`` float32 ``[N, 4]``, and optionally ``segm``, a NumPy object array of RLE dicts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TopKPerClass", "topk_per_class_indices"]


def topk_per_class_indices(labels: Tensor, scores: Tensor, k: int) -> Tensor:
    """Indices (into the inputs) of the ``k`` highest-scoring entries of every label, ties to
    the earlier entry; ordered by label, then by score descending."""
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(labels[order], stable=True).indices]
    sorted_labels = labels[order]
    # first position of each entry's label in the label-sorted list -> rank within the label
    start = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.arange(order.numel()) - start
    return order[rank < k]


class TopKPerClass:
    """Keeps the ``k`` best detections of each of ``num_classes`` classes (labels ``1..C``) over
    everything `add`-ed, in bounded memory (module docstring).

    Args:
        num_classes: C.
        k: detections kept per class (``> 0``).
        merge_every: buffered entries that trigger a merge (default ``max(C * k, 65536)``: the
            merges then cost O(total log total) and memory stays within ~2x the result).
    """

    _FIELDS = ("labels", "scores", "image_ids", "boxes", "segm")

    def __init__(self, num_classes: int, k: int, merge_every: int | None = None):
        if int(k) <= 0:
            raise ValueError(
                f"test.topk_per_class must be a positive number of detections per "
                f"class (0 = off), got {k!r}"
            )
        self.num_classes = int(num_classes)
        self.k = int(k)
        self.merge_every = int(
            merge_every if merge_every is not None else max(self.num_classes * self.k, 1 << 16)
        )
        # index = label; label 0 (background) never holds detections
        self._threshold = torch.full((self.num_classes + 1,), -float("inf"))
        self._pool: dict[str, Any] = self._empty()
        self._buffer: list[dict[str, Any]] = []
        self._buffered = 0
        self.with_segm: bool | None = None
        self.peak_size = 0
        self.seen = 0

    def _empty(self) -> dict[str, Any]:
        return {
            "labels": torch.zeros(0, dtype=torch.int64),
            "scores": torch.zeros(0, dtype=torch.float32),
            "image_ids": torch.zeros(0, dtype=torch.int64),
            "boxes": torch.zeros((0, 4), dtype=torch.float32),
            "segm": np.empty(0, dtype=object),
        }

    def __len__(self) -> int:
        return int(self._pool["labels"].numel()) + self._buffered

    def admits(self, labels: Tensor, scores: Tensor) -> Tensor:
        """Bool mask of the candidates that can still enter the top ``k`` of their class
        (score above the class's current K-th score)."""
        labels = labels.cpu().long()
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"TopKPerClass: labels must be in 1..{self.num_classes}, got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        return scores.cpu().float() > self._threshold[labels]

    def add(
        self, labels: Tensor, scores: Tensor, image_ids: Tensor, boxes: Tensor, segm: Any = None
    ) -> None:
        """Offer candidates (CPU or not; copied to CPU). Those `admits` refuses are dropped
        here; ``segm`` (a sequence of RLE dicts, one per candidate) only with mask models."""
        labels = labels.cpu().long().reshape(-1)
        n = labels.numel()
        self.seen += n
        if self.with_segm is None:
            self.with_segm = segm is not None
        elif self.with_segm != (segm is not None):
            raise ValueError("TopKPerClass: every add() must give masks (segm) or none")
        keep = self.admits(labels, scores)
        if not bool(keep.any()):
            return
        idx = torch.where(keep)[0]
        entry = {
            "labels": labels[idx],
            "scores": scores.cpu().float().reshape(-1)[idx],
            "image_ids": image_ids.cpu().long().reshape(-1)[idx],
            "boxes": boxes.cpu().float().reshape(-1, 4)[idx],
            "segm": (
                _object_array(segm, n)[idx.numpy()]
                if segm is not None
                else np.empty(idx.numel(), dtype=object)
            ),
        }
        self._buffer.append(entry)
        self._buffered += int(idx.numel())
        self.peak_size = max(self.peak_size, len(self))
        if self._buffered >= self.merge_every:
            self.merge()

    def add_pool(self, other: TopKPerClass | dict) -> None:
        """Merge another instance's (or its `state`'s) entries in: the other ranks' pools."""
        state = other.state() if isinstance(other, TopKPerClass) else other
        if len(state["labels"]) == 0:
            return
        self.add(
            torch.as_tensor(state["labels"]),
            torch.as_tensor(state["scores"]),
            torch.as_tensor(state["image_ids"]),
            torch.as_tensor(state["boxes"]),
            state["segm"] if state.get("segm") is not None else None,
        )

    def merge(self) -> None:
        """Fold the buffer into the pool, keeping the top ``k`` per class; updates thresholds."""
        if not self._buffer:
            return
        parts = [self._pool] + self._buffer
        cat: dict[str, Any] = {  # segm: a numpy array of RLEs; the other fields: tensors
            f: (
                np.concatenate([p[f] for p in parts])
                if f == "segm"
                else torch.cat([p[f] for p in parts])
            )
            for f in self._FIELDS
        }
        keep = topk_per_class_indices(cat["labels"], cat["scores"], self.k)
        self._pool = {f: (v[keep.numpy()] if f == "segm" else v[keep]) for f, v in cat.items()}
        self._buffer, self._buffered = [], 0
        labels, scores = self._pool["labels"], self._pool["scores"]
        counts = torch.bincount(labels, minlength=self.num_classes + 1)
        full = torch.where(counts >= self.k)[0]
        if full.numel():
            # the pool is sorted by label then score: the K-th of a full class is its last entry
            last = torch.cumsum(counts, 0)[full] - 1
            self._threshold[full] = scores[last]

    def state(self) -> dict[str, Any]:
        """The kept entries as columns (after a final merge): labels, scores, image_ids, boxes,
        segm (None for box models). Ordered by label, then score descending."""
        self.merge()
        pool = dict(self._pool)
        if not self.with_segm:
            pool["segm"] = None
        return pool

    def per_image(self, label_to_cat_id: Tensor) -> list[dict[str, Any]]:
        """The kept entries as per-image detection dicts (the `inference` contract: image_id,
        boxes, scores, category_ids, and segmentation for masks), by image id."""
        state = self.state()
        if state["labels"].numel() == 0:
            return []
        order = torch.sort(state["image_ids"], stable=True).indices
        ids = state["image_ids"][order]
        unique, counts = torch.unique_consecutive(ids, return_counts=True)
        out = []
        for img, rows in zip(unique.tolist(), torch.split(order, counts.tolist())):
            d = {
                "image_id": int(img),
                "boxes": state["boxes"][rows],
                "scores": state["scores"][rows],
                "category_ids": label_to_cat_id[state["labels"][rows]],
            }
            if state["segm"] is not None:
                d["segmentation"] = list(state["segm"][rows.numpy()])
            out.append(d)
        return out


def _object_array(items: Any, n: int) -> np.ndarray:
    """A 1-D object array of ``n`` items (an object array keeps each dict as one element)."""
    items = list(items)
    if len(items) != n:
        raise ValueError(f"TopKPerClass: {len(items)} masks for {n} candidates")
    arr = np.empty(n, dtype=object)
    arr[:] = items
    return arr
