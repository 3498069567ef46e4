"""ltdet.engine: schedule, atomic checkpoints, exact resume, NaN stop, logs, evaluation, DDP."""
import json
import logging
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from ltdet.config import load_config
from ltdet.engine.checkpoint import Checkpointer, load_checkpoint
from ltdet.engine.data import SeededSamples, epoch_batches
from ltdet.engine.evaluate import label_lookup, to_lvis_results
from ltdet.engine.solver import build_lr_scheduler, build_optimizer, lr_factor

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from ltdet.data.synthetic import make_synthetic_lvis

    root = tmp_path_factory.mktemp("tiny_lvis")
    return make_synthetic_lvis(root, seed=0, num_train=8, num_val=4, num_classes=3, image_size=64,
                               min_radius=6, max_radius=16, max_images_per_class=6,
                               val_instances_per_class=2)


def tiny_opts(data, out):
    """A ResNet-18 FPN at 64 px with small RPN/RoI batches: ~1 s per iteration on one core."""
    return [
        f"data.train.json={data['train_json']}", f"data.train.images={data['image_root']}",
        f"data.val.json={data['val_json']}", f"data.val.images={data['image_root']}",
        f"output_dir={out}", "device=cpu", "data.num_workers=0", "data.batch_size=2",
        "data.min_size=[56, 64]", "data.max_size=96", "data.test_min_size=64",
        "model.backbone=resnet18", "model.norm=bn", "model.trainable_backbone_layers=5",
        "model.rpn.batch_size_per_image=32", "model.roi_heads.batch_size_per_image=32",
        "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50",
        "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=50",
        "model.detections_per_img=20", "solver.lr=0.01", "solver.max_iter=4",
        "solver.warmup_iters=2", "solver.steps=[3]", "solver.checkpoint_period=2",
        "solver.log_period=1",
    ]


def tiny_cfg(data, out, *extra):
    return load_config(None, tiny_opts(data, out) + list(extra))


# -- schedule ---------------------------------------------------------------------------------
def test_lr_factor_warmup_step_cosine():
    kw = dict(max_iter=100, warmup_iters=10, warmup_factor=0.001, gamma=0.1, steps=[50, 80])
    # linear warm-up from 0.001 to 1 over 10 iterations
    assert lr_factor(0, schedule="step", **kw) == pytest.approx(0.001)
    assert lr_factor(5, schedule="step", **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, schedule="step", **kw) == pytest.approx(1.0)
    assert lr_factor(49, schedule="step", **kw) == pytest.approx(1.0)
    assert lr_factor(50, schedule="step", **kw) == pytest.approx(0.1)
    assert lr_factor(80, schedule="step", **kw) == pytest.approx(0.01)
    assert lr_factor(30, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert lr_factor(5, schedule="cosine", **kw) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.05)) * (0.001 * 0.5 + 0.5))
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_sgd_and_restores():
    w = torch.nn.Parameter(torch.zeros(2))
    solver = load_config(None, ["solver.lr=0.1", "solver.warmup_iters=4", "solver.steps=[6]",
                                "solver.max_iter=10"])["solver"]
    opt = build_optimizer([w], solver)
    sched = build_lr_scheduler(opt, solver)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.1 * lr_factor(i, max_iter=10, warmup_iters=4, warmup_factor=0.001,
                              schedule="step", steps=[6], gamma=0.1) for i in range(8)]
    assert lrs == pytest.approx(expect)
    opt2 = build_optimizer([w], solver)
    sched2 = build_lr_scheduler(opt2, solver)
    opt2.load_state_dict(opt.state_dict())  # as on resume: the lr lives in the optimizer state
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(0.01)
    for _ in range(2):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="no parameters to optimise"):
        build_optimizer([], solver)


# -- checkpoints ------------------------------------------------------------------------------
def test_checkpoint_crash_while_writing_keeps_previous(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path)
    assert ck.last() is None
    ck.save("model_0000002.pth", {"model": {"w": torch.arange(3.0)}, "iteration": 2})

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        ck.save("model_0000004.pth", {"model": {"w": torch.zeros(3)}, "iteration": 4})
    monkeypatch.undo()
    assert ck.last() == tmp_path / "model_0000002.pth"
    ckpt = load_checkpoint(ck.last())
    assert ckpt["iteration"] == 2 and torch.equal(ckpt["model"]["w"], torch.arange(3.0))
    # neither a partial final file nor a temporary file is left behind
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth"]


