"""Resuming a run (ltdet.engine.resume, the trainer's resume path): exact resume, a changed solver,
a changed model or data refused, a damaged last checkpoint, --resume-from."""

import json
import logging

import pytest
import torch

from ltdet.config import load_config, schema_path
from ltdet.engine.checkpoint import Checkpointer, load_checkpoint
from ltdet.engine.solver import lr_factor


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_is_exact_and_log_jsonl(tiny_data, tmp_path, monkeypatch, workers, tiny_cfg):
    """2 iterations straight == 1 iteration, killed after its checkpoint, resumed for 1 more.

    8 images at batch 2 make a 4-batch epoch, so the resume happens mid-epoch and exercises the
    sample position, the random resize/flip of every later sample, and the RNG of the RoI sampler.
    With loader workers, which worker loads a sample must not matter either.
    """
    from ltdet.engine.trainer import Trainer

    w = (f"data.num_workers={workers}", "solver.max_iter=2", "solver.checkpoint_period=1")
    full = Trainer(tiny_cfg(tiny_data, tmp_path / "full", *w), evaluate=False, progress=False)
    init = _state(full.model)
    full.train()
    ref = _state(full.model)

    cfg = tiny_cfg(tiny_data, tmp_path / "cut", *w)
    first = Trainer(cfg, evaluate=False, progress=False)
    save = Checkpointer.save

    def save_then_die(self, name, state, **kwargs):
        path = save(self, name, state, **kwargs)
        if state["iteration"] == 1:
            raise KeyboardInterrupt("killed after the checkpoint of iteration 1")
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    monkeypatch.undo()
    mid = _state(first.model)
    resumed = Trainer(cfg, resume=True, evaluate=False, progress=False)
    resumed.train()
    out = _state(resumed.model)

    assert out.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(out[k].float(), ref[k].float(), rtol=1e-5, atol=1e-6), k
    changed = [k for k in ref if ref[k].is_floating_point() and not torch.equal(ref[k], mid[k])]
    assert changed, "iteration 2 changed no weight: the test would not see a bad resume"
    assert any(not torch.equal(ref[k], init[k]) for k in ref)

    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoints" / "model_0000002.pth")
    assert ckpt["iteration"] == 2 and len(ckpt["rank_states"]) == 1
    assert ckpt["rank_states"][0]["epoch"] == 0 and ckpt["rank_states"][0]["position"] == 2
    assert ckpt["meta"]["cat_ids"] == resumed.train_dataset.cat_ids
    assert (tmp_path / "cut" / "checkpoints" / "last_checkpoint").read_text() == "model_0000002.pth"

    lines = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    totals = [r for r in lines if "count_totals" in r]
    lines = [r for r in lines if "count_totals" not in r]
    assert [r["iter"] for r in lines] == [1, 2]
    # the resumed process totals only what it trained itself (iteration 2)
    assert [(t["iter"], t["since_iter"]) for t in totals] == [(2, 1)]
    assert totals[0]["count_totals"] == {
        k: lines[1][k] for k in ("samples_r", "samples_c", "samples_f")
    }
    keys = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for r in lines:
        assert keys | {
            "iter",
            "epoch",
            "lr",
            "loss",
            "time",
            "data_time",
            "eta_seconds",
            "memory_mb",
        } <= set(r)
        assert r["loss"] == pytest.approx(sum(r[k] for k in keys), rel=1e-5)
        expect = 0.01 * lr_factor(
            r["iter"] - 1,
            max_iter=2,
            warmup_iters=2,
            warmup_factor=0.001,
            schedule="step",
            steps=[3],
            gamma=0.1,
        )
        assert r["lr"] == pytest.approx(expect)
    full_lines = [
        json.loads(x)
        for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()
        if "count_totals" not in x
    ]
    assert [r["loss"] for r in full_lines] == pytest.approx([r["loss"] for r in lines], rel=1e-5)
    saved_cfg = load_config(tmp_path / "cut" / "config.yaml")
    assert saved_cfg == cfg
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "cut").iterdir())


def test_resume_with_changed_lr_trains_at_the_new_lr(tiny_data, tmp_path, tiny_cfg, train_steps):
    """A changed solver.lr on --resume takes effect from the resume iteration (it used to be
    silently ignored: LambdaLR's state restored the old base lr)."""
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "lr"
    sched = (
        "solver.max_iter=4",
        "solver.schedule=cosine",
        "solver.warmup_iters=1",
        "solver.checkpoint_period=2",
    )
    Trainer(tiny_cfg(tiny_data, out, *sched), evaluate=False, progress=False).train(until=2)
    assert (out / "checkpoints" / "model_0000002.pth").is_file()
    cfg = tiny_cfg(tiny_data, out, *sched, "solver.lr=0.02", "solver.momentum=0.5")
    resumed = Trainer(cfg, resume=True, evaluate=False, progress=False)
    resumed.train()

    def expect(base, it):
        return base * lr_factor(
            it - 1,
            max_iter=4,
            warmup_iters=1,
            warmup_factor=0.001,
            schedule="cosine",
            steps=[3],
            gamma=0.1,
        )

    lrs = {r["iter"]: r["lr"] for r in train_steps(out / "log.jsonl")}
    assert lrs[1] == pytest.approx(expect(0.01, 1)) and lrs[2] == pytest.approx(expect(0.01, 2))
    assert lrs[3] == pytest.approx(expect(0.02, 3)) and lrs[4] == pytest.approx(expect(0.02, 4))
    ckpt = load_checkpoint(out / "checkpoints" / "model_0000004.pth")
    assert ckpt["config"]["solver"]["lr"] == 0.02
    assert all(g["momentum"] == 0.5 for g in ckpt["optimizer"]["param_groups"])
    assert load_config(out / "config.yaml")["solver"]["lr"] == 0.02
    log_txt = (out / "log.txt").read_text()
    assert "solver.lr changed from 0.01 to 0.02; in effect from iteration 3" in log_txt


