"""torch.distributed helpers: `torchrun` (env://) initialisation, rank queries, gathers.

Every collective is guarded by `is_distributed()`, so single-process runs (CPU or one GPU) never
touch torch.distributed.

Stalled or dead ranks. `init_distributed(device, timeout_s)` passes the config key
`dist_timeout` (seconds, default 1800) to `init_process_group` as its `timeout`. A collective that
some rank never joins then fails after `timeout_s` instead of blocking forever, and the wrappers
here (`barrier`, `all_reduce_mean`, `all_gather_object`, and the rendezvous in
`init_distributed`) re-raise that failure as `CollectiveTimeout`. Its message names this
rank, the operation (their `op` argument, e.g. "barrier after checkpoint") and the timeout; the
backend's own error is chained (`raise ... from`). A backend error that is neither a timeout
nor a lost connection (e.g. mismatched tensor shapes) is re-raised unchanged.

What gloo raises, checked with torch 2.14 on CPU with 2 processes and timeout=5 s (plain
`RuntimeError`s, not `torch.distributed.DistError`; their text starts with a gloo source location
such as "[.../gloo/transport/tcp/unbound_buffer.cc:78] "):
  * a peer that is alive but stalled (SIGSTOP, an endless loop): after the timeout, in
    `all_reduce` and `barrier` "Timed out waiting 5000ms for recv operation to complete", in
    `all_gather_object` and `broadcast_object_list` "... for send operation to complete". The
    process-group timeout does apply to gloo's `all_reduce` and `barrier`: neither
    `dist.monitored_barrier(timeout=...)` nor a per-call timeout is needed.
  * a peer that died (its sockets closed): at once, "Read error [ip]:port: Connection reset by
    peer. This is typically caused by a remote worker hanging ..." or "Connection closed by peer
    [ip]:port. This is typically caused by a remote worker crashing ...".
  * a rank that never reaches `init_process_group` (env://): `torch.distributed.DistStoreError`
    "Timed out after 5 seconds waiting for clients. 1/2 clients joined.".
A process group that timed out is unusable: the run stops (there is no retry).

NCCL (not exercised by the tests): the timeout is enforced by NCCL's watchdog thread, which
(with the default TORCH_NCCL_ASYNC_ERROR_HANDLING) aborts the whole process and logs its own
"Watchdog caught collective operation timeout: WorkNCCL(... OpType=ALLREDUCE ... Timeout(ms)=...)";
the calls here return before the GPU work completes, so they rarely see the error and
`CollectiveTimeout` is mostly a gloo (CPU) message.

The default of 1800 s leaves room for a slow evaluation on rank 0 while the other ranks wait at a
barrier; lower `dist_timeout` to notice a stalled rank sooner, raise it for very long evaluations.
"""

import contextlib
import datetime
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: The default of `init_distributed(timeout_s=...)` and of the config key `dist_timeout`.
DEFAULT_TIMEOUT_S = 1800

# The timeout this module initialised the process group with (None: not initialised here).
_timeout_s = None

# Backend messages meaning "some rank did not take part within the timeout" / "a peer is gone".
_TIMEOUT_RE = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_LOST_RE = re.compile(
    r"connection (closed|reset) by peer|broken pipe|connection refused"
    r"|(read|write) error|socket closed|peer .*(closed|crashed)",
    re.IGNORECASE,
)
_SOURCE_PREFIX_RE = re.compile(r"^\s*\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*")


class CollectiveTimeout(RuntimeError):
    """A collective (or the rendezvous) did not complete: a rank stalled, died or never started.

    Attributes: `rank` (this process), `op` (what was being exchanged), `timeout_s` (the process
    group timeout, None if unknown) and `peer_lost` (True when a peer's connection closed rather
    than the timeout expiring). The backend's exception is the `__cause__`."""

    def __init__(
        self, message: str, *, rank: int, op: str, timeout_s=None, peer_lost: bool = False
    ):
        super().__init__(message)
        self.rank, self.op, self.timeout_s, self.peer_lost = rank, op, timeout_s, peer_lost


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _pg_timeout_s():
    """The default process group's timeout in seconds, or None when it cannot be told."""
    if _timeout_s is not None:
        return _timeout_s
    try:  # a group initialised elsewhere (a test harness): ask its backend (private API)
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        return backend.options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - only used to word a message
        return None


