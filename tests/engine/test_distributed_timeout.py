"""A stalled or dead rank ends the run with a CollectiveTimeout naming the rank, the operation
and the timeout (gloo on CPU, 2 forked processes), instead of blocking rank 0 forever."""

import os
import signal
import socket
import time
import traceback

import pytest
import torch

from ltdet.engine import distributed as du

TIMEOUT_S = 5  # the process-group timeout of the workers
LIMIT_S = 60  # how long the test waits for rank 0 at most (the timeout plus a generous margin)


def broadcast_object(obj, src: int = 0, op: str = "broadcast_object_list"):
    """`obj` of rank `src` on every rank, guarded like the package's collectives (the package
    itself never broadcasts; kept here as a check that a guarded collective is the identity in a
    single process)."""
    if not du.is_distributed():
        return obj
    box = [obj]
    with du._guard(op):
        torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, mode, queue):
    """Rank 1 stalls (`stop`: SIGSTOP) or dies (`die`) after a first, working all_reduce; rank 0
    then runs the collective of `mode` and reports what happened through `queue`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        info = du.init_distributed("cpu", timeout_s=TIMEOUT_S)
        assert du.all_reduce_mean(torch.tensor([float(rank)])).item() == 0.5
        if rank == 1:
            if mode == "die":
                os._exit(0)
            os.kill(os.getpid(), signal.SIGSTOP)  # stays stopped until the test kills it
            time.sleep(10 * LIMIT_S)
            os._exit(0)
        start = time.monotonic()
        try:
            if mode == "die":
                time.sleep(1)  # let rank 1's exit close its sockets first
                du.barrier("barrier after checkpoint")
            else:
                du.all_reduce_mean(torch.ones(3), "all_reduce of the loss values")
            queue.put(("no error", None, time.monotonic() - start, info.rank))
        except du.CollectiveTimeout as e:
            queue.put(
                (
                    "CollectiveTimeout",
                    (str(e), e.rank, e.op, e.timeout_s, e.peer_lost, type(e.__cause__).__name__),
                    time.monotonic() - start,
                    info.rank,
                )
            )
    except BaseException:  # noqa: BLE001 - reported to the test
        queue.put(("crash", traceback.format_exc(), None, rank))
        os._exit(1)


def _run_two_ranks(mode):
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, mode, queue), daemon=True) for r in range(2)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        procs[0].join(LIMIT_S)
        elapsed = time.monotonic() - start
        rank0_alive = procs[0].is_alive()
        reports = []
        while True:
            try:
                reports.append(queue.get(timeout=1))
            except Exception:  # noqa: BLE001 - queue.Empty
                break
    finally:
        for p in procs:  # rank 1 is stopped (or gone): SIGKILL ends it either way
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
    assert not any(p.is_alive() for p in procs)
    assert not rank0_alive, f"rank 0 still blocked after {LIMIT_S} s"
    crashes = [r for r in reports if r[0] == "crash"]
    assert not crashes, crashes[0][1]
    rank0 = [r for r in reports if r[3] == 0]
    assert len(rank0) == 1, reports
    assert procs[0].exitcode == 0, procs[0].exitcode
    return rank0[0], elapsed


def test_stalled_rank_times_out_all_reduce():
    (kind, details, op_s, _), elapsed = _run_two_ranks("stop")
    assert kind == "CollectiveTimeout", (kind, details)
    message, rank, op, timeout_s, peer_lost, cause = details
    assert (rank, op, timeout_s, peer_lost) == (
        0,
        "all_reduce of the loss values",
        TIMEOUT_S,
        False,
    )
    assert cause == "RuntimeError"  # gloo's "Timed out waiting 5000ms for recv operation ..."
    assert message.startswith(
        "rank 0: all_reduce of the loss values did not complete within 5 s:"
        " another rank stalled or died (process group timeout "
        "dist_timeout=5"
    ), message
    assert "the run stops" in message and "Timed out" in message
    # it waited for the timeout (not less), and not much longer
    assert TIMEOUT_S - 0.5 <= op_s < TIMEOUT_S + 25, op_s
    assert elapsed < 45, elapsed


def test_dead_rank_fails_barrier_at_once():
    (kind, details, op_s, _), _ = _run_two_ranks("die")
    assert kind == "CollectiveTimeout", (kind, details)
    message, rank, op, timeout_s, peer_lost, _ = details
    assert (rank, op, timeout_s, peer_lost) == (0, "barrier after checkpoint", TIMEOUT_S, True)
    assert message.startswith(
        "rank 0: barrier after checkpoint failed: the connection to another rank was lost"
    ), message
    assert "dist_timeout=5" in message and "the run stops" in message
    assert op_s < TIMEOUT_S + 25, op_s


def test_guard_only_converts_timeouts_and_lost_peers():
    with pytest.raises(du.CollectiveTimeout, match=r"^rank 0: barrier did not complete") as e:
        with du._guard("barrier"):
            raise RuntimeError(
                "[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "5000ms for recv operation to complete"
            )
    assert "[backend: Timed out waiting 5000ms" in str(e.value)  # the source location is cut
    with pytest.raises(du.CollectiveTimeout, match="connection to another rank was lost"):
        with du._guard("all_gather_object of rank states"):
            raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:15279.")
    with pytest.raises(du.CollectiveTimeout, match="init_process_group"):
        with du._guard("init_process_group (rendezvous of all ranks)", rank=1):
            raise torch.distributed.DistStoreError(
                "Timed out after 5 seconds waiting for clients. 1/2 clients joined."
            )
    other = RuntimeError("Tensors must be the same size")  # a bug, not a stalled rank
    with pytest.raises(RuntimeError) as e:
        with du._guard("all_reduce"):
            raise other
    assert e.value is other


def test_single_process_wrappers_and_config_default():
    from ltdet.config import load_schema

    t = torch.tensor([1.0, 2.0])
    assert du.all_reduce_mean(t) is t and du.all_reduce_mean(t, "loss values") is t
    assert du.all_gather_object({"a": 1}) == [{"a": 1}]
    assert broadcast_object(3, 0) == 3
    du.barrier()
    du.barrier("barrier after checkpoint")
    assert du.init_distributed("cpu", 10).world_size == 1
    with pytest.raises(ValueError, match="dist_timeout"):
        du.init_distributed("cpu", timeout_s=0)
    assert load_schema()["dist_timeout"] == du.DEFAULT_TIMEOUT_S == 1800