def test_checkpoint_pointer_and_damaged_file_errors(tmp_path):
    ck = Checkpointer(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(FileNotFoundError, match="model_0000009.pth, which does not exist"):
        ck.last()
    (tmp_path / "bad.pth").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="bad.pth.*damaged"):
        load_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth")


# -- data plumbing ----------------------------------------------------------------------------
def test_epoch_batches_skip_and_seeded_samples(tiny_data):
    from ltdet.data import build_dataset, build_train_sampler, build_transforms

    cfg = tiny_cfg(tiny_data, "unused")
    ds = build_dataset(tiny_data["train_json"], tiny_data["image_root"],
                       transforms=build_transforms(cfg["data"], train=True))
    sampler = build_train_sampler(cfg["data"], ds, 1, 0, 0)
    full = epoch_batches(sampler, 1, 0, seed=0, rank=0)
    assert sorted(i for b in full for i, _ in b) == list(range(8))  # one epoch = every image once
    assert epoch_batches(sampler, 1, 2, seed=0, rank=0) == full[2:]
    assert epoch_batches(sampler, 2, 0, seed=0, rank=0) != full  # a new epoch, a new order
    assert epoch_batches(sampler, 1, len(full), seed=0, rank=0) == []

    seeded = SeededSamples(ds)
    index, seed = full[0][0]
    before = torch.get_rng_state()
    a_img, a_tgt = seeded[(index, seed)]
    torch.rand(5)  # whatever happens in between ...
    b_img, b_tgt = seeded[(index, seed)]
    assert torch.equal(a_img, b_img) and torch.equal(a_tgt["boxes"], b_tgt["boxes"])
    # ... and loading in the main process leaves the training RNG stream untouched
    torch.set_rng_state(before)
    seeded[(index, seed)]
    assert torch.equal(torch.get_rng_state(), before)


def test_detections_to_lvis_results():
    lut = label_lookup({1: 7, 2: 3, 3: 11})
    assert lut.tolist() == [-1, 7, 3, 11]
    dets = [{"image_id": 5, "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.5, 2.5]]),
             "scores": torch.tensor([0.9, 0.25]), "category_ids": lut[torch.tensor([3, 1])]},
            {"image_id": 6, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "category_ids": torch.zeros(0, dtype=torch.long)}]
    res = to_lvis_results(dets)
    assert res == [{"image_id": 5, "category_id": 11, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9},
                   {"image_id": 5, "category_id": 7, "bbox": [0.0, 0.0, 1.5, 2.5], "score": 0.25}]
    assert to_lvis_results([]) == []


def test_missing_data_files_are_named(tmp_path):
    from ltdet.engine.data import resolve_data_paths

    cfg = load_config(None, [f"data.train.json={tmp_path}/nope.json", f"data.train.images={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"data\.train\.json: .*nope\.json does not exist"):
        resolve_data_paths(cfg)
    (tmp_path / "t.json").write_text("{}")
    cfg = load_config(None, [f"data.train.json={tmp_path}/t.json", "data.train.images=/no/such"])
    with pytest.raises(FileNotFoundError, match=r"data\.train\.images: '/no/such' is not a folder"):
        resolve_data_paths(cfg)


# -- the training loop ------------------------------------------------------------------------
def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_is_exact_and_log_jsonl(tiny_data, tmp_path, monkeypatch, workers):
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
    assert totals[0]["count_totals"] == {k: lines[1][k] for k in ("samples_r", "samples_c", "samples_f")}
    keys = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for r in lines:
        assert keys | {"iter", "epoch", "lr", "loss", "time", "data_time", "eta_seconds",
                       "memory_mb"} <= set(r)
        assert r["loss"] == pytest.approx(sum(r[k] for k in keys), rel=1e-5)
        expect = 0.01 * lr_factor(r["iter"] - 1, max_iter=2, warmup_iters=2, warmup_factor=0.001,
                                  schedule="step", steps=[3], gamma=0.1)
        assert r["lr"] == pytest.approx(expect)
    full_lines = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()
                  if "count_totals" not in x]
    assert [r["loss"] for r in full_lines] == pytest.approx([r["loss"] for r in lines], rel=1e-5)
    saved_cfg = load_config(tmp_path / "cut" / "config.yaml")
    assert saved_cfg == cfg
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "cut").iterdir())


