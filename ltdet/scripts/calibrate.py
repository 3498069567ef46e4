"""Fit a post-hoc score calibrator and report AP and D-ECE (per r / c / f) before and after.

    ltdet-calibrate CONFIG --ckpt CKPT [--method temperature|temperature_group|platt]
        [--fit-frac 0.25] [--seed 0] [--out DIR] [--opts KEY=VALUE ...]
    ltdet-calibrate --fit-gt FIT.json --fit-dets FIT_DETS.json --gt VAL.json
        --dets VAL_DETS.json [--train TRAIN.json] [--method ...] [--out DIR]

Checkpoint form: a seeded held-out split of the training images (``--fit-frac`` of them) is
written as ``OUT/fit_split.json``; the checkpoint is run on it (``OUT/fit/``) and on the config's
validation set (``OUT/before/``, or ``--val-dets`` to reuse a result json of that checkpoint);
the calibrator is fitted on the split's detections (TP / FP by the evaluator's matching at
``--iou``, LVIS federated rules) and saved beside the checkpoint as
``CKPT_STEM.calibration_METHOD.json`` (and as ``OUT/calibrator.json``). Note: the split is
held out from the *calibration* only; for a detector trained on all training images (as the
runs here) its scores on the split are training-set scores. Train without the split for a clean
fit.

Both forms then evaluate the validation detections before and after calibration: AP, APr, APc,
APf (``evaluate_lvis``) and D-ECE / MCE overall and per group (``evaluate_calibration``), print
a before / after table, and write ``calibration_summary.json``, ``detections_calibrated.json``
and ``reliability_{before,after}.png`` to the output folder. Pooled AP (APpool, and per r / c
/ f, Dave et al. 2021) comes from ``evaluate_lvis(protocol="fixed")``: calibration that makes
the scores of different classes comparable raises it, while per-class monotone maps leave the
standard AP unchanged.
"""

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from ltdet.cli import USER_ERRORS, report
from ltdet.config import load_config
from ltdet.engine.loaders import locate_or_generate_data
from ltdet.engine.validation import evaluate_checkpoint
from ltdet.evaluation import evaluate_lvis
from ltdet.evaluation.calibration import dece_metrics, evaluate_calibration
from ltdet.evaluation.calibrators import (
    apply_calibrator,
    columns_to_results,
    fit_calibrator,
    save_calibrator,
)
from ltdet.evaluation.reliability_plot import plot_reliability
from ltdet.fileio import atomic_write

METHODS = ("temperature", "temperature_group", "platt")
AP_KEYS = ("AP", "AP50", "APr", "APc", "APf")
POOL_KEYS = ("APpool", "APpoolr", "APpoolc", "APpoolf")
logger = logging.getLogger("calibrate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ltdet-calibrate", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", help="YAML config (checkpoint form, with --ckpt)")
    p.add_argument("--ckpt", help="checkpoint to calibrate")
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides (checkpoint form)",
    )
    p.add_argument(
        "--fit-frac",
        type=float,
        default=0.25,
        help="fraction of the training images held out to fit on (default 0.25)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument(
        "--val-dets",
        help="checkpoint form: the checkpoint's validation result json "
        "(skips re-running the validation set)",
    )
    p.add_argument("--fit-gt", help="json form: ground truth of the fit images")
    p.add_argument("--fit-dets", help="json form: detections on the fit images")
    p.add_argument("--gt", help="json form: validation json")
    p.add_argument("--dets", help="json form: validation result json")
    p.add_argument("--train", help="training json (class groups of COCO-format gt)")
    p.add_argument("--method", default="temperature", choices=METHODS)
    p.add_argument("--iou", type=float, default=0.5, help="TP IoU threshold (default 0.5)")
    p.add_argument("--bins", type=int, default=10, help="D-ECE bins (default 10)")
    p.add_argument("--binning", default="uniform", choices=("uniform", "equal_mass"))
    p.add_argument("--max-dets", type=int, default=300)
    p.add_argument(
        "--min-score",
        type=float,
        default=0.0,
        help="D-ECE over detections scoring above this (Kueppers et al.: 0.3); the "
        "fit always uses every counted detection (default 0)",
    )
    p.add_argument(
        "--out", help="output folder (default: OUTPUT_DIR/calibration_METHOD, or next to DETS)"
    )
    args = p.parse_args(argv)
    json_form = any(v is not None for v in (args.fit_gt, args.fit_dets, args.gt, args.dets))
    ckpt_form = args.config is not None or args.ckpt is not None
    if json_form == ckpt_form:
        p.error("give either CONFIG --ckpt CKPT, or --fit-gt --fit-dets --gt --dets")
    if json_form and not all((args.fit_gt, args.fit_dets, args.gt, args.dets)):
        p.error("the json form needs --fit-gt, --fit-dets, --gt and --dets")
    if ckpt_form and not (args.config and args.ckpt):
        p.error("the checkpoint form needs both CONFIG and --ckpt")
    if not 0 < args.fit_frac < 1:
        p.error(f"--fit-frac must be in (0, 1), got {args.fit_frac}")
    return args


