#!/usr/bin/env python
"""Sweep the tau of post-hoc tau-normalisation on the validation set and report the best.

    python tools/tau_sweep.py configs/synthetic/faster_rcnn_r18_fpn_stage2_tau_norm.yaml \
        --ckpt runs/synthetic/faster_rcnn_r18_fpn/checkpoints/model_0000350.pth \
        [--taus 0,0.25,0.5,0.75,1]

For each tau the stage-1 classifier rows are rescaled, ``w_c <- w_c / ||w_c||^tau`` (Kang et al.,
ICLR 2020; background row per ``refine.normalize_background``) and, as in the authors'
``tau_norm.py``, scored without their biases (``refine.tau_keep_bias: true`` keeps them); the
detector is run on the config's validation set and evaluated LVIS-style; each run's report goes
to ``OUTPUT_DIR/tau_sweep/tau_<tau>/``, the table to ``OUTPUT_DIR/tau_sweep/summary.json`` and
stdout. The default taus are the authors' sweep, ``np.linspace(0, 2, 21)`` (0, 0.1, ..., 2).
``tau = 0`` is the stage-1 model without the foreground biases (the stage-1 model itself with
``tau_keep_bias: true``). Runs under torchrun too (inference is sharded).
"""

import argparse
import json
import os
import sys
from pathlib import Path

from ltdet.config import ConfigError, load_config

METRICS = ("AP", "APr", "APc", "APf")
#: the authors' sweep (classifier-balancing, tau_norm.py: np.linspace(0, 2, 21))
DEFAULT_TAUS = [round(0.1 * i, 10) for i in range(21)]


def parse_taus(text: str) -> list[float]:
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--taus must be comma-separated numbers, got {text!r}"
        ) from None
    if not taus or any(t < 0 for t in taus):
        raise argparse.ArgumentTypeError(f"--taus needs at least one value >= 0, got {text!r}")
    return taus


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="stage-2 tau_norm config (its model section is stage 1's)")
    p.add_argument("--ckpt", required=True, help="stage-1 checkpoint")
    p.add_argument(
        "--taus",
        type=parse_taus,
        default=list(DEFAULT_TAUS),
        help="comma-separated tau values (default: the authors' 0,0.1,...,2)",
    )
    p.add_argument("--metric", choices=METRICS, default="AP", help="metric that picks the best tau")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return p.parse_args(argv)


def format_sweep(rows: list[dict], metric: str) -> str:
    """Plain-text table of the sweep, the best row (by ``metric``) marked with ``*``."""
    best = max(rows, key=lambda r: r[metric])
    lines = ["   tau " + "".join(f"{m:>8}" for m in METRICS)]
    for r in rows:
        mark = "*" if r is best else " "
        lines.append(f"{mark}{r['tau']:5.2f} " + "".join(f"{100 * r[m]:8.2f}" for m in METRICS))
    lines.append(f"best tau by {metric}: {best['tau']:g} ({metric} {100 * best[metric]:.2f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ltdet.engine.logger import setup_console_logging

    setup_console_logging()  # one console handler, installed before `lvis` configures its own
    try:
        cfg = load_config(args.config, args.opts)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    import torch

    from ltdet.engine import distributed as du
    from ltdet.engine.checkpoint import load_checkpoint
    from ltdet.engine.loaders import build_datasets, locate_or_generate_data
    from ltdet.engine.logger import setup_logging
    from ltdet.engine.validation import checkpoint_classes, evaluate_model
    from ltdet.models import build_detector, tau_normalize

    info = du.init_distributed(cfg["device"])
    out_root = Path(cfg["output_dir"]) / "tau_sweep"
    setup_logging(out_root, info.rank)
    ckpt = load_checkpoint(args.ckpt)
    meta = ckpt.get("meta") or {}
    if meta.get("stage2"):
        print(
            f"{args.ckpt} is a stage-2 checkpoint; tau_sweep needs the stage-1 one", file=sys.stderr
        )
        return 2
    paths = locate_or_generate_data(cfg)
    stats, label_to_cat_id = checkpoint_classes(ckpt, cfg, paths)
    _, val_ds = build_datasets(cfg, paths, train=False)
    model = build_detector(cfg, len(label_to_cat_id), stats)
    model.load_state_dict(ckpt["model"])
    model.to(info.device)
    predictor = model.roi_heads.box_predictor
    stage1_weight = predictor.cls_score.weight.detach().clone()
    stage1_bias = (
        predictor.cls_score.bias.detach().clone() if predictor.cls_score.bias is not None else None
    )
    background = bool(cfg["refine"].get("normalize_background", False))
    keep_bias = bool(cfg["refine"].get("tau_keep_bias", False))

    rows = []
    for tau in args.taus:
        with torch.no_grad():
            predictor.cls_score.weight.copy_(stage1_weight)
            if stage1_bias is not None:
                predictor.cls_score.bias.copy_(stage1_bias)
        tau_normalize(predictor, tau, normalize_background=background, keep_bias=keep_bias)
        res = evaluate_model(
            model,
            val_ds,
            label_to_cat_id=label_to_cat_id,
            val_json=paths["val_json"],
            train_json=paths["train_json"],
            out_dir=out_root / f"tau_{tau:g}",
            device=info.device,
            max_dets=cfg["test"]["max_dets"],
            batch_size=cfg["data"]["batch_size"],
            num_workers=cfg["data"]["num_workers"],
            amp=cfg["solver"]["amp"],
        )
        if info.is_main:
            rows.append({"tau": tau, **{m: float(res[m]) for m in METRICS}})
            print(
                f"tau {tau:g}: " + ", ".join(f"{m} {100 * res[m]:.2f}" for m in METRICS), flush=True
            )
    if info.is_main:
        print(format_sweep(rows, args.metric))
        best = max(rows, key=lambda r: r[args.metric])
        (out_root / "summary.json").write_text(
            json.dumps(
                {
                    "rows": rows,
                    "metric": args.metric,
                    "best_tau": best["tau"],
                    "normalize_background": background,
                    "tau_keep_bias": keep_bias,
                },
                indent=2,
            )
        )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