def test_log_counts_sampled_instances_per_frequency_group(tiny_data, tmp_path):
    """One epoch (8 images, batch 2, 4 iterations) samples every training instance exactly once,
    so the logged per-group totals equal the data set's instance counts per group."""
    from ltdet.engine.trainer import Trainer

    cfg = tiny_cfg(tiny_data, tmp_path / "groups", "solver.max_iter=4", "solver.log_period=2",
                   "solver.checkpoint_period=4")
    trainer = Trainer(cfg, evaluate=False, progress=False)
    trainer.stats.frequency = ["r", "c", "f"]  # one class per group: each group is checked
    trainer.train()
    records = [json.loads(x) for x in (tmp_path / "groups" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "count_totals" not in r]
    assert [r["iter"] for r in steps] == [2, 4] and all(r["epoch"] == 0 for r in steps)
    expected = {f"samples_{g}": int(n) for g, n in zip("rcf", trainer.stats.instance_count.tolist())}
    assert records[-1]["count_totals"] == expected
    assert {k: sum(r[k] for r in steps) for k in expected} == expected
    assert min(expected.values()) > 0


def test_nan_loss_stops_with_advice(tiny_data, tmp_path):
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "nan"), evaluate=False, progress=False)
    with torch.no_grad():
        trainer.model.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "iteration 1 " in msg and "loss_classifier=nan" in msg
    assert "solver.lr" in msg and "solver.clip_grad_norm" in msg
    assert "loss_objectness" not in msg  # only the broken term is named
    assert not (tmp_path / "nan" / "checkpoints").exists()


# -- DDP --------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
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
    torch.save({"params": dict(trainer.model.named_parameters()),
                "state": trainer.model.state_dict(), "batch_instances": sum(seen)},
               Path(out) / f"rank{rank}.pth")
    dist.destroy_process_group()


def initial_params(cfg):
    """The initial weights of `cfg`'s trainer (built in a scratch output_dir: the run's own
    holds the finished run, which a fresh Trainer refuses to overwrite)."""
    from ltdet.engine.trainer import Trainer

    scratch = dict(cfg, output_dir=str(Path(cfg["output_dir"]).parent / "initial_params"))
    return {k: v.detach().clone() for k, v in
            Trainer(scratch, evaluate=False, progress=False).model.named_parameters()}


def test_two_process_gloo_training(tiny_data, tmp_path):
    import torch.multiprocessing as mp

    cfg = tiny_cfg(tiny_data, tmp_path / "ddp", "solver.max_iter=1", "solver.checkpoint_period=1")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
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
    assert not torch.equal(ckpt["rank_states"][0]["rng"]["torch"], ckpt["rank_states"][1]["rng"]["torch"])
    for k in w0:
        assert torch.equal(ckpt["model"][k], w0[k])
    lines = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 1]  # rank 0 alone writes the log (+ its totals line)
    # the sampled-instance counts are summed over both ranks' batches
    per_rank = [r0["batch_instances"], r1["batch_instances"]]
    assert sum(lines[0][f"samples_{g}"] for g in "rcf") == sum(per_rank) > 0
    events = [p for p in (tmp_path / "ddp").iterdir() if p.name.startswith("events.out")]
    assert len(events) == 1