def main(argv=None) -> int:
    """Exit code: 0, or 2 for a user error (config, data, checkpoint), reported in one line."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(args)
    except USER_ERRORS as e:
        return report(e)
    return 0


def held_out_split(train_json, frac: float, seed: int) -> dict:
    """The training json restricted to a seeded random ``frac`` of its images (categories, with
    their training frequency fields, unchanged)."""
    with open(train_json) as f:
        doc = json.load(f)
    ids = np.sort(np.array([im["id"] for im in doc["images"]], np.int64))
    n = max(1, int(round(frac * ids.size)))
    keep = set(np.random.default_rng(seed).permutation(ids)[:n].tolist())
    out = {k: v for k, v in doc.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in doc["images"] if im["id"] in keep]
    out["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    return out


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def run(args) -> dict:
    if args.ckpt:
        return _run_checkpoint(args)
    out_dir = Path(
        args.out
        or os.path.join(os.path.dirname(os.path.abspath(args.dets)), f"calibration_{args.method}")
    )
    return calibrate_and_report(
        args, args.fit_gt, args.fit_dets, args.gt, args.dets, args.train, out_dir
    )


def _run_checkpoint(args) -> dict:
    cfg = load_config(args.config, args.opts)
    paths = locate_or_generate_data(cfg)
    out_dir = Path(args.out or os.path.join(cfg["output_dir"], f"calibration_{args.method}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    split = held_out_split(paths["train_json"], args.fit_frac, args.seed)
    split_path = out_dir / "fit_split.json"
    _write_json(split_path, split)
    logger.info(
        "fit split: %d of the training images (seed %d) -> %s",
        len(split["images"]),
        args.seed,
        split_path,
    )
    fit_cfg = copy.deepcopy(cfg)
    fit_cfg["data"]["train"] = {"json": paths["train_json"], "images": paths["train_images"]}
    fit_cfg["data"]["val"] = {"json": str(split_path), "images": paths["train_images"]}
    evaluate_checkpoint(fit_cfg, args.ckpt, out_dir / "fit")
    val_dets = args.val_dets
    if val_dets is None:
        evaluate_checkpoint(cfg, args.ckpt, out_dir / "before")
        val_dets = str(out_dir / "before" / "detections.json")
    res = calibrate_and_report(
        args,
        str(split_path),
        str(out_dir / "fit" / "detections.json"),
        paths["val_json"],
        val_dets,
        paths["train_json"],
        out_dir,
    )
    ckpt = Path(args.ckpt)
    beside = ckpt.with_name(f"{ckpt.stem}.calibration_{args.method}.json")
    save_calibrator(res["calibrator"], beside, **res["fit"], checkpoint=ckpt.name)
    print(f"calibrator: {beside}")
    return res


def calibrate_and_report(args, fit_gt, fit_dets, gt, dets, train, out_dir) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cal = fit_calibrator(
        args.method, fit_gt, fit_dets, iou_thr=args.iou, max_dets=args.max_dets, train=train
    )
    fit_rel = evaluate_calibration(
        fit_gt,
        fit_dets,
        iou_thr=args.iou,
        num_bins=args.bins,
        binning=args.binning,
        max_dets=args.max_dets,
        train=train,
    )
    fit = {
        "method": args.method,
        "fit_gt": str(fit_gt),
        "fit_dets": str(fit_dets),
        "fit_detections": fit_rel["num_dets"]["all"],
        "fit_tp": fit_rel["num_tp"]["all"],
        "iou_thr": args.iou,
    }
    calibrated = apply_calibrator(cal, dets)
    _write_json(out_dir / "detections_calibrated.json", columns_to_results(calibrated))
    summary = {"fit": fit, "calibrator": cal.state_dict()}
    for name, d in (("before", dets), ("after", calibrated)):
        ap = evaluate_lvis(gt, d, max_dets=args.max_dets, train=train)
        ce = evaluate_calibration(
            gt,
            d,
            iou_thr=args.iou,
            num_bins=args.bins,
            binning=args.binning,
            max_dets=args.max_dets,
            train=train,
            min_score=args.min_score,
        )
        fixed = evaluate_lvis(gt, d, protocol="fixed", dets_per_class=10000, train=train)
        pooled = {k: fixed[k] for k in POOL_KEYS if k in fixed}
        summary[name] = {**{k: ap[k] for k in AP_KEYS if k in ap}, **pooled, **dece_metrics(ce)}
        summary[f"num_dets_{name}"] = ce["num_dets"]
        plot_reliability(
            ce,
            out_dir / f"reliability_{name}.png",
            title=f"{name} calibration ({args.method}), IoU {args.iou:g}",
        )
    save_calibrator(cal, out_dir / "calibrator.json", **fit)
    _write_json(out_dir / "calibration_summary.json", summary)
    print(format_before_after(summary))
    print(f"report: {out_dir}")
    return {"summary": summary, "calibrator": cal, "fit": fit}


def format_before_after(summary: dict) -> str:
    keys = [k for k in summary["before"] if not k.startswith("MCE")]
    w = max(len(k) for k in keys)
    lines = [f"{'metric':<{w}}  before   after", f"{'-' * w}  ------  ------"]
    for k in keys:
        b, a = summary["before"][k], summary["after"][k]
        lines.append(f"{k:<{w}}  " + "  ".join("   n/a" if v == -1 else f"{v:.4f}" for v in (b, a)))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
