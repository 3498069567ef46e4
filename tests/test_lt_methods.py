"""benchmarks/lt_methods.py without training: the table's statistics and its noise mark, the
stage-2 command, and the D-ECE backfill of result files written before calibration existed."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lt():
    spec = importlib.util.spec_from_file_location("lt_methods", ROOT / "benchmarks/lt_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(results, method, aprs, dece=None):
    for seed, apr in enumerate(aprs):
        cell = {k: 0.5 for k in ("AP", "AP50", "APc", "APf", "AP50r", "AP50f")}
        cell["APr"] = apr
        if dece is not None and seed < len(dece):
            cell["D-ECE"] = dece[seed]
        (results / method).mkdir(parents=True, exist_ok=True)
        (results / method / f"seed{seed}.json").write_text(json.dumps(cell))


def _row(table, method):
    line = next(line for line in table.splitlines() if line.startswith(f"| {method} "))
    return line.rstrip(" |").split(" | ")


def test_table_mean_std_and_the_two_standard_error_mark(lt, tmp_path):
    _write(tmp_path, "baseline", [0.06, 0.08, 0.10], dece=[0.01, 0.02, 0.03])
    _write(tmp_path, "rfs", [0.20, 0.22, 0.24], dece=[0.04])  # +0.14: far beyond 2 se = 0.033
    _write(tmp_path, "eql", [0.07, 0.09, 0.11])  # +0.01: within noise
    _write(tmp_path, "seesaw", [0.30])  # one seed: no std, no mark
    table = lt.table(["baseline", "rfs", "eql", "seesaw"], tmp_path)
    base, rfs, eql, seesaw = (_row(table, m) for m in ("baseline", "rfs", "eql", "seesaw"))
    apr, dece = 1 + 1 + lt.KEYS.index("APr"), 1 + 1 + lt.KEYS.index("D-ECE")
    assert base[1] == "3" and base[apr] == "0.080 +- 0.020"
    assert base[dece] == "0.0200 +- 0.0100"
    assert rfs[0] == "| rfs *" and rfs[apr] == "0.220 +- 0.020"
    assert rfs[dece] == "0.0400 (1)"  # one of the row's three cells has D-ECE
    assert eql[0] == "| eql" and eql[dece] == "-"
    assert seesaw[0] == "| seesaw" and seesaw[1] == "1" and seesaw[apr] == "0.300"


def test_table_mark_against_another_reference(lt, tmp_path):
    _write(tmp_path, "retinanet_focal", [0.002, 0.003, 0.004])
    _write(tmp_path, "retinanet_qfl", [0.010, 0.011, 0.012])  # +0.008, 2 se = 0.0016
    _write(tmp_path, "baseline", [0.0, 0.1, 0.2])  # would hide it: 2 se = 0.12
    methods = ["retinanet_focal", "retinanet_qfl"]
    assert _row(lt.table(methods, tmp_path, "retinanet_focal"), "retinanet_qfl")[0].endswith("*")
    assert not _row(lt.table(methods + ["baseline"], tmp_path), "retinanet_qfl")[0].endswith("*")


def test_stage2_cells_start_from_their_stage1_seed(lt, tmp_path):
    ckpt = tmp_path / "baseline" / "seed2" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "last_checkpoint").write_text("model_0000350.pth\n")
    cmd = lt._command("crt", 2, tmp_path)
    assert cmd[cmd.index("--stage2") + 1 : cmd.index("--stage2") + 3] == [
        "--from",
        str(ckpt / "model_0000350.pth"),
    ]
    assert "seed=2" in cmd and f"output_dir={tmp_path / 'crt' / 'seed2'}" in cmd
    assert "--stage2" not in lt._command("rfs", 0, tmp_path)


def test_grid_makes_the_data_set_once_before_any_cell_starts(lt, tmp_path, monkeypatch):
    # Two cells started together on a fresh clone used to generate the set into one folder at
    # once (the second failed with FileExistsError): the parent now makes it first.
    events = []

    class Done:
        returncode = 0

        def __init__(self, cmd, **kw):
            events.append(("cell", cmd[cmd.index("--opts") + 1]))

        def poll(self):
            return 0

    def fake_run(cmd, **kw):
        events.append(("data", cmd[cmd.index("--root") + 1]))

    monkeypatch.setattr(lt.subprocess, "run", fake_run)
    monkeypatch.setattr(lt.subprocess, "Popen", Done)
    monkeypatch.setattr(lt.time, "sleep", lambda s: None)
    lt.run_grid(["rfs", "eql"], [0], runs=tmp_path / "runs", results=tmp_path, jobs=2, threads=1)
    assert events == [("data", str(lt.SYNTHETIC)), ("cell", "seed=0"), ("cell", "seed=0")]
    events.clear()
    _write(tmp_path, "rfs", [0.2])
    _write(tmp_path, "eql", [0.2])
    lt.run_grid(["rfs", "eql"], [0], runs=tmp_path / "runs", results=tmp_path, jobs=2, threads=1)
    assert events == []  # nothing left to run: no generation either


def _lvis_set(root):
    """Two images, one rare and one frequent class, one ground-truth box each."""
    gt = {
        "images": [
            {
                "id": i,
                "width": 100,
                "height": 100,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
                "file_name": f"{i}.png",
            }
            for i in (1, 2)
        ],
        "categories": [
            {"id": 1, "name": "a", "frequency": "r", "image_count": 1, "instance_count": 1},
            {"id": 2, "name": "b", "frequency": "f", "image_count": 1, "instance_count": 1},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [20, 20, 30, 30], "area": 900},
        ],
    }
    for name in ("val.json", "train.json"):
        (root / name).write_text(json.dumps(gt))


def test_backfill_adds_d_ece_from_the_cells_detections(lt, tmp_path):
    data, runs, results = tmp_path / "data", tmp_path / "runs", tmp_path / "results"
    data.mkdir()
    _lvis_set(data)
    cell = runs / "eql" / "seed0"
    cell.mkdir(parents=True)
    dets = [  # a true positive at 0.9 and a false positive at 0.3 (10 uniform bins)
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 2, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.3},
    ]
    (cell / "detections.json").write_text(json.dumps(dets))
    _write(results, "eql", [0.1])
    _write(results, "rfs", [0.2], dece=[0.5])  # present: left alone
    n = lt.backfill_calibration(["eql", "rfs"], [0], runs=runs, results=results, data_root=data)
    assert n == 1
    out = json.loads((results / "eql" / "seed0.json").read_text())
    # D-ECE = 1/2 |1 - 0.9| + 1/2 |0 - 0.3|; per group: r holds the TP, f the FP
    assert out["D-ECE"] == pytest.approx(0.2, abs=1e-6)
    assert out["D-ECE_r"] == pytest.approx(0.1, abs=1e-6)
    assert out["D-ECE_f"] == pytest.approx(0.3, abs=1e-6)
    assert out["MCE"] == pytest.approx(0.3, abs=1e-6)
    assert out["APr"] == 0.1  # the rest of the file is kept
    assert json.loads((results / "rfs" / "seed0.json").read_text())["D-ECE"] == 0.5
    assert lt.backfill_calibration(["eql"], [0], runs=runs, results=results, data_root=data) == 0


def test_check_backfill_compares_with_the_stored_entries(lt, tmp_path, capsys):
    data, runs, results = tmp_path / "data", tmp_path / "runs", tmp_path / "results"
    data.mkdir()
    _lvis_set(data)
    (runs / "rfs" / "seed0").mkdir(parents=True)
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}]
    (runs / "rfs" / "seed0" / "detections.json").write_text(json.dumps(dets))
    _write(results, "rfs", [0.2], dece=[0.1])  # 1 TP at 0.9: D-ECE 0.1
    check = lambda: lt.check_backfill("rfs", 0, runs=runs, results=results, data_root=data)  # noqa: E731
    assert check() == 0
    _write(results, "rfs", [0.2], dece=[0.3])
    assert check() == 1
    _write(results, "rfs", [0.2])
    assert check() == 1 and "no calibration entries" in capsys.readouterr().out