# -- the CLI end to end: train, evaluate, report, evaluate_checkpoint -------------------------
def _load_tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_cli_outputs_and_evaluate_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    import ltdet.engine.logger
    from ltdet.engine.evaluate import evaluate_checkpoint

    # the CLI's root-logger set-up would outlive this test inside pytest's process
    monkeypatch.setattr(ltdet.engine.logger, "setup_console_logging", lambda rank=0: None)
    train = _load_tool("train")
    out = tmp_path / "run"
    argv = ["configs/base.yaml", "--no-progress", "--opts", *tiny_opts(tiny_data, out),
            "solver.max_iter=2", "data.test_min_size=96", "data.max_size=128",
            "data.mixup.enabled=true", "data.mixup.prob=1.0",  # mixup: part of the pipeline run
            "solver.eval_period=1"]
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    for f in ("config.yaml", "log.jsonl", "detections.json", "metrics.json", "per_class_ap.csv",
              "ap_vs_frequency.png", "checkpoints/model_0000002.pth"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        assert k in metrics and k in printed
    dets = json.loads((out / "detections.json").read_text())
    gt = json.loads(Path(tiny_data["val_json"]).read_text())
    assert dets, "a 2-iteration model at score_thresh 1e-4 still emits boxes"
    assert {d["category_id"] for d in dets} <= {c["id"] for c in gt["categories"]}
    assert {d["image_id"] for d in dets} <= {im["id"] for im in gt["images"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    for d in dets:  # inference ran at 96 px; boxes are mapped back to the 64-px originals
        x, y, w, h = d["bbox"]
        W, H = sizes[d["image_id"]]
        assert w >= 0 and h >= 0 and x + w <= W + 0.01 and y + h <= H + 0.01
    assert max(d["bbox"][0] + d["bbox"][2] for d in dets) > 40  # ... and not shrunk twice
    evals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["iter"] for e in evals] == [1, 2]  # eval_period=1, then the final evaluation
    assert evals[-1]["eval"]["AP"] == pytest.approx(metrics["AP"])
    assert (out / "eval" / "iter_0000001" / "metrics.json").is_file()

    cfg = load_config(out / "config.yaml")
    res = evaluate_checkpoint(cfg, out / "checkpoints" / "model_0000002.pth", tmp_path / "again")
    assert res["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    assert json.loads((tmp_path / "again" / "detections.json").read_text()) == dets



# -- fail-safe training: non-finite steps, resume with a changed config -----------------------
def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _train_steps(path):
    return [r for r in _jsonl(path) if "lr" in r]


class _Sabotage:
    """A forward hook on the box predictor: from the given (1-based) calls, scale the class
    logits (a finite blow-up) or make them NaN."""

    def __init__(self, by_call):
        self.by_call, self.calls = by_call, 0

    def __call__(self, module, args, out):
        self.calls += 1
        factor = self.by_call.get(self.calls)
        if factor is None:
            return out
        scores, deltas = out
        return scores * factor, deltas


def _sabotage(trainer, **by_call):
    hook = _Sabotage({int(k[1:]): v for k, v in by_call.items()})
    trainer.model.roi_heads.box_predictor.register_forward_hook(hook)
    return hook


def test_log_has_gradient_norm_and_peaks(tiny_data, tmp_path):
    from ltdet.engine.trainer import Trainer

    cfg = tiny_cfg(tiny_data, tmp_path / "gn", "solver.max_iter=2", "solver.log_period=2")
    Trainer(cfg, evaluate=False, progress=False).train()
    (rec,) = _train_steps(tmp_path / "gn" / "log.jsonl")
    assert rec["grad_norm"] > 0 and rec["grad_norm_max"] >= rec["grad_norm"]
    assert rec["loss_max"] >= rec["loss"] > 0


def test_resume_with_changed_lr_trains_at_the_new_lr(tiny_data, tmp_path):
    """A changed solver.lr on --resume takes effect from the resume iteration (it used to be
    silently ignored: LambdaLR's state restored the old base lr)."""
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "lr"
    sched = ("solver.max_iter=4", "solver.schedule=cosine", "solver.warmup_iters=1",
             "solver.checkpoint_period=2")
    Trainer(tiny_cfg(tiny_data, out, *sched), evaluate=False, progress=False).train(until=2)
    assert (out / "checkpoints" / "model_0000002.pth").is_file()
    cfg = tiny_cfg(tiny_data, out, *sched, "solver.lr=0.02", "solver.momentum=0.5")
    resumed = Trainer(cfg, resume=True, evaluate=False, progress=False)
    resumed.train()

    def expect(base, it):
        return base * lr_factor(it - 1, max_iter=4, warmup_iters=1, warmup_factor=0.001,
                                schedule="cosine", steps=[3], gamma=0.1)

    lrs = {r["iter"]: r["lr"] for r in _train_steps(out / "log.jsonl")}
    assert lrs[1] == pytest.approx(expect(0.01, 1)) and lrs[2] == pytest.approx(expect(0.01, 2))
    assert lrs[3] == pytest.approx(expect(0.02, 3)) and lrs[4] == pytest.approx(expect(0.02, 4))
    ckpt = load_checkpoint(out / "checkpoints" / "model_0000004.pth")
    assert ckpt["config"]["solver"]["lr"] == 0.02
    assert all(g["momentum"] == 0.5 for g in ckpt["optimizer"]["param_groups"])
    assert load_config(out / "config.yaml")["solver"]["lr"] == 0.02
    log_txt = (out / "log.txt").read_text()
    assert "solver.lr changed from 0.01 to 0.02; in effect from iteration 3" in log_txt


def test_resume_with_unchanged_config_is_bit_exact_after_reapplying_the_solver(tiny_data,
                                                                                tmp_path):
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


def test_resume_with_changed_model_or_data_refuses_and_writes_nothing(tiny_data, tmp_path,
                                                                      monkeypatch):
    import ltdet.engine.logger
    from ltdet.engine.resume import ResumeConfigError
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "bb"
    Trainer(tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1"),
            evaluate=False, progress=False).train()
    files = {f: (out / f).read_bytes() for f in ("config.yaml", "log.jsonl",
                                                 "checkpoints/last_checkpoint")}
    changed = ("solver.max_iter=2", "model.backbone=resnet34", "data.batch_size=1")
    with pytest.raises(ResumeConfigError) as e:
        Trainer(tiny_cfg(tiny_data, out, "solver.checkpoint_period=1", *changed), resume=True,
                evaluate=False, progress=False)
    msg = str(e.value)
    assert "model.backbone: 'resnet18' in the checkpoint, 'resnet34' now" in msg
    assert "data.batch_size: 2 in the checkpoint, 1 now" in msg
    assert "solver.max_iter" not in msg  # may change
    assert "model_0000001.pth" in msg
    assert {f: (out / f).read_bytes() for f in files} == files
    # the CLI: one line, exit code 2
    monkeypatch.setattr(ltdet.engine.logger, "setup_console_logging", lambda rank=0: None)
    argv = ["configs/base.yaml", "--no-progress", "--resume", "--opts",
            *tiny_opts(tiny_data, out), "solver.checkpoint_period=1", *changed]
    assert _load_tool("train").main(argv) == 2
    assert {f: (out / f).read_bytes() for f in files} == files


def _all_finite(ckpt_path):
    state = load_checkpoint(ckpt_path)["model"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_nonfinite_gradient_stops_before_the_step_and_is_never_checkpointed(tiny_data,
                                                                           tmp_path):
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "nangrad"
    trainer = Trainer(tiny_cfg(tiny_data, out, "solver.checkpoint_period=1"), evaluate=False,
                      progress=False)
    calls = []

    def nan_grad_at_3(grad):  # the loss stays finite; only the gradient of one tensor breaks
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    trainer.model.roi_heads.box_head.fc6.weight.register_hook(nan_grad_at_3)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    assert "iteration 3 " in str(e.value) and "grad_norm=nan" in str(e.value)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("model_*.pth"))
    assert ckpts == ["model_0000001.pth", "model_0000002.pth"]
    assert all(_all_finite(out / "checkpoints" / c) for c in ckpts)
    # the stopped model holds iteration 2's weights: the NaN step was not applied
    assert not any(trainer.model.state_dict()[k].isnan().any()
                   for k in trainer.model.state_dict() if trainer.model.state_dict()[k].is_floating_point())
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "model_0000002.pth"


def test_nonfinite_weights_are_never_written(tiny_data, tmp_path, monkeypatch):
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "infw"
    trainer = Trainer(tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1"),
                      evaluate=False, progress=False)
    step = torch.optim.SGD.step

    def overflowing_step(self, *a, **k):  # a finite step whose update overflows a weight
        res = step(self, *a, **k)
        with torch.no_grad():
            trainer.model.roi_heads.box_predictor.cls_score.bias[0] = float("inf")
        return res

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing_step)
    with pytest.raises(NonFiniteLossError, match="cls_score.bias"):
        trainer.train()
    assert not list((out / "checkpoints").glob("model_*.pth"))


def test_stop_advice_names_a_healthy_checkpoint_and_works_when_followed(tiny_data, tmp_path,
                                                                         monkeypatch):
    """Iteration 3 blows the loss up (finite, 1e6x logits) and is checkpointed; iteration 4 is
    NaN. The advice must skip the ruined checkpoint 3, and following it literally must train on
    finitely to max_iter."""
    import shlex

    import ltdet.engine.logger
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "advice"
    opts = [*tiny_opts(tiny_data, out), "solver.max_iter=6", "solver.checkpoint_period=1"]
    trainer = Trainer(load_config(None, opts), evaluate=False, progress=False)
    _sabotage(trainer, c3=1e6, c4=float("nan"))
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "iteration 4 " in msg and "loss_classifier=nan" in msg
    ckpt3 = out / "checkpoints" / "model_0000003.pth"
    assert ckpt3.is_file() and str(ckpt3) not in msg
    assert f"--resume-from {out / 'checkpoints' / 'model_0000002.pth'}" in msg
    command = shlex.split(msg.split("tools/train.py ", 1)[1].rstrip("."))
    assert command[0] == str(out / "config.yaml")  # the run's own config: no opts to remember
    assert command[1] == "--resume-from" and command[3] == "--opts"
    assert any(o.startswith("solver.clip_grad_norm=") for o in command[4:])
    assert any(o.startswith("solver.lr=") for o in command[4:])

    monkeypatch.setattr(ltdet.engine.logger, "setup_console_logging", lambda rank=0: None)
    assert _load_tool("train").main(command[:1] + ["--no-progress", "--no-eval"]
                                     + command[1:]) == 0  # verbatim
    steps = _train_steps(out / "log.jsonl")
    assert [r["iter"] for r in steps] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps[2:])
    assert _all_finite(out / "checkpoints" / "model_0000006.pth")


def test_skip_nonfinite_skips_up_to_n_in_a_row(tiny_data, tmp_path):
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "skip"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=5", "solver.skip_nonfinite=2",
                   "solver.checkpoint_period=5")
    trainer = Trainer(cfg, evaluate=False, progress=False)
    _sabotage(trainer, c2=float("nan"), c3=float("nan"), c5=float("inf"))
    trainer.train()
    records = _jsonl(out / "log.jsonl")
    skipped = [(r["iter"], r["nonfinite"]) for r in records if r.get("skipped")]
    assert [s[0] for s in skipped] == [2, 3, 5]
    assert all(any(t.startswith("loss_classifier=") for t in s[1]) for s in skipped)
    steps = _train_steps(out / "log.jsonl")
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5]  # every iteration logs its lr
    assert all("loss" not in r for r in steps if r["iter"] in (2, 3, 5))
    assert all(math.isfinite(r["loss"]) for r in steps if r["iter"] in (1, 4))
    assert _all_finite(out / "checkpoints" / "model_0000005.pth")

    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "skip1", "solver.skip_nonfinite=1"),
                      evaluate=False, progress=False)
    _sabotage(trainer, c2=float("nan"), c3=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps in a row at iteration 3"):
        trainer.train()


@pytest.mark.parametrize("opt,value", [("solver.lr", "-0.01"), ("solver.lr", ".nan"),
                                       ("solver.clip_grad_norm", "0.0"),
                                       ("solver.keep_checkpoints", "2.5"),
                                       ("solver.keep_checkpoints", "0"),
                                       ("solver.skip_nonfinite", "-1")])
def test_invalid_solver_values_name_the_key(tiny_data, tmp_path, opt, value):
    """Rejected when the config loads, before --overwrite could delete anything."""
    from ltdet.config import ConfigError

    with pytest.raises(ConfigError, match=rf"'{opt}' \(set in --opts\) must be"):
        tiny_cfg(tiny_data, tmp_path / "bad", f"{opt}={value}")


def test_invalid_solver_values_in_a_dict_config_are_caught_by_the_trainer(tiny_data, tmp_path):
    from ltdet.engine.trainer import Trainer

    cfg = tiny_cfg(tiny_data, tmp_path / "bad")
    cfg["solver"]["lr"] = -0.01  # built in code, not loaded: the trainer checks it too
    with pytest.raises(ValueError, match=r"solver\.lr"):
        Trainer(cfg, evaluate=False, progress=False).train()


# -- faults: nothing lost, nothing damaged ----------------------------------------------------
def test_fresh_run_into_a_finished_output_dir_is_refused(tiny_data, tmp_path, monkeypatch):
    import ltdet.engine.logger
    from ltdet.engine.trainer import OutputDirError, Trainer

    out = tmp_path / "done"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(cfg, evaluate=False, progress=False).train()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "events" not in p.name}
    with pytest.raises(OutputDirError, match=r"holds a previous run.*model_0000001\.pth.*"
                                             r"--resume.*another output_dir.*--overwrite"):
        Trainer(cfg, evaluate=False, progress=False)
    monkeypatch.setattr(ltdet.engine.logger, "setup_console_logging", lambda rank=0: None)
    argv = ["configs/base.yaml", "--no-progress", "--no-eval", "--opts",
            *tiny_opts(tiny_data, out), "solver.max_iter=1", "solver.checkpoint_period=1"]
    assert _load_tool("train").main(argv) == 2
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "events" not in p.name}
    assert {p: v for p, v in after.items() if p.name != "log.txt"} == \
        {p: v for p, v in before.items() if p.name != "log.txt"}
    # --overwrite: explicit consent; the old checkpoints and log are replaced
    assert _load_tool("train").main(argv[:3] + ["--overwrite"] + argv[3:]) == 0
    assert [r["iter"] for r in _train_steps(out / "log.jsonl")] == [1]


