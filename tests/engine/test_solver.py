"""ltdet.engine.solver: the lr schedule, the optimizer and scheduler, and the solver values' checks
(at config load and in the trainer)."""

import math

import pytest
import torch

from ltdet.config import load_config
from ltdet.engine.solver import build_lr_scheduler, build_optimizer, lr_factor


def test_lr_factor_warmup_step_cosine():
    kw = dict(max_iter=100, warmup_iters=10, warmup_factor=0.001, gamma=0.1, steps=[50, 80])
    # linear warm-up from 0.001 to 1 over 10 iterations
    assert lr_factor(0, schedule="step", **kw) == pytest.approx(0.001)
    assert lr_factor(5, schedule="step", **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, schedule="step", **kw) == pytest.approx(1.0)
    assert lr_factor(49, schedule="step", **kw) == pytest.approx(1.0)
    assert lr_factor(50, schedule="step", **kw) == pytest.approx(0.1)
    assert lr_factor(80, schedule="step", **kw) == pytest.approx(0.01)
    assert lr_factor(30, schedule="cosine", **kw) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.3))
    )
    assert lr_factor(5, schedule="cosine", **kw) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.05)) * (0.001 * 0.5 + 0.5)
    )
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_sgd_and_restores():
    w = torch.nn.Parameter(torch.zeros(2))
    solver = load_config(
        None, ["solver.lr=0.1", "solver.warmup_iters=4", "solver.steps=[6]", "solver.max_iter=10"]
    )["solver"]
    opt = build_optimizer([w], solver)
    sched = build_lr_scheduler(opt, solver)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [
        0.1
        * lr_factor(
            i,
            max_iter=10,
            warmup_iters=4,
            warmup_factor=0.001,
            schedule="step",
            steps=[6],
            gamma=0.1,
        )
        for i in range(8)
    ]
    assert lrs == pytest.approx(expect)
    opt2 = build_optimizer([w], solver)
    sched2 = build_lr_scheduler(opt2, solver)
    opt2.load_state_dict(opt.state_dict())  # as on resume: the lr lives in the optimizer state
    sched2.load_state_dict(sched.state_dict())
    assert (
        opt2.param_groups[0]["lr"]
        == pytest.approx(opt.param_groups[0]["lr"])
        == pytest.approx(0.01)
    )
    for _ in range(2):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="no parameters to optimise"):
        build_optimizer([], solver)


@pytest.mark.parametrize(
    "opt,value",
    [
        ("solver.lr", "-0.01"),
        ("solver.lr", ".nan"),
        ("solver.clip_grad_norm", "0.0"),
        ("solver.keep_checkpoints", "2.5"),
        ("solver.keep_checkpoints", "0"),
        ("solver.skip_nonfinite", "-1"),
    ],
)
def test_invalid_solver_values_name_the_key(tiny_data, tmp_path, opt, value, tiny_cfg):
    """Rejected when the config loads, before --overwrite could delete anything."""
    from ltdet.config import ConfigError

    with pytest.raises(ConfigError, match=rf"'{opt}' \(set in --opts\) must be"):
        tiny_cfg(tiny_data, tmp_path / "bad", f"{opt}={value}")


def test_invalid_solver_values_in_a_dict_config_are_caught_by_the_trainer(
    tiny_data, tmp_path, tiny_cfg
):
    from ltdet.engine.trainer import Trainer

    cfg = tiny_cfg(tiny_data, tmp_path / "bad")
    cfg["solver"]["lr"] = -0.01  # built in code, not loaded: the trainer checks it too
    with pytest.raises(ValueError, match=r"solver\.lr"):
        Trainer(cfg, evaluate=False, progress=False).train()
