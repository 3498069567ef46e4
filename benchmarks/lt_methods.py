"""Long-tail methods on the bundled set: a grid of methods x seeds with the demo recipe, stage 2
on each seed's stage-1 baseline, and a table of mean +- std over seeds.

    python benchmarks/lt_methods.py                          # the default grid, seed 0
    python benchmarks/lt_methods.py --seeds 0 1 2 --jobs 2   # 3 seeds, two 1-thread runs at once
    python benchmarks/lt_methods.py --methods baseline rfs eqlv2 --table-only

Each cell is `tools/train.py CONFIG --opts seed=S output_dir=runs/lt_methods/METHOD/seedS`
(stage-2 cells: `--stage2 --from` the baseline cell's final checkpoint of the same seed) in its
own process with `--threads` torch threads. A cell whose metrics are already in `--results`
(`benchmarks/results/METHOD/seedS.json`, committed: json only, no checkpoints) is skipped, so
the grid resumes across days. The table marks a method whose APr differs from the baseline's by
more than twice the combined standard error (`*`; needs >= 2 seeds per cell); a method with one
seed reports its single value.
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

#: method -> (config, stage-2 of the baseline?)
METHODS = {
    "baseline": (STAGE1, False),
    "rfs": (f"{SYN}/rfs.yaml", False),
    "class_aware": (f"{SYN}/class_aware.yaml", False),
    "cb": (f"{SYN}/cb.yaml", False),
    "balanced_softmax": (f"{SYN}/balanced_softmax.yaml", False),
    "eql": (f"{SYN}/eql.yaml", False),
    "eqlv2": (f"{SYN}/eqlv2.yaml", False),
    "seesaw": (f"{SYN}/seesaw.yaml", False),
    "federated": (f"{SYN}/federated.yaml", False),
    "focal": (f"{SYN}/focal.yaml", False),
    "ghmc": (f"{SYN}/ghmc.yaml", False),
    "las": (f"{SYN}/las.yaml", False),
    "crt": (f"{SYN}/faster_rcnn_r18_fpn_stage2_crt.yaml", True),
    "lws": (f"{SYN}/faster_rcnn_r18_fpn_stage2_lws.yaml", True),
    "tau_norm": (f"{SYN}/faster_rcnn_r18_fpn_stage2_tau_norm.yaml", True),
    "cosine": (f"{SYN}/faster_rcnn_r18_fpn_stage2_cosine.yaml", True),
    "crt_las": (f"{SYN}/faster_rcnn_r18_fpn_stage2_las.yaml", True),
}
KEYS = ("AP", "AP50", "APr", "APc", "APf", "AP50r", "AP50f")


def _cell_dir(runs: Path, method: str, seed: int) -> Path:
    return runs / method / f"seed{seed}"


def _command(method: str, seed: int, runs: Path) -> list:
    config, stage2 = METHODS[method]
    cmd = [sys.executable, "tools/train.py", config, "--no-progress", "--overwrite", "--opts",
           f"seed={seed}", f"output_dir={_cell_dir(runs, method, seed)}"]
    if stage2:
        base = _cell_dir(runs, "baseline", seed) / "checkpoints"
        last = (base / "last_checkpoint").read_text().strip()
        cmd[3:3] = ["--stage2", "--from", str(base / last)]
    return cmd


def run_grid(methods, seeds, *, runs: Path, results: Path, jobs: int, threads: int) -> None:
    todo = [(m, s) for s in seeds for m in methods
            if not (results / m / f"seed{s}.json").is_file()]
    running = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    t0 = time.time()
    while todo or running:
        ready = [c for c in todo if not METHODS[c[0]][1]
                 or (results / "baseline" / f"seed{c[1]}.json").is_file()]
        while ready and len(running) < jobs:
            cell = ready.pop(0)
            todo.remove(cell)
            log = _cell_dir(runs, *cell).parent / f"seed{cell[1]}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen(_command(*cell, runs), cwd=ROOT, env=env,
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT)
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
                print(f"[{time.time() - t0:6.0f} s] done {method} seed {seed}: APr "
                      f"{out['APr']:.3f} APf {out['APf']:.3f}", flush=True)
            else:
                print(f"{method} seed {seed} failed (exit {proc.returncode}); see its log",
                      file=sys.stderr)


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def table(methods, results: Path) -> str:
    rows = {}
    for m in methods:
        cells = [json.loads(p.read_text()) for p in sorted((results / m).glob("seed*.json"))]
        if cells:
            rows[m] = {k: _mean_std([c[k] for c in cells]) for k in KEYS}
    if not rows:
        return "no results yet"
    base = rows.get("baseline")
    lines = ["| method | seeds | " + " | ".join(KEYS) + " |",
             "|---|---|" + "---|" * len(KEYS)]
    for m, r in rows.items():
        n = r["AP"][2]
        mark = ""
        if base and m != "baseline" and n > 1 and base["APr"][2] > 1:
            se = math.sqrt(r["APr"][1] ** 2 / n + base["APr"][1] ** 2 / base["APr"][2])
            mark = " *" if abs(r["APr"][0] - base["APr"][0]) > 2 * se else ""
        cells = [f"{r[k][0]:.3f}" + (f" +- {r[k][1]:.3f}" if r[k][2] > 1 else "") for k in KEYS]
        lines.append(f"| {m}{mark} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=2, help="cells at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--runs", default="runs/lt_methods", help="cell output folders")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args(argv)
    methods = args.methods
    if any(METHODS[m][1] for m in methods) and "baseline" not in methods:
        methods = ["baseline"] + methods  # stage 2 starts from the baseline of its seed
    results = Path(args.results)
    if not args.table_only:
        run_grid(methods, args.seeds, runs=Path(args.runs), results=results, jobs=args.jobs,
                 threads=args.threads)
    print(table(methods, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