def test_stale_tmp_files_are_removed_at_start(tiny_data, tmp_path):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "stale"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(cfg, evaluate=False, progress=False).train()
    stale = out / "checkpoints" / ".model_0000002.pth.abc123.tmp"
    stale.write_bytes(b"x" * 1000)  # what a kill -9 during torch.save leaves
    other = out / "checkpoints" / "notes.tmp"  # not ours: left alone
    other.write_text("keep")
    Trainer(tiny_cfg(tiny_data, out, "solver.max_iter=2", "solver.checkpoint_period=1"),
            resume=True, evaluate=False, progress=False).train()
    assert not stale.exists() and other.exists()


def test_keep_checkpoints_keeps_the_newest_n(tiny_data, tmp_path):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "keep"
    cfg = tiny_cfg(tiny_data, out, "solver.checkpoint_period=1", "solver.keep_checkpoints=2")
    Trainer(cfg, evaluate=False, progress=False).train()
    names = sorted(p.name for p in (out / "checkpoints").glob("model_*.pth"))
    assert names == ["model_0000003.pth", "model_0000004.pth"]
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "model_0000004.pth"


def test_output_files_get_the_umask_mode(tiny_data, tmp_path, monkeypatch):
    from ltdet.engine.trainer import Trainer

    import ltdet.fileio

    monkeypatch.setattr(ltdet.fileio, "_UMASK", 0o027)  # the umask read at import
    out = tmp_path / "mode"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(cfg, evaluate=False, progress=False).train()
    for f in ("config.yaml", "checkpoints/model_0000001.pth", "checkpoints/last_checkpoint"):
        assert (out / f).stat().st_mode & 0o777 == 0o640, f  # not mkstemp's 0600


