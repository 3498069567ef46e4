"""The training-throughput benchmark and the CUDA device check keep running: their quick modes
on the CPU, and the pieces of benchmarks/train_throughput.py that need no training run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import RoIHeads

import ltdet

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_with_torchvision_losses_restores_torchvision_heads():
    tt = _load_script()
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4
    )
    ltdet.patch(model, cls_loss={"type": "ce"})
    shared = model.roi_heads.box_predictor
    assert type(model.roi_heads) is not RoIHeads
    tt.with_torchvision_losses(model)
    assert type(model.roi_heads) is RoIHeads
    assert model.roi_heads.box_predictor is shared  # submodules shared, not copied
    assert not any(
        k.startswith(("roi_heads.cls_loss", "roi_heads.box_loss", "roi_heads.sampler"))
        for k in model.state_dict()
    )
    model.train()
    images = [torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_ltdet_data_ms_reads_the_windows_inside_the_blocks(tmp_path):
    tt = _load_script()
    log = tmp_path / "log.jsonl"
    lines = [
        {"iter": 2, "data_time": 9.0},
        {"iter": 4, "data_time": 0.002},
        {"iter": 6, "data_time": 0.004},
        {"iter": 6, "eval": {}},
        {"iter": 8, "data_time": 9.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    # windows of 2 iterations; measured iterations (2, 6]: the windows ending at 4 and 6
    assert tt.ltdet_data_ms(log, 2, 6, 2) == pytest.approx(3.0)
    assert tt.ltdet_data_ms(log, 100, 200, 2) is None
    assert tt.ltdet_data_ms(tmp_path / "missing.jsonl", 0, 10, 2) is None


def test_train_throughput_quick(tmp_path):
    out = tmp_path / "result.json"
    p = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| loop | images/s |" in p.stdout and "ratio ltdet / torchvision" in p.stdout
    result = json.loads(out.read_text())
    assert result["blocks"] == 2 and len(result["pair_ratios"]) == 2
    assert result["ratio"] > 0
    for loop in ("ltdet", "torchvision"):
        r = result["loops"][loop]
        assert len(r["block_images_per_s"]) == 2 and r["images_per_s"] > 0
        phases = r["phases_ms"]
        for key in ("forward", "backward", "step", "logging", "data"):
            assert phases[key] is not None and phases[key] >= 0, (loop, key, phases)
        assert phases["forward"] > 0 and phases["backward"] > 0 and phases["step"] > 0
        # the phases and the rest add up to the block time
        assert sum(phases.values()) == pytest.approx(r["ms_per_iter"], rel=1e-6)
    # the trainer's log of its own run is there, and the reference loop printed its lines
    assert (tmp_path / "work" / "ltdet_run" / "log.jsonl").is_file()
    assert "Epoch: [0]" in (tmp_path / "work" / "reference_log.txt").read_text()


@pytest.mark.slow  # about 1.5 minutes of the 2-core machine: three benchmarks in quick mode
def test_device_check_quick(tmp_path):
    env = dict(_env(), PYTHON=sys.executable, DEVICE_CHECK_DATA=str(tmp_path / "data"))
    p = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "device_check.sh"),
            "--quick",
            "--out",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=400,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    table = p.stdout[p.stdout.index("| check | setting | result |") :]
    for row in (
        "train: ratio ltdet / torchvision",
        "evaluate_lvis on cpu",
        "loss overhead, faster_rcnn",
        "loss overhead, retinanet",
    ):
        assert f"| {row}" in table, table
    assert "FAILED" not in table
    assert json.loads((tmp_path / "logs" / "eval.json").read_text())["max_metric_diff"] == 0
