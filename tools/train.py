#!/usr/bin/env python
"""Train (and evaluate) a detector from a YAML config.

    python tools/train.py configs/synthetic/faster_rcnn_r18_fpn.yaml
    python tools/train.py CONFIG --opts solver.lr=0.01 data.batch_size=2
    python tools/train.py CONFIG --resume            # continue from OUTPUT_DIR/checkpoints
    python tools/train.py CONFIG --resume-from CKPT --opts solver.lr=0.005   # from a named one
    torchrun --nproc_per_node=8 tools/train.py CONFIG # DDP, one process per GPU
    python tools/train.py STAGE2_CONFIG --stage2 --from STAGE1_CKPT   # classifier refinement

Stage 2: the detector is built from the (stage-2) config, then
`ltdet.engine.refine.prepare_stage2(model, cfg, stage1_state_dict)` loads the stage-1 weights,
freezes what must stay fixed and returns the parameters to optimise; training then proceeds as
usual (same checkpoints, --resume, evaluation) on those parameters only, summing only the
losses named in `model.ltdet_loss_keys` when prepare_stage2 sets it; an empty list of
parameters (tau-norm) skips training and evaluates.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from ltdet.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. solver.lr=0.01 model.backbone=resnet50")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in output_dir (schedule keys such "
                        "as solver.lr may change and take effect from there; model and data "
                        "keys may not)")
    p.add_argument("--resume-from", metavar="CKPT",
                   help="continue from this checkpoint instead of the last one (implies --resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output_dir holding a previous run, deleting its "
                        "checkpoints and log.jsonl (without it such a run is refused)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument("--stage2", action="store_true",
                   help="decoupled classifier refinement on a stage-1 checkpoint (needs --from)")
    p.add_argument("--from", dest="from_ckpt", metavar="CKPT", help="stage-1 checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.stage2 and not args.from_ckpt:
        p.error("--stage2 needs --from STAGE1_CKPT")
    if args.from_ckpt and not args.stage2:
        p.error("--from is only used with --stage2")
    return args


def main(argv=None) -> int:
    """Exit code: 0; 1 when training stopped on a non-finite loss; 2 for a user error (config,
    data, checkpoint, a refused --resume or output_dir), reported in one line."""
    args = parse_args(argv)
    from ltdet.engine.logger import setup_console_logging

    setup_console_logging(int(os.environ.get("RANK", "0")))
    try:
        cfg = load_config(args.config, args.opts)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from ltdet.cli import USER_ERRORS, report
    from ltdet.engine.distributed import CollectiveTimeout
    from ltdet.engine.trainer import NonFiniteLossError

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
        from ltdet.evaluation.report import format_table

        print(format_table(results))
        print(f"outputs in {cfg['output_dir']}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def run(args, cfg):
    """(final metrics, trainer): build, optionally prepare stage 2, train, evaluate."""
    from ltdet.engine.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume, resume_from=args.resume_from,
                      evaluate=not args.no_eval, progress=not args.no_progress,
                      stage2=args.stage2, overwrite=args.overwrite)
    param_groups = None
    if args.stage2:
        from ltdet.engine.checkpoint import load_checkpoint
        from ltdet.engine.refine import prepare_stage2

        stage1 = load_checkpoint(args.from_ckpt)["model"]
        param_groups = prepare_stage2(trainer.model, cfg, stage1)
    return trainer.train(param_groups=param_groups), trainer


if __name__ == "__main__":
    sys.exit(main())