def test_truncated_last_checkpoint_falls_back_to_the_newest_that_loads(tiny_data, tmp_path,
                                                                       caplog):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "trunc"
    Trainer(tiny_cfg(tiny_data, out, "solver.max_iter=2", "solver.checkpoint_period=1"),
            evaluate=False, progress=False).train()
    last = out / "checkpoints" / "model_0000002.pth"
    last.write_bytes(last.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING, logger="ltdet"):
        resumed = Trainer(tiny_cfg(tiny_data, out, "solver.max_iter=3",
                                   "solver.checkpoint_period=1"),
                          resume=True, evaluate=False, progress=False)
    assert resumed._resume_path == out / "checkpoints" / "model_0000001.pth"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "model_0000002.pth" in msg and "model_0000001.pth" in msg and "damaged" in msg
    resumed.train()
    assert [r["iter"] for r in _train_steps(out / "log.jsonl")] == [1, 2, 3]


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(tmp_path)

    def enospc(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(OSError, match=r"no space left on device while writing .*model_0000001"):
        ck.save("model_0000001.pth", {"model": {}})

    def enforce_fail(obj, f, *args, **kwargs):  # torch's own report of a failed write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    import ltdet.fileio

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr(ltdet.fileio, "_free_bytes", lambda folder: 1024)
    with pytest.raises(OSError, match=r"no space left on device while writing .*model_0000002"):
        ck.save("model_0000002.pth", {"model": {}})
    assert os.listdir(tmp_path) == []


def test_val_json_missing_a_training_category_is_found_before_training(tiny_data, tmp_path):
    from ltdet.engine.trainer import Trainer

    val = json.loads(Path(tiny_data["val_json"]).read_text())
    dropped = val["categories"].pop()["id"]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != dropped]
    bad_val = tmp_path / "val_missing.json"
    bad_val.write_text(json.dumps(val))
    cfg = tiny_cfg(tiny_data, tmp_path / "val", f"data.val.json={bad_val}")
    with pytest.raises(ValueError, match=rf"val_missing.json lacks 1 category.*ids {dropped}\)"):
        Trainer(cfg, evaluate=True, progress=False)


