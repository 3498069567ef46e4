"""The ltdet demo (`make demo`): generate the long-tailed data set, train, evaluate, report.

    python tools/demo.py                                   # the default demo config
    python tools/demo.py --opts solver.max_iter=100        # a quicker, weaker run
    python tools/demo.py --check                           # exit 1 if a demo criterion fails

(`python -m ltdet.scripts.demo` is the same; run it in a source checkout: the default config is
the checkout's configs/synthetic/faster_rcnn_r18_fpn.yaml.)

Steps: (1) the synthetic LVIS-format set of `data.synthetic` (docs/synthetic.md) is generated
unless a finished copy exists; (2) the config is trained by the engine (`ltdet.engine.Trainer`,
exactly what ltdet-train runs) and evaluated LVIS-style; (3) the metrics are printed with
the two things the demo is meant to show: the detector learns (AP50 on the frequent classes >=
0.5) and the long tail bites (APr <= APf / 2 for this plain softmax baseline). The outputs
(checkpoints, detections.json, metrics.json, per_class_ap.csv, ap_vs_frequency.png) are in the
config's `output_dir`, plus demo_summary.json with the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ltdet.config import ConfigError, load_config
from ltdet.data.synthetic import make_synthetic_lvis
from ltdet.engine import NonFiniteLossError, Trainer, setup_console_logging
from ltdet.evaluation import format_table
from ltdet.scripts.make_synthetic import class_table

DEFAULT_CONFIG = "configs/synthetic/faster_rcnn_r18_fpn.yaml"
# The demo's acceptance criteria (issue 2): the model learns, and the tail bites.
MIN_AP50_FREQUENT = 0.5
MAX_APR_OVER_APF = 0.5


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code: 0; 1 on a non-finite loss or (with --check) a failed criterion; 2 for a user
    error."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})"
    )
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. solver.max_iter=100",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous demo run in the output_dir (make demo DEMO_ARGS=--overwrite)",
    )
    p.add_argument(
        "--check", action="store_true", help="exit with status 1 when a demo criterion is not met"
    )
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.opts)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg["data"]["train"]["json"] is not None:
        print("note: data.train.json is set: training on that data set, not the synthetic one")

    # one console handler (force=True: it replaces the one `lvis` installs when imported)
    setup_console_logging()

    timings = {}
    syn = cfg["data"]["synthetic"]
    if cfg["data"]["train"]["json"] is None:
        print(f"[1/3] data set: {syn['root']} (seed {syn['seed']})", flush=True)
        t = time.perf_counter()
        paths = make_synthetic_lvis(syn["root"], seed=syn["seed"])
        timings["data_s"] = time.perf_counter() - t
        print(class_table(paths["train_json"]))
        print(f"      ready in {timings['data_s']:.1f} s", flush=True)

    print(
        f"[2/3] training {args.config} for {cfg['solver']['max_iter']} iterations "
        f"(CPU threads: {os.environ.get('OMP_NUM_THREADS', 'default')})",
        flush=True,
    )
    t = time.perf_counter()
    try:
        trainer = Trainer(
            cfg,
            resume=False,
            evaluate=True,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except ConfigError as e:  # e.g. a previous demo run in the output_dir
        print(f"error: {e} (with make: make demo DEMO_ARGS=--overwrite)", file=sys.stderr)
        return 2
    try:
        results = trainer.train()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    timings["train_and_eval_s"] = time.perf_counter() - t

    print("[3/3] evaluation", flush=True)
    out_dir = Path(cfg["output_dir"])
    ap50 = {g: results[f"AP50{g}"] for g in ("r", "c", "f")}  # AP at IoU 0.5 per frequency group
    timings["total_s"] = time.perf_counter() - t_start
    print(format_table(results))
    learns = ap50["f"] >= MIN_AP50_FREQUENT
    bites = results["APr"] <= MAX_APR_OVER_APF * results["APf"]
    print(f"AP50 by group: r {ap50['r']:.3f}  c {ap50['c']:.3f}  f {ap50['f']:.3f}")
    print(
        f"the model learns (AP50 on frequent classes >= {MIN_AP50_FREQUENT}): "
        f"{'yes' if learns else 'NO'} ({ap50['f']:.3f})"
    )
    print(
        f"the long tail bites (APr <= {MAX_APR_OVER_APF} * APf): {'yes' if bites else 'NO'} "
        f"(APr {results['APr']:.3f}, APf {results['APf']:.3f})"
    )
    print(
        f"wall time: {timings['total_s'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f}' for k, v in timings.items())}); outputs in {out_dir}"
    )
    summary = {
        "config": args.config,
        "opts": args.opts,
        "timings": timings,
        "AP50_by_group": ap50,
        "learns": learns,
        "tail_bites": bites,
        "load_avg_1min": os.getloadavg()[0],
        **{k: results[k] for k in ("AP", "AP50", "APr", "APc", "APf") if k in results},
    }
    with open(out_dir / "demo_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return 1 if args.check and not (learns and bites) else 0


if __name__ == "__main__":
    sys.exit(main())
