"""Fail-safe training (ltdet.engine.nonfinite, the trainer's step): NaN/inf losses, gradients
and weights stop the run before they are checkpointed, the advice works, skip_nonfinite."""

import math

import pytest
import torch

from ltdet.config import load_config
from ltdet.engine.checkpoint import load_checkpoint


def test_nan_loss_stops_with_advice(tiny_data, tmp_path, tiny_cfg):
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


def _all_finite(ckpt_path):
    state = load_checkpoint(ckpt_path)["model"]
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def test_nonfinite_gradient_stops_before_the_step_and_is_never_checkpointed(
    tiny_data, tmp_path, tiny_cfg
):
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "nangrad"
    trainer = Trainer(
        tiny_cfg(tiny_data, out, "solver.checkpoint_period=1"), evaluate=False, progress=False
    )
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
    assert not any(
        trainer.model.state_dict()[k].isnan().any()
        for k in trainer.model.state_dict()
        if trainer.model.state_dict()[k].is_floating_point()
    )
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "model_0000002.pth"


def test_nonfinite_weights_are_never_written(tiny_data, tmp_path, monkeypatch, tiny_cfg):
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "infw"
    trainer = Trainer(
        tiny_cfg(tiny_data, out, "solver.max_iter=1", "solver.checkpoint_period=1"),
        evaluate=False,
        progress=False,
    )
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


def test_stop_advice_names_a_healthy_checkpoint_and_works_when_followed(
    tiny_data, tmp_path, monkeypatch, load_tool, tiny_opts, train_steps
):
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
    assert (
        load_tool("train").main(command[:1] + ["--no-progress", "--no-eval"] + command[1:]) == 0
    )  # verbatim
    steps = train_steps(out / "log.jsonl")
    assert [r["iter"] for r in steps] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps[2:])
    assert _all_finite(out / "checkpoints" / "model_0000006.pth")


def test_skip_nonfinite_skips_up_to_n_in_a_row(tiny_data, tmp_path, jsonl, tiny_cfg, train_steps):
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    out = tmp_path / "skip"
    cfg = tiny_cfg(
        tiny_data, out, "solver.max_iter=5", "solver.skip_nonfinite=2", "solver.checkpoint_period=5"
    )
    trainer = Trainer(cfg, evaluate=False, progress=False)
    _sabotage(trainer, c2=float("nan"), c3=float("nan"), c5=float("inf"))
    trainer.train()
    records = jsonl(out / "log.jsonl")
    skipped = [(r["iter"], r["nonfinite"]) for r in records if r.get("skipped")]
    assert [s[0] for s in skipped] == [2, 3, 5]
    assert all(any(t.startswith("loss_classifier=") for t in s[1]) for s in skipped)
    steps = train_steps(out / "log.jsonl")
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5]  # every iteration logs its lr
    assert all("loss" not in r for r in steps if r["iter"] in (2, 3, 5))
    assert all(math.isfinite(r["loss"]) for r in steps if r["iter"] in (1, 4))
    assert _all_finite(out / "checkpoints" / "model_0000005.pth")

    trainer = Trainer(
        tiny_cfg(tiny_data, tmp_path / "skip1", "solver.skip_nonfinite=1"),
        evaluate=False,
        progress=False,
    )
    _sabotage(trainer, c2=float("nan"), c3=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps in a row at iteration 3"):
        trainer.train()


def test_a_skipped_step_leaves_batchnorm_statistics_untouched(tiny_data, tmp_path, jsonl, tiny_cfg):
    """A NaN inside the backbone poisons BatchNorm's running statistics in the forward itself;
    a skipped step must put them back, or the next checkpoint would be refused."""
    from ltdet.engine.trainer import Trainer

    out = tmp_path / "bn"
    cfg = tiny_cfg(
        tiny_data, out, "solver.max_iter=3", "solver.skip_nonfinite=1", "solver.checkpoint_period=3"
    )
    trainer = Trainer(cfg, evaluate=False, progress=False)
    calls = []

    def nan_at_2(module, args, out):
        calls.append(1)
        return out * float("nan") if len(calls) == 2 else out

    trainer.model.backbone.body.conv1.register_forward_hook(nan_at_2)
    trainer.train()
    assert [r["iter"] for r in jsonl(out / "log.jsonl") if r.get("skipped")] == [2]
    assert _all_finite(out / "checkpoints" / "model_0000003.pth")
