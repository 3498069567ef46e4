"""Cross-rank primitives shared by the packages that keep training state (losses, imbalance).

They import only `torch.distributed`, so `ltdet.losses` and `ltdet.imbalance` can use them
without importing the training engine. Outside a process group (a single process, or
`torch.distributed` unavailable) every function is the single-process identity: rank 0, world
size 1, and a sum over ranks that returns its input unchanged.
"""

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "get_rank", "get_world_size", "is_distributed", "rank_mean"]


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank; 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of ranks; 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it; the identity on a single rank.

    Stateful components call it on the detached per-step increment of their state (EQLv2's
    gradient sums, seesaw's counts, GHM's bin counts, LDS's histogram, FDS's feature sums), so
    every rank holds the same state as one process that saw the whole global batch. Every rank
    must call it at the same point of the step (a collective).
    """
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks, a detached float32 0-d tensor (GFocal's
    `reduce_mean` of a step's normaliser); the value itself on one process. A collective:
    every rank calls it at the same point of the step, whatever its own value (0 included)."""
    total = all_reduce_sum(value.detach().to(torch.float32).reshape(1).clone())
    return total[0] / get_world_size()
