"""Train (and evaluate) a detector from a YAML config.

    ltdet-train configs/synthetic/faster_rcnn_r18_fpn.yaml
    ltdet-train CONFIG --opts solver.lr=0.01 data.batch_size=2
    ltdet-train CONFIG --resume            # continue from OUTPUT_DIR/checkpoints
    ltdet-train CONFIG --resume-from CKPT --opts solver.lr=0.005   # from a named one
    torchrun --nproc_per_node=8 -m ltdet.scripts.train CONFIG      # DDP, one process per GPU
    ltdet-train STAGE2_CONFIG --stage2 --from STAGE1_CKPT   # classifier refinement

(`python tools/train.py ...` in a source checkout is the same command.)

Stage 2: the detector is built from the (stage-2) config, then
`ltdet.engine.refine.prepare_stage2(model, cfg, stage1_state_dict)` loads the stage-1 weights,
freezes what must stay fixed and returns the parameters to optimise and the losses to sum;
training then proceeds as usual (same checkpoints, --resume, evaluation) on those parameters
only, summing only those losses; an empty list of parameters (tau-norm) skips training and
evaluates.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch.distributed as dist

from ltdet.cli import USER_ERRORS, report
from ltdet.config import ConfigError, load_config

# the module, not the function: tests replace `logger.setup_console_logging` to keep pytest's
# root logger untouched
from ltdet.engine import NonFiniteLossError, Trainer, load_checkpoint, logger, prepare_stage2
from ltdet.engine.distributed import CollectiveTimeout
from ltdet.evaluation import format_table


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ltdet-train", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. solver.lr=0.01 model.backbone=resnet50",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in output_dir (schedule keys such "
        "as solver.lr may change and take effect from there; model and data "
        "keys may not)",
    )
    p.add_argument(
        "--resume-from",
        metavar="CKPT",
        help="continue from this checkpoint instead of the last one (implies --resume)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output_dir holding a previous run, deleting its "
        "checkpoints and log.jsonl (without it such a run is refused)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument(
        "--stage2",
        action="store_true",
        help="decoupled classifier refinement on a stage-1 checkpoint (needs --from)",
    )
    p.add_argument("--from", dest="from_ckpt", metavar="CKPT", help="stage-1 checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.stage2 and not args.from_ckpt:
        p.error("--stage2 needs --from STAGE1_CKPT")
    if args.from_ckpt and not args.stage2:
        p.error("--from is only used with --stage2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Exit code: 0; 1 when training stopped on a non-finite loss; 2 for a user error (config,
    data, checkpoint, a refused --resume or output_dir), reported in one line."""
    args = parse_args(argv)
    logger.setup_console_logging(int(os.environ.get("RANK", "0")))
    try:
        cfg = load_config(args.config, args.opts)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        results, trainer = run(args, cfg)
    except (NonFiniteLossError, CollectiveTimeout) as e:  # the run stopped; the message says why
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:  # a --resume changing the model or the data, a used output_dir
        return report(e, "config error")
    except USER_ERRORS as e:
        return report(e)
    if results and trainer.info.is_main:
        print(format_table(results))
        print(f"outputs in {cfg['output_dir']}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def run(args: argparse.Namespace, cfg: dict) -> tuple[dict | None, Trainer]:
    """(final metrics, trainer): build, optionally prepare stage 2, train, evaluate."""
    trainer = Trainer(
        cfg,
        resume=args.resume,
        resume_from=args.resume_from,
        evaluate=not args.no_eval,
        progress=not args.no_progress,
        stage2=args.stage2,
        overwrite=args.overwrite,
    )
    if args.stage2:
        stage1 = load_checkpoint(args.from_ckpt)["model"]
        setup = prepare_stage2(trainer.model, cfg, stage1)
        return trainer.train(param_groups=setup.param_groups, loss_keys=setup.loss_keys), trainer
    return trainer.train(), trainer


if __name__ == "__main__":
    sys.exit(main())
