"""Two gloo processes: the all-reduced state of EQLv2, seesaw and GHM (with momentum) equals a
single process that sees the concatenated batches, and so do the per-element losses."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltdet.losses import build_loss

CONFIGS = [
    {"type": "eqlv2"},
    {"type": "seesaw"},
    {"type": "seesaw_softmax"},
    {"type": "ghmc", "bins": 6, "momentum": 0.75},
    {"type": "ghmr", "bins": 6, "momentum": 0.7},
]
STEPS = 3
ROWS = 12  # per step, split 7 / 5 between the ranks (unequal on purpose)
SPLIT = 7


def _global_batches(num_classes, make_batch, make_deltas):
    """{loss type: [(x, y) of each step]}: built here, in the test's process, and handed to the
    spawned ranks (which see no fixtures)."""
    batches = {}
    for cfg in CONFIGS:
        steps = []
        for step in range(STEPS):
            if cfg["type"] == "ghmr":
                pred, target = make_deltas(p=ROWS, seed=100 + step)
                steps.append((pred.detach(), target))
                continue
            width = build_loss(cfg, num_classes=num_classes).cls_channels  # seesaw: C+2 logits
            logits, labels = make_batch(n=ROWS, seed=100 + step, bg_fraction=0.4, num_columns=width)
            steps.append((logits.detach(), labels))
        batches[cfg["type"]] = steps
    return batches


def _run(cfg, rows, num_classes, batches):
    """Train-mode steps on the given rows of each global batch: final state + per-step 'none'
    loss."""
    loss = build_loss(cfg, num_classes=num_classes).double().train()
    per_step = []
    for step in range(STEPS):
        x, y = batches[cfg["type"]][step]
        per_step.append(loss(x[rows], y[rows], reduction="none").detach())
    return {k: v.clone() for k, v in loss.state_dict().items()}, per_step


def _worker(rank, world_size, port, out_dir, num_classes, batches):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, ROWS)
        results = {cfg["type"]: _run(cfg, rows, num_classes, batches) for cfg in CONFIGS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduced_state_matches_single_process(
    tmp_path, loss_num_classes, make_batch, make_deltas
):
    batches = _global_batches(loss_num_classes, make_batch, make_deltas)
    mp.spawn(
        _worker,
        args=(2, _free_port(), str(tmp_path), loss_num_classes, batches),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for cfg in CONFIGS:
        name = cfg["type"]
        state, per_step = _run(cfg, slice(0, ROWS), loss_num_classes, batches)
        assert any(v.abs().sum() > 0 for v in state.values()), name
        for r in range(2):
            rank_state, rank_steps = ranks[r][name]
            for key, value in state.items():
                assert torch.allclose(rank_state[key], value, rtol=1e-6, atol=1e-9), (name, key, r)
        for step in range(STEPS):
            joined = torch.cat([ranks[0][name][1][step], ranks[1][name][1][step]])
            assert torch.allclose(joined, per_step[step], rtol=1e-6, atol=1e-9), (name, step)
    # the state really differs from what one rank alone would have accumulated
    alone, _ = _run(CONFIGS[0], slice(0, SPLIT), loss_num_classes, batches)
    assert not torch.allclose(alone["pos_grad"], ranks[0]["eqlv2"][0]["pos_grad"])