def test_resume_with_unchanged_config_is_bit_exact_after_reapplying_the_solver(
    tiny_data, tmp_path, tiny_cfg
):
    from ltdet.engine.resume import apply_solver
    from ltdet.engine.solver import build_lr_scheduler, build_optimizer

    solver = tiny_cfg(tiny_data, tmp_path)["solver"]
    solver = dict(solver, schedule="cosine", max_iter=10, warmup_iters=3)
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([w], solver)
    sch = build_lr_scheduler(opt, solver)
    for _ in range(4):
        opt.step()
        sch.step()
    before = [dict(g) for g in opt.param_groups], list(sch.base_lrs), sch.get_last_lr()
    apply_solver(opt, sch, solver, solver)
    assert [dict(g) for g in opt.param_groups] == before[0]
    assert sch.base_lrs == before[1] and sch.get_last_lr() == before[2]


def test_resume_with_changed_model_or_data_refuses_and_writes_nothing(
    tiny_data, tmp_path, monkeypatch, load_tool, tiny_cfg, tiny_opts
):
    import ltdet.engine.logger
    from ltdet.engine.resume import ResumeConfigError
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "bb"
    Trainer(
        tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1"),
        evaluate=False,
        progress=False,
    ).train()
    files = {
        f: (out / f).read_bytes()
        for f in ("config.yaml", "log.jsonl", "checkpoints/last_checkpoint")
    }
    changed = ("solver.max_iter=2", "model.backbone=resnet34", "data.batch_size=1")
    with pytest.raises(ResumeConfigError) as e:
        Trainer(
            tiny_cfg(tiny_data, out, "solver.checkpoint_period=1", *changed),
            resume=True,
            evaluate=False,
            progress=False,
        )
    msg = str(e.value)
    assert "model.backbone: 'resnet18' in the checkpoint, 'resnet34' now" in msg
    assert "data.batch_size: 2 in the checkpoint, 1 now" in msg
    assert "solver.max_iter" not in msg  # may change
    assert "model_0000001.pth" in msg
    assert {f: (out / f).read_bytes() for f in files} == files
    # the CLI: one line, exit code 2
    monkeypatch.setattr(ltdet.engine.logger, "setup_console_logging", lambda rank=0: None)
    argv = [
        str(schema_path()),
        "--no-progress",
        "--resume",
        "--opts",
        *tiny_opts(tiny_data, out),
        "solver.checkpoint_period=1",
        *changed,
    ]
    assert load_tool("train").main(argv) == 2
    assert {f: (out / f).read_bytes() for f in files} == files


def test_resume_keeps_per_group_weight_decay_and_applies_only_changed_keys():
    from ltdet.engine.resume import apply_solver
    from ltdet.engine.solver import build_lr_scheduler, build_optimizer

    solver = load_config(None)["solver"]
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], solver)
    sch = build_lr_scheduler(opt, solver)
    apply_solver(opt, sch, solver, solver)  # unchanged config: nothing moves
    assert [g["weight_decay"] for g in opt.param_groups] == [solver["weight_decay"], 0.0]
    apply_solver(opt, sch, solver, dict(solver, weight_decay=0.05, lr=solver["lr"] * 2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # own value kept
    assert sch.base_lrs == [solver["lr"] * 2] * 2


def test_truncated_last_checkpoint_falls_back_to_the_newest_that_loads(
    tiny_data, tmp_path, caplog, tiny_cfg, train_steps
):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "trunc"
    Trainer(
        tiny_cfg(tiny_data, out, "solver.max_iter=2", "solver.checkpoint_period=1"),
        evaluate=False,
        progress=False,
    ).train()
    last = out / "checkpoints" / "model_0000002.pth"
    last.write_bytes(last.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING, logger="ltdet"):
        resumed = Trainer(
            tiny_cfg(tiny_data, out, "solver.max_iter=3", "solver.checkpoint_period=1"),
            resume=True,
            evaluate=False,
            progress=False,
        )
    assert resumed._resume_path == out / "checkpoints" / "model_0000001.pth"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "model_0000002.pth" in msg and "model_0000001.pth" in msg and "damaged" in msg
    resumed.train()
    assert [r["iter"] for r in train_steps(out / "log.jsonl")] == [1, 2, 3]


def test_resume_from_an_earlier_checkpoint_moves_the_pointer_back(tiny_data, tmp_path, tiny_cfg):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "back"
    Trainer(
        tiny_cfg(tiny_data, out, "solver.checkpoint_period=1"), evaluate=False, progress=False
    ).train()
    Trainer(
        tiny_cfg(tiny_data, out, "solver.checkpoint_period=1"),
        resume_from=out / "checkpoints" / "model_0000002.pth",
        evaluate=False,
        progress=False,
    )
    # killed before its first save, a plain --resume must not pick up the newer model_4
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "model_0000002.pth"