@pytest.mark.parametrize("opt,expect", [
    ("model.cls_loss={type: focal, gama: 12}", r"model\.cls_loss.*'gama'.*did you mean 'gamma'"),
    ("model.cls_loss.type=eqlv3", r"unknown loss type 'eqlv3'; did you mean 'eqlv2'"),
    ("model.box_loss.type=smoth_l1", r"model\.box_loss.*did you mean 'smooth_l1'"),
    ("model.sampler.type=ohm", r"model\.sampler.*did you mean 'ohem'"),
    ("model.classifier.type=cosin", r"model\.classifier.*did you mean 'cosine'"),
    ("model.lds={enabled: true, bins: 0}", r"model\.lds.*bins must be >= 1"),
    ("model.fds={enabled: true, momentum: 2.0}", r"model\.fds.*momentum"),
    ("data.sampler={type: repeat_factor, thresh: 0.1}", r"data\.sampler.*did you mean 'threshold'"),
])
def test_component_specs_are_validated_when_the_config_loads(tmp_path, opt, expect):
    from ltdet.config import ConfigError

    import yaml

    from ltdet.config import parse_value

    key, _, value = opt.partition("=")
    tree = node = {"_base_": str(REPO / "configs" / "base.yaml")}
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = parse_value(value)
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=expect) as e:
        load_config(yaml_file)
    assert "exp.yaml" in str(e.value)


