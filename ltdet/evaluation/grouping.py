"""Sort / group primitives on flat torch columns, shared by selection, matching and accumulation.

Every (image, class) group is a run of equal keys in a sorted column; these helpers turn the
references' per-group Python loops into whole-column tensor operations.
"""

from __future__ import annotations

from typing import Callable

import torch


def stable_order(*keys: torch.Tensor) -> torch.Tensor:
    """Indices sorting by ``keys`` lexicographically, the LAST key most significant; stable
    (remaining ties keep index order), like ``np.lexsort``."""
    n = keys[0].shape[0]
    order = torch.arange(n, device=keys[0].device)
    for k in keys:
        order = order[torch.sort(k[order], stable=True).indices]
    return order


def rank_in_group(sorted_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each element inside its run of equal keys, and the run's first index;
    ``sorted_keys`` is grouped."""
    n = sorted_keys.shape[0]
    ar = torch.arange(n, device=sorted_keys.device)
    first = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    start = torch.where(first, ar, torch.zeros_like(ar))
    if n:
        start = torch.cummax(start, 0).values
    return ar - start, start


def group_sizes(keys: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Occurrences of each key (only the maximum is used): bincount when the key space is small."""
    if num_keys <= (1 << 24):
        return torch.bincount(keys, minlength=1)
    return torch.unique(keys, return_counts=True)[1]


def pair_lookup(pairs: torch.Tensor, num_pairs: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Membership test for (image, class) pair keys: a dense table when it is small (one byte
    per pair: 24M for LVIS v1 val), else ``torch.isin``."""
    if num_pairs <= (1 << 27):
        table = torch.zeros(num_pairs, dtype=torch.bool, device=pairs.device)
        table[pairs] = True
        return lambda keys: table[keys]
    return lambda keys: torch.isin(keys, pairs)