def _fmt_s(seconds) -> str:
    return f"{seconds:g}"


def _classify(exc: BaseException):
    """'timeout', 'peer_lost' or None (not a stalled/dead-rank failure)."""
    if isinstance(exc, CollectiveTimeout) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if isinstance(exc, getattr(dist, "DistNetworkError", ())) or _PEER_LOST_RE.search(text):
        return "peer_lost"
    if isinstance(exc, getattr(dist, "DistStoreError", ())) or _TIMEOUT_RE.search(text):
        return "timeout"
    return None


def _message(kind: str, op: str, rank: int, timeout_s, backend_msg: str) -> str:
    setting = (
        f"process group timeout dist_timeout={_fmt_s(timeout_s)}"
        if timeout_s is not None
        else "process group timeout dist_timeout"
    )
    within = f" within {_fmt_s(timeout_s)} s" if timeout_s is not None else ""
    if kind == "peer_lost":
        what = (
            f"failed: the connection to another rank was lost (it died or exited) before "
            f"the operation completed ({setting})"
        )
    else:
        what = (
            f"did not complete{within}: another rank stalled or died ({setting}; raise it "
            f"if a rank is legitimately that slow, e.g. a long evaluation on rank 0)"
        )
    backend_msg = " ".join(_SOURCE_PREFIX_RE.sub("", backend_msg).split())
    if len(backend_msg) > 200:
        backend_msg = backend_msg[:200] + "..."
    return f"rank {rank}: {op} {what}; the run stops [backend: {backend_msg}]"


@contextlib.contextmanager
def _guard(op: str, rank=None):
    """Re-raise a timeout / lost-peer error of the block as CollectiveTimeout naming `op`."""
    try:
        yield
    except RuntimeError as e:
        kind = _classify(e)
        if kind is None:
            raise
        rank = get_rank() if rank is None else rank
        timeout_s = _pg_timeout_s()
        raise CollectiveTimeout(
            _message(kind, op, rank, timeout_s, str(e)),
            rank=rank,
            op=op,
            timeout_s=timeout_s,
            peer_lost=kind == "peer_lost",
        ) from e


def barrier(op: str = "barrier") -> None:
    """Wait for every rank. `op` names it in a CollectiveTimeout (e.g. "barrier after
    checkpoint")."""
    if is_distributed():
        with _guard(op):
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device: cuda was requested but torch.cuda.is_available() is False;"
                " set device: auto or cpu"
            )
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise the process group when launched by `torchrun` (WORLD_SIZE > 1 in the env).

    Backend: nccl on CUDA, gloo on CPU. A process group that is already initialised (e.g. by a
    test harness) is reused, with its own timeout. `timeout_s` (config key `dist_timeout`) is how
    long a collective waits for every rank before it fails with CollectiveTimeout (see the module
    docstring); the rendezvous of the ranks is bounded by it as well.
    """
    global _timeout_s
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"dist_timeout must be a positive number of seconds, got {timeout_s!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        rank = int(os.environ.get("RANK", "0"))
        with _guard("init_process_group (rendezvous of all ranks)", rank=rank):
            dist.init_process_group(
                backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s)
            )
        _timeout_s = timeout_s
        logger.info(
            "initialised %s process group: rank %d of %d (timeout %s s)",
            backend,
            get_rank(),
            world_size,
            _fmt_s(timeout_s),
        )
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=dev)


def all_gather_object(obj, op: str = "all_gather_object") -> list:
    """[obj of rank 0, obj of rank 1, ...]; `[obj]` when not distributed. `op` names the
    exchange in a CollectiveTimeout (e.g. "all_gather_object of rank states")."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    with _guard(op):
        dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor, op: str = "all_reduce (mean over ranks)") -> torch.Tensor:
    """Mean over ranks (a copy; the input is untouched). Identity when not distributed. `op`
    names the exchange in a CollectiveTimeout (e.g. "all_reduce of the loss values")."""
    if not is_distributed():
        return t
    t = t.clone()
    with _guard(op):
        dist.all_reduce(t)
    return t / get_world_size()