def test_test_cli_reports_a_config_error_in_one_line(tmp_path, capsys):
    test_tool = _load_tool("test")
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver: {lr: fast}\n")
    assert test_tool.main([str(bad), "--ckpt", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "solver.lr" in err[0] and "Traceback" not in err[0]
    assert test_tool.main(["configs/base.yaml", "--ckpt", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth" in err[0]


def test_check_demo_reads_the_bars_from_metrics_json(tmp_path, capsys):
    check = _load_tool("check_demo")
    good = {"AP50f": 0.62, "APr": 0.05, "APf": 0.40}
    for metrics, code in ((good, 0), (dict(good, AP50f=0.49), 1), (dict(good, APr=0.21), 1),
                          ({"AP": 0.1}, 1), (dict(good, APr=-1), 1)):
        path = tmp_path / "metrics.json"
        path.write_text(json.dumps(metrics))
        assert check.main([str(path)]) == code, metrics
    assert check.main([str(tmp_path / "absent.json")]) == 1
    assert "did `make demo` finish" in capsys.readouterr().err


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


def test_keep_checkpoints_never_deletes_a_protected_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep=1)
    ck.save("model_0000001.pth", {"model": {}})
    ck.save("model_0000002.pth", {"model": {}}, protect=[tmp_path / "model_0000001.pth"])
    ck.save("model_0000003.pth", {"model": {}}, protect=[tmp_path / "model_0000001.pth"])
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth",
                                             "model_0000003.pth"]


def test_resume_from_a_checkpoint_of_another_run_respects_the_output_dir(tiny_data, tmp_path):
    from ltdet.engine.trainer import OutputDirError, Trainer

    src, dst = tmp_path / "src", tmp_path / "dst"
    one = ("solver.max_iter=1", "solver.checkpoint_period=1")
    Trainer(tiny_cfg(tiny_data, src, *one), evaluate=False, progress=False).train()
    Trainer(tiny_cfg(tiny_data, dst, *one), evaluate=False, progress=False).train()
    ckpt = src / "checkpoints" / "model_0000001.pth"
    with pytest.raises(OutputDirError, match="holds a previous run"):
        Trainer(tiny_cfg(tiny_data, dst, "solver.max_iter=2"), resume_from=ckpt,
                evaluate=False, progress=False)
    with pytest.raises(OutputDirError, match="give one of them"):
        Trainer(tiny_cfg(tiny_data, dst), resume=True, overwrite=True, evaluate=False,
                progress=False)


def test_resume_from_an_earlier_checkpoint_moves_the_pointer_back(tiny_data, tmp_path):
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "back"
    Trainer(tiny_cfg(tiny_data, out, "solver.checkpoint_period=1"), evaluate=False,
            progress=False).train()
    Trainer(tiny_cfg(tiny_data, out, "solver.checkpoint_period=1"),
            resume_from=out / "checkpoints" / "model_0000002.pth", evaluate=False,
            progress=False)
    # killed before its first save, a plain --resume must not pick up the newer model_4
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "model_0000002.pth"


def test_a_skipped_step_leaves_batchnorm_statistics_untouched(tiny_data, tmp_path):
    """A NaN inside the backbone poisons BatchNorm's running statistics in the forward itself;
    a skipped step must put them back, or the next checkpoint would be refused."""
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "bn"
    cfg = tiny_cfg(tiny_data, out, "solver.max_iter=3", "solver.skip_nonfinite=1",
                   "solver.checkpoint_period=3")
    trainer = Trainer(cfg, evaluate=False, progress=False)
    calls = []

    def nan_at_2(module, args, out):
        calls.append(1)
        return out * float("nan") if len(calls) == 2 else out

    trainer.model.backbone.body.conv1.register_forward_hook(nan_at_2)
    trainer.train()
    assert [r["iter"] for r in _jsonl(out / "log.jsonl") if r.get("skipped")] == [2]
    assert _all_finite(out / "checkpoints" / "model_0000003.pth")
