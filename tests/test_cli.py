"""The command-line tools end to end: tools/train.py (train, evaluate, report) and
`evaluate_checkpoint`, tools/test.py's one-line config errors, tools/check_demo.py."""

import json
from pathlib import Path

import pytest

from ltdet.config import load_config, schema_path


def test_train_cli_outputs_and_evaluate_checkpoint(
    tiny_data, tmp_path, capsys, monkeypatch, load_tool, tiny_opts
):
    import ltdet.engine.logger
    from ltdet.engine.validation import evaluate_checkpoint

    # the CLI's root-logger set-up would outlive this test inside pytest's process
    monkeypatch.setattr(ltdet.engine.logger, "setup_console_logging", lambda rank=0: None)
    train = load_tool("train")
    out = tmp_path / "run"
    argv = [
        str(schema_path()),
        "--no-progress",
        "--opts",
        *tiny_opts(tiny_data, out),
        "solver.max_iter=2",
        "data.test_min_size=96",
        "data.max_size=128",
        "data.mixup.enabled=true",
        "data.mixup.prob=1.0",  # mixup: part of the pipeline run
        "solver.eval_period=1",
    ]
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    for f in (
        "config.yaml",
        "log.jsonl",
        "detections.json",
        "metrics.json",
        "per_class_ap.csv",
        "ap_vs_frequency.png",
        "checkpoints/model_0000002.pth",
    ):
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


def test_test_cli_reports_a_config_error_in_one_line(tmp_path, capsys, load_tool):
    test_tool = load_tool("test")
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver: {lr: fast}\n")
    assert test_tool.main([str(bad), "--ckpt", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "solver.lr" in err[0] and "Traceback" not in err[0]
    assert test_tool.main([str(schema_path()), "--ckpt", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth" in err[0]


def test_check_demo_reads_the_bars_from_metrics_json(tmp_path, capsys, load_tool):
    check = load_tool("check_demo")
    good = {"AP50f": 0.62, "APr": 0.05, "APf": 0.40}
    for metrics, code in (
        (good, 0),
        (dict(good, AP50f=0.49), 1),
        (dict(good, APr=0.21), 1),
        ({"AP": 0.1}, 1),
        (dict(good, APr=-1), 1),
    ):
        path = tmp_path / "metrics.json"
        path.write_text(json.dumps(metrics))
        assert check.main([str(path)]) == code, metrics
    assert check.main([str(tmp_path / "absent.json")]) == 1
    assert "did `make demo` finish" in capsys.readouterr().err
