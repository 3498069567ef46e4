"""Is the demo recipe stable? Train it for several seeds x torch thread counts and print, per
cell, the largest loss and the largest global gradient norm (before clipping) of any iteration.

    python benchmarks/demo_stability.py                          # 5 seeds x {1, 2} threads
    python benchmarks/demo_stability.py --seeds 0 1 --threads 2 --iters 150
    python benchmarks/demo_stability.py --opts solver.lr=0.02 solver.warmup_iters=50 \
        solver.clip_grad_norm=null --out runs/stability_old     # the recipe before issue 9

Each cell is its own process (torch's thread count is per process) training the demo config
(`configs/synthetic/faster_rcnn_r18_fpn.yaml`) with `seed=S` through the warm-up and the first
`--iters` iterations after it, on the real schedule (`solver.max_iter` unchanged: the run is cut
short with `Trainer.train(until=...)`, no checkpoint, no evaluation), logging every iteration.
A cell whose result.json exists under `--out` is skipped, so an interrupted grid resumes; cells
of one thread run `--jobs` at a time (default: as many as fit on the cores).
A cell that stops on a non-finite loss is reported with the iteration it stopped at.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/synthetic/faster_rcnn_r18_fpn.yaml"


def run_cell(args) -> int:
    """Child process: one (seed, threads) cell; writes result.json in its folder."""
    import torch

    torch.set_num_threads(args.cell_threads)
    from ltdet.config import load_config
    from ltdet.engine.logger import setup_console_logging
    from ltdet.engine.trainer import NonFiniteLossError, Trainer

    setup_console_logging()
    out = Path(args.out) / f"seed{args.cell_seed}_threads{args.cell_threads}"
    cfg = load_config(
        args.config,
        [
            f"seed={args.cell_seed}",
            f"output_dir={out}",
            "solver.log_period=1",
            "solver.checkpoint_period=1000000",
            *args.opts,
        ],
    )
    until = cfg["solver"]["warmup_iters"] + args.iters
    t = time.perf_counter()
    stopped = None
    try:
        # a cell folder without result.json is an interrupted cell: start it again
        Trainer(cfg, evaluate=False, progress=False, overwrite=True).train(until=until)
    except NonFiniteLossError as e:
        stopped = str(e).split(":", 1)[0]
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    result = {
        "seed": args.cell_seed,
        "threads": args.cell_threads,
        "target_iters": until,
        "iters": steps[-1]["iter"] if steps else 0,
        "stopped": stopped,
        "max_loss": max(r["loss_max"] for r in steps) if steps else None,
        "max_grad_norm": max(r["grad_norm_max"] for r in steps) if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "seconds": time.perf_counter() - t,
        "opts": args.opts,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--iters", type=int, default=120, help="iterations after the warm-up (default 120)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=max(1, (os.cpu_count() or 1)),
        help="cells run at once are limited to this many threads in total",
    )
    p.add_argument("--out", default="runs/demo_stability")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--cell-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cell-threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell_seed is not None:
        return run_cell(args)

    os.chdir(ROOT)  # the cells run in the repository; relative paths mean the same here
    sys.path.insert(0, str(ROOT))
    from ltdet.config import load_config
    from ltdet.data.synthetic import make_synthetic_lvis

    syn = load_config(args.config, args.opts)["data"]["synthetic"]
    make_synthetic_lvis(syn["root"], seed=syn["seed"])  # once, before the cells share it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(s, t) for t in sorted(args.threads, reverse=True) for s in args.seeds]
    todo = [c for c in cells if not (out / f"seed{c[0]}_threads{c[1]}" / "result.json").is_file()]
    running = []  # (process, threads)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    while todo or running:
        busy = sum(t for _, t in running)
        while todo and (not running or busy + todo[0][1] <= args.jobs):
            seed, threads = todo.pop(0)
            env_cell = dict(env, OMP_NUM_THREADS=str(threads))
            log = open(out / f"seed{seed}_threads{threads}.log", "w")
            cmd = [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--out",
                str(out),
                "--iters",
                str(args.iters),
                "--cell-seed",
                str(seed),
                "--cell-threads",
                str(threads),
                "--opts",
                *args.opts,
            ]
            running.append(
                (subprocess.Popen(cmd, env=env_cell, stdout=log, stderr=log, cwd=ROOT), threads)
            )
            busy += threads
            print(f"started seed {seed}, {threads} thread(s)", flush=True)
        time.sleep(2)
        for proc, threads in list(running):
            if proc.poll() is not None:
                running.remove((proc, threads))
                if proc.returncode:
                    print(f"a cell failed (exit {proc.returncode}); see its log in {out}")

    rows = []
    for seed, threads in cells:
        path = out / f"seed{seed}_threads{threads}" / "result.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    print(f"\nconfig {args.config} {' '.join(args.opts)}")
    print("| seed | threads | iterations | max loss | max grad norm | last loss | finite | s/it |")
    print("|---|---|---|---|---|---|---|---|")
    finite = 0
    for r in rows:
        ok = r["stopped"] is None and r["iters"] >= r["target_iters"]
        finite += ok
        print(
            f"| {r['seed']} | {r['threads']} | {r['iters']} / {r['target_iters']} | "
            f"{r['max_loss']:.3g} | {r['max_grad_norm']:.3g} | {r['last_loss']:.3f} | "
            f"{'yes' if ok else 'NO: ' + (r['stopped'] or 'cut short')} | "
            f"{r['seconds'] / max(r['iters'], 1):.2f} |"
        )
    print(f"\n{finite} of {len(cells)} cells finite through their target iteration")
    return 0 if finite == len(cells) else 1


if __name__ == "__main__":
    sys.exit(main())
