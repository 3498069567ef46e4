"""Long-tail methods on the bundled set: a grid of methods x seeds with the demo recipe, stage 2
on each seed's stage-1 baseline, and a table of mean +- std over seeds.

    python benchmarks/lt_methods.py                          # the default grid, seed 0
    python benchmarks/lt_methods.py --seeds 0 1 2 --jobs 2   # 3 seeds, two 1-thread runs at once
    python benchmarks/lt_methods.py --methods baseline rfs eqlv2 --table-only

Each cell is `tools/train.py CONFIG --opts seed=S output_dir=runs/lt_methods/METHOD/seedS`
(stage-2 cells: `--stage2 --from` the final checkpoint of their stage-1 cell of the same seed:
the baseline's, or baseline_v2's for MiSLAS, whose shifted BN needs the v2 box head) in its
own process with `--threads` torch threads. A cell whose metrics are already in `--results`
(`benchmarks/results/METHOD/seedS.json`, committed: json only, no checkpoints) is skipped, so
the grid resumes across days. The table marks a method whose APr differs from the baseline's by
more than twice the combined standard error (`*`; needs >= 2 seeds per cell; `--reference`
picks another row, e.g. retinanet_focal); a method with one seed reports its single value.
Columns: AP, AP50, APr, APc, APf, AP50r, AP50f and D-ECE (detection calibration); result files
written before the trainer reported D-ECE get it from their cell's detections.json with
`--backfill-calibration` (`--check-backfill METHOD SEED` verifies that on a cell with both).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYN = "configs/synthetic"
STAGE1 = f"{SYN}/faster_rcnn_r18_fpn.yaml"

#: method -> (config, the stage-1 method it refines, or None)
METHODS = {
    "baseline": (STAGE1, None),
    "rfs": (f"{SYN}/rfs.yaml", None),
    "class_aware": (f"{SYN}/class_aware.yaml", None),
    "cb": (f"{SYN}/cb.yaml", None),
    "balanced_softmax": (f"{SYN}/balanced_softmax.yaml", None),
    "eql": (f"{SYN}/eql.yaml", None),
    "eqlv2": (f"{SYN}/eqlv2.yaml", None),
    "seesaw": (f"{SYN}/seesaw.yaml", None),
    "federated": (f"{SYN}/federated.yaml", None),
    "focal": (f"{SYN}/focal.yaml", None),
    "ghmc": (f"{SYN}/ghmc.yaml", None),
    "las": (f"{SYN}/las.yaml", None),
    "rfs_eqlv2": (f"{SYN}/rfs_eqlv2.yaml", None),
    "rfs_seesaw": (f"{SYN}/rfs_seesaw.yaml", None),
    "baseline_v2": (f"{SYN}/faster_rcnn_v2_r18_fpn.yaml", None),
    "retinanet_focal": (f"{SYN}/retinanet.yaml", None),
    "retinanet_efl": (f"{SYN}/retinanet_efl.yaml", None),
    "retinanet_qfl": (f"{SYN}/retinanet_qfl.yaml", None),
    "retinanet_gfl": (f"{SYN}/retinanet_gfl.yaml", None),
    "crt": (f"{SYN}/faster_rcnn_r18_fpn_stage2_crt.yaml", "baseline"),
    "lws": (f"{SYN}/faster_rcnn_r18_fpn_stage2_lws.yaml", "baseline"),
    "tau_norm": (f"{SYN}/faster_rcnn_r18_fpn_stage2_tau_norm.yaml", "baseline"),
    "cosine": (f"{SYN}/faster_rcnn_r18_fpn_stage2_cosine.yaml", "baseline"),
    "crt_las": (f"{SYN}/faster_rcnn_r18_fpn_stage2_las.yaml", "baseline"),
    "mislas": (f"{SYN}/faster_rcnn_v2_r18_fpn_stage2_mislas.yaml", "baseline_v2"),
}
KEYS = ("AP", "AP50", "APr", "APc", "APf", "AP50r", "AP50f", "D-ECE")
#: the bundled set, where every cell trains and evaluates (`configs/synthetic`'s data.synthetic)
SYNTHETIC = ROOT / "data" / "generated" / "synthetic"


def _cell_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / method / f"seed{seed}"


def _command(method: str, seed: int, runs: Path) -> list:
    config, stage1 = METHODS[method]
    cmd = [
        sys.executable,
        "tools/train.py",
        config,
        "--no-progress",
        "--overwrite",
        "--opts",
        f"seed={seed}",
        f"output_dir={_cell_dir(runs, method, seed)}",
    ]
    if stage1:
        base = _cell_dir(runs, stage1, seed) / "checkpoints"
        last = (base / "last_checkpoint").read_text().strip()
        cmd[3:3] = ["--stage2", "--from", str(base / last)]
    return cmd


def run_grid(methods, seeds, *, runs: Path, results: Path, jobs: int, threads: int) -> None:
    todo = [(m, s) for s in seeds for m in methods if not (results / m / f"seed{s}.json").is_file()]
    running = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    if todo:
        # The bundled set is made once here, before any cell starts: cells started together on
        # a fresh clone would otherwise each generate it into the same folder at once.
        subprocess.run(
            [sys.executable, "-m", "ltdet.scripts.make_synthetic", "--root", str(SYNTHETIC)],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    t0 = time.time()
    while todo or running:
        ready = [
            c
            for c in todo
            if not METHODS[c[0]][1] or (results / METHODS[c[0]][1] / f"seed{c[1]}.json").is_file()
        ]
        while ready and len(running) < jobs:
            cell = ready.pop(0)
            todo.remove(cell)
            log = _cell_dir(runs, *cell).parent / f"seed{cell[1]}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(
                _command(*cell, runs),
                cwd=ROOT,
                env=env,
                stdout=open(log, "w"),
                stderr=subprocess.STDOUT,
            )
            running.append((proc, cell, time.time()))
            print(f"[{time.time() - t0:6.0f} s] started {cell[0]} seed {cell[1]}", flush=True)
        if not running and todo:
            print(f"cannot run {todo}: their stage-1 baseline failed", file=sys.stderr)
            return
        time.sleep(5)
        for item in list(running):
            proc, (method, seed), started = item
            if proc.poll() is None:
                continue
            running.remove(item)
            metrics = _cell_dir(runs, method, seed) / "metrics.json"
            if proc.returncode == 0 and metrics.is_file():
                (results / method).mkdir(parents=True, exist_ok=True)
                out = json.loads(metrics.read_text())
                out["_seconds"] = time.time() - started
                (results / method / f"seed{seed}.json").write_text(json.dumps(out, indent=1))
                print(
                    f"[{time.time() - t0:6.0f} s] done {method} seed {seed}: APr "
                    f"{out['APr']:.3f} APf {out['APf']:.3f}",
                    flush=True,
                )
            else:
                print(
                    f"{method} seed {seed} failed (exit {proc.returncode}); see its log",
                    file=sys.stderr,
                )


def backfill_calibration(
    methods, seeds, *, runs: Path, results: Path, data_root: Path = SYNTHETIC
) -> int:
    """Add D-ECE (and the per-group D-ECE, MCE) to result files written before the trainer
    reported calibration, from the cell's own detections.json, with the evaluator's defaults:
    what the cell's evaluation computes today, to ~1e-7 (the json's rounding of scores and
    boxes; `--check-backfill` compares the two on a cell that has both). Returns the number of
    files updated."""
    updated = 0
    for method in methods:
        for seed in seeds:
            path = results / method / f"seed{seed}.json"
            dets = _cell_dir(runs, method, seed) / "detections.json"
            if not path.is_file() or not dets.is_file():
                continue
            out = json.loads(path.read_text())
            if "D-ECE" in out:
                continue
            out.update(recompute_calibration(dets, data_root))
            path.write_text(json.dumps(out, indent=1))
            updated += 1
            print(f"backfilled D-ECE of {method} seed {seed}: {out['D-ECE']:.5f}", flush=True)
    return updated


def recompute_calibration(dets: Path, data_root: Path = SYNTHETIC) -> dict:
    """The calibration entries of metrics.json for a cell's detections on `data_root`'s val set."""
    # imported here: the grid and the table need no torch / ltdet import in this process
    from ltdet.evaluation.calibration import calibration_metrics, evaluate_calibration

    cal = evaluate_calibration(
        str(data_root / "val.json"), str(dets), train=str(data_root / "train.json")
    )
    return calibration_metrics(cal)


def check_backfill(
    method: str, seed: int, *, runs: Path, results: Path, data_root: Path = SYNTHETIC
) -> int:
    """Recompute a cell's calibration entries from its detections.json and compare them with
    its stored ones (a cell whose evaluation computed them): 0 if equal to 1e-6, else 1."""
    stored = json.loads((results / method / f"seed{seed}.json").read_text())
    again = recompute_calibration(_cell_dir(runs, method, seed) / "detections.json", data_root)
    shared = sorted(k for k in again if k in stored)
    if not shared:
        print(f"{method} seed {seed}: its result file has no calibration entries to compare")
        return 1
    diff = max(abs(again[k] - stored[k]) for k in shared)
    print(f"{method} seed {seed}: largest difference over {shared}: {diff:.3g}")
    # detections.json holds scores and boxes as json floats, the cell's evaluation the float32
    # tensors: equal to ~1e-7. A NaN difference fails (`nan < 1e-6` is False).
    return 0 if diff < 1e-6 else 1


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def table(methods, results: Path, reference: str = "baseline") -> str:
    rows = {}
    for m in methods:
        cells = [json.loads(p.read_text()) for p in sorted((results / m).glob("seed*.json"))]
        if cells:
            # a key some cells lack (D-ECE before calibration existed) over the cells that have it
            rows[m] = {
                k: _mean_std([c[k] for c in cells if k in c])
                if any(k in c for c in cells)
                else None
                for k in KEYS
            }
    if not rows:
        return "no results yet"
    base = rows.get(reference)  # the row the `*` mark compares APr with
    lines = ["| method | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for m, r in rows.items():
        n = r["AP"][2]
        mark = ""
        if base and m != reference and n > 1 and base["APr"][2] > 1:
            se = math.sqrt(r["APr"][1] ** 2 / n + base["APr"][1] ** 2 / base["APr"][2])
            mark = " *" if abs(r["APr"][0] - base["APr"][0]) > 2 * se else ""
        cells = [_cell_text(r[k], n, 4 if k.startswith("D-ECE") else 3) for k in KEYS]
        lines.append(f"| {m}{mark} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell_text(stat, seeds: int, digits: int) -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    text = f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if n > 1 else "")
    return text + (f" ({n})" if n != seeds else "")  # fewer cells than the row's seeds


def _bar(std: float) -> float:
    return 0.0 if math.isnan(std) else std  # one seed: no error bar


def plot(methods, results: Path, path: Path) -> None:
    """APr against APf, one point per method (mean over seeds; error bars: std, where >= 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for m in methods:
        cells = [json.loads(p.read_text()) for p in sorted((results / m).glob("seed*.json"))]
        if not cells:
            continue
        apf = _mean_std([c["APf"] for c in cells])
        apr = _mean_std([c["APr"] for c in cells])
        ax.errorbar(apf[0], apr[0], xerr=_bar(apf[1]), yerr=_bar(apr[1]), fmt="o", capsize=3)
        ax.annotate(
            f"{m} ({len(cells)})",
            (apf[0], apr[0]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.set_xlabel("APf (frequent classes)")
    ax.set_ylabel("APr (rare classes)")
    ax.set_title("Long-tail methods on the bundled set (seeds in brackets; bars: std)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=2, help="cells at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--runs", default="runs/lt_methods", help="cell output folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--table-only", action="store_true")
    p.add_argument(
        "--reference",
        default="baseline",
        help="the method whose APr the table's `*` mark compares with (RetinaNet: retinanet_focal)",
    )
    p.add_argument(
        "--backfill-calibration",
        action="store_true",
        help="add D-ECE to result files that lack it, from their cells' detections.json",
    )
    p.add_argument(
        "--check-backfill",
        nargs=2,
        metavar=("METHOD", "SEED"),
        help="recompute a cell's D-ECE from its detections.json and compare with its result",
    )
    p.add_argument("--plot", default=None, help="also draw APr against APf into this PNG")
    args = p.parse_args(argv)
    methods = args.methods
    for m in list(methods):  # stage 2 starts from its stage-1 method's run of the same seed
        stage1 = METHODS[m][1]
        if stage1 and stage1 not in methods:
            methods.insert(0, stage1)
    results = Path(args.results)
    if args.check_backfill:
        method, seed = args.check_backfill
        return check_backfill(method, int(seed), runs=Path(args.runs), results=results)
    if args.backfill_calibration:
        backfill_calibration(methods, args.seeds, runs=Path(args.runs), results=results)
    elif not args.table_only:
        run_grid(
            methods,
            args.seeds,
            runs=Path(args.runs),
            results=results,
            jobs=args.jobs,
            threads=args.threads,
        )
    print(table(methods, results, args.reference))
    if args.plot:
        plot(methods, results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
