"""ltdet.engine.trainer: the log's per-group sample counts and gradient norms, two-process gloo
training (DDP)."""

import json
import os
import socket
from pathlib import Path

import torch

from ltdet.engine.checkpoint import load_checkpoint


def test_log_counts_sampled_instances_per_frequency_group(tiny_data, tmp_path, tiny_cfg):
    """One epoch (8 images, batch 2, 4 iterations) samples every training instance exactly once,
    so the logged per-group totals equal the data set's instance counts per group."""
    from ltdet.engine.trainer import Trainer

    cfg = tiny_cfg(
        tiny_data,
        tmp_path / "groups",
        "solver.max_iter=4",
        "solver.log_period=2",
        "solver.checkpoint_period=4",
    )
    trainer = Trainer(cfg, evaluate=False, progress=False)
    trainer.stats.frequency = ["r", "c", "f"]  # one class per group: each group is checked
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "groups" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "count_totals" not in r]
    assert [r["iter"] for r in steps] == [2, 4] and all(r["epoch"] == 0 for r in steps)
    expected = {
        f"samples_{g}": int(n) for g, n in zip("rcf", trainer.stats.instance_count.tolist())
    }
    assert records[-1]["count_totals"] == expected
    assert {k: sum(r[k] for r in steps) for k in expected} == expected
    assert min(expected.values()) > 0


def test_log_has_gradient_norm_and_peaks(tiny_data, tmp_path, tiny_cfg, train_steps):
    from ltdet.engine.trainer import Trainer

    cfg = tiny_cfg(tiny_data, tmp_path / "gn", "solver.max_iter=2", "solver.log_period=2")
    Trainer(cfg, evaluate=False, progress=False).train()
    (rec,) = train_steps(tmp_path / "gn" / "log.jsonl")
    assert rec["grad_norm"] > 0 and rec["grad_norm_max"] >= rec["grad_norm"]
    assert rec["loss_max"] >= rec["loss"] > 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ltdet.engine.trainer import Trainer

    trainer = Trainer(cfg, evaluate=False, progress=False)
    step, seen = trainer._step, []

    def counting_step(*args, group_counts, **kwargs):  # this rank's own instances, pre-reduce
        seen.append(int(group_counts.sum()))
        return step(*args, group_counts=group_counts, **kwargs)

    trainer._step = counting_step
    trainer.train()
    torch.save(
        {
            "params": dict(trainer.model.named_parameters()),
            "state": trainer.model.state_dict(),
            "batch_instances": sum(seen),
        },
        Path(out) / f"rank{rank}.pth",
    )
    dist.destroy_process_group()


def initial_params(cfg):
    """The initial weights of `cfg`'s trainer (built in a scratch output_dir: the run's own
    holds the finished run, which a fresh Trainer refuses to overwrite)."""
    from ltdet.engine.trainer import Trainer

    scratch = dict(cfg, output_dir=str(Path(cfg["output_dir"]).parent / "initial_params"))
    return {
        k: v.detach().clone()
        for k, v in Trainer(scratch, evaluate=False, progress=False).model.named_parameters()
    }


def test_two_process_gloo_training(tiny_data, tmp_path, tiny_cfg):
    import torch.multiprocessing as mp

    cfg = tiny_cfg(tiny_data, tmp_path / "ddp", "solver.max_iter=1", "solver.checkpoint_period=1")
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), cfg, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    r0 = torch.load(tmp_path / "rank0.pth")
    r1 = torch.load(tmp_path / "rank1.pth")
    init = initial_params(cfg)
    # DDP keeps the replicas' parameters identical (BatchNorm running statistics are each
    # rank's own after the last forward; rank 0's are the ones saved)
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert any(not torch.equal(v, init[k]) for k, v in r0["params"].items())
    w0 = r0["state"]
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "model_0000001.pth")
    assert ckpt["iteration"] == 1 and len(ckpt["rank_states"]) == 2
    assert [s["position"] for s in ckpt["rank_states"]] == [1, 1]
    # each rank has its own RNG stream (seed + rank)
    assert not torch.equal(
        ckpt["rank_states"][0]["rng"]["torch"], ckpt["rank_states"][1]["rng"]["torch"]
    )
    for k in w0:
        assert torch.equal(ckpt["model"][k], w0[k])
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 1]  # rank 0 alone writes the log (+ its totals line)
    # the sampled-instance counts are summed over both ranks' batches
    per_rank = [r0["batch_instances"], r1["batch_instances"]]
    assert sum(lines[0][f"samples_{g}"] for g in "rcf") == sum(per_rank) > 0
    events = [p for p in (tmp_path / "ddp").iterdir() if p.name.startswith("events.out")]
    assert len(events) == 1
