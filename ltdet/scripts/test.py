"""Evaluate detections (LVIS-style AP, or COCOeval rules for COCO-format gt) and write a report.

    ltdet-test --gt VAL.json --dets DETS.json [--train TRAIN.json] [--out DIR]
    ltdet-test CONFIG --ckpt CKPT [--out DIR] [--opts KEY=VALUE ...]

(`python tools/test.py ...` in a source checkout is the same command.) The first form evaluates
a result json (LVIS / COCO result format: image_id, category_id, bbox xywh, score); the second
runs the checkpoint on the config's validation set (`ltdet.engine.validation.evaluate_checkpoint`).
Both print the metric table (AP, AR and D-ECE overall and per r / c / f, IoU 0.5, 10 bins) and
write metrics.json, per_class_ap.csv, ap_vs_frequency.png and reliability.png (reliability
diagrams per r / c / f) to the output folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ltdet.cli import USER_ERRORS, report
from ltdet.config import load_config
from ltdet.engine.validation import evaluate_checkpoint
from ltdet.evaluation import evaluate_lvis, format_table, write_report
from ltdet.evaluation.calibration import calibration_metrics, evaluate_calibration
from ltdet.evaluation.reliability_plot import plot_reliability


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ltdet-test", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="YAML config (checkpoint form, with --ckpt)")
    p.add_argument("--ckpt", help="checkpoint to evaluate on the config's validation set")
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides (checkpoint form)",
    )
    p.add_argument("--gt", help="validation json (LVIS v1 or COCO format)")
    p.add_argument("--dets", help="result json: list of {image_id, category_id, bbox, score}")
    p.add_argument(
        "--train",
        help="training json: per-class training counts (r/c/f and the "
        "COCO-LT bins AP1-AP4 for COCO-format gt)",
    )
    p.add_argument("--out", help="report folder (default: next to DETS, or OUTPUT_DIR/eval)")
    p.add_argument("--max-dets", type=int, default=300)
    p.add_argument("--device", default=None, help="torch device for matching (default cpu)")
    args = p.parse_args(argv)
    json_form = args.gt is not None or args.dets is not None
    ckpt_form = args.config is not None or args.ckpt is not None
    if json_form == ckpt_form:
        p.error("give either --gt and --dets, or CONFIG --ckpt CKPT")
    if json_form and not (args.gt and args.dets):
        p.error("--gt and --dets go together")
    if ckpt_form and not (args.config and args.ckpt):
        p.error("the checkpoint form needs both CONFIG and --ckpt")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code: 0, or 2 for a user error (config, data, checkpoint), reported in one line."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(args)
    except USER_ERRORS as e:
        return report(e)
    return 0


def run(args: argparse.Namespace) -> dict:
    """The metrics of either form; prints the table and writes the report."""
    if args.ckpt:
        cfg = load_config(args.config, args.opts)
        out_dir = args.out or os.path.join(cfg["output_dir"], "eval")
        res = evaluate_checkpoint(cfg, args.ckpt, out_dir)  # writes the report on rank 0
        if res:
            print(format_table(res))
            print(f"report: {out_dir}")
        return res

    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.dets)), "eval")
    res = evaluate_lvis(
        args.gt, args.dets, max_dets=args.max_dets, device=args.device, train=args.train
    )
    cal = evaluate_calibration(
        args.gt, args.dets, max_dets=args.max_dets, device=args.device, train=args.train
    )
    res.update(calibration_metrics(cal, coco_lt_bins="AP1" in res))
    paths = write_report(res, out_dir)
    paths["reliability"] = os.path.join(out_dir, "reliability.png")
    plot_reliability(cal, paths["reliability"])
    print(format_table(res))
    print("report: " + ", ".join(paths.values()))
    return res


if __name__ == "__main__":
    sys.exit(main())
