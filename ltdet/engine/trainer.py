"""The training loop: iteration-based SGD over epochs, single process or DDP under `torchrun`.

    trainer = Trainer(cfg, resume=False)     # data sets, class statistics, detector
    # optional seam (stage 2): freeze / swap parts of trainer.model, choose what to optimise
    metrics = trainer.train(param_groups=None, train_sampler=None)

One iteration = one optimizer step on `data.batch_size` images per process (blended in pairs
by image-level mixup when `data.mixup.enabled`, see `ltdet.imbalance.mixup`). The loop runs
`solver.max_iter` iterations, calling `set_epoch(epoch)` on the batch sampler at each epoch start.
A checkpoint (see `checkpoint.py`) is written every `solver.checkpoint_period` iterations and at
the end; with `resume=True` training continues from the last one exactly where it stopped: same
weights, optimizer and scheduler state, GradScaler, epoch, position within the epoch and RNG
states, so N + resume N iterations equal 2N iterations.

Outputs in `output_dir`: config.yaml (resolved), log.txt, log.jsonl, TensorBoard events,
checkpoints/, and after evaluation detections.json, metrics.json, per_class_ap.csv,
ap_vs_frequency.png (intermediate evaluations under eval/iter_XXXXXXX/).
"""

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ltdet.config import dump_config
from ltdet.data import build_train_sampler, group_batches
from ltdet.frequency import FREQ_GROUPS
from ltdet.imbalance.mixup import mixup_detection
from ltdet.models import build_detector

from . import distributed as du
from .checkpoint import Checkpointer
from .loaders import (
    build_datasets,
    epoch_batches,
    locate_or_generate_data,
    make_loader,
    sample_seed,
)
from .logger import TrainLogger, setup_logging
from .nonfinite import (
    LossHistory,
    NonFiniteLossError,
    advice,
    clip_with_norm,
    global_grad_norm,
    is_healthy,
    stop_message,
)
from .run_dir import OutputDirError, open_run_dir
from .solver import build_lr_scheduler, build_optimizer, check_solver
from .train_state import gather_rank_states, restore_train_state, training_meta
from .validation import evaluate_model

__all__ = ["Trainer", "NonFiniteLossError", "OutputDirError", "seed_all"]

logger = logging.getLogger(__name__)

# `sample_seed` slot of a batch's mixup generator (sample slots are 0..batch_size-1).
_MIXUP_SLOT = 1 << 20


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets


class Trainer:
    """Builds the data sets and the detector for `cfg` (a config from `ltdet.config.load_config`).

    Keyword args:
        resume: continue from `output_dir/checkpoints/last_checkpoint` (from scratch if none).
            The config is compared with the checkpoint's first (`ltdet.engine.resume`): schedule
            keys may change and take effect from the resume iteration; a change of the model or
            the data raises `ResumeConfigError` before anything in output_dir is written.
        resume_from: continue from this checkpoint instead of the last one (implies resume).
        overwrite: a fresh run (no resume) into an output_dir that holds a previous run's
            checkpoints or log.jsonl is refused (`OutputDirError`) unless this is set; then those
            checkpoints, the pointer and log.jsonl are deleted first.
        evaluate: evaluate on the validation set every `solver.eval_period` and at the end.
        progress: show the tqdm progress bar on rank 0.
        stage2: the model is a stage-2 (refined classifier) model; recorded in the checkpoints
            so that `evaluate_checkpoint` rebuilds the refine head before loading.
    Attributes after construction: `model` (on its device, not yet wrapped in DDP),
    `train_dataset`, `val_dataset`, `stats` (ClassStats of the training set), `num_classes`,
    `paths` (resolved data paths), `info` (rank, world size, device).
    """

    #: the losses `_step` sums (None: all); set by `train(loss_keys=...)`
    _loss_keys = None

    def __init__(
        self,
        cfg: dict,
        *,
        resume: bool = False,
        evaluate: bool = True,
        progress: bool = True,
        stage2: bool = False,
        resume_from=None,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        self.resume = resume or resume_from is not None
        self.eval_enabled = evaluate
        self.progress = progress
        self.stage2 = stage2
        if self.resume and overwrite:
            raise OutputDirError(
                "--resume continues the run in output_dir and --overwrite deletes "
                "it: give one of them"
            )
        self.info = du.init_distributed(cfg["device"], timeout_s=cfg["dist_timeout"])
        self.output_dir = Path(cfg["output_dir"])
        self.checkpointer = Checkpointer(
            self.output_dir / "checkpoints", keep=cfg["solver"]["keep_checkpoints"]
        )
        # log.txt only (appended): the refusals below must leave config.yaml, log.jsonl and the
        # checkpoints as the previous run left them, but their warnings belong in the run's log.
        setup_logging(self.output_dir, self.info.rank)
        point = open_run_dir(
            cfg,
            self.output_dir,
            self.checkpointer,
            resume=self.resume,
            resume_from=resume_from,
            overwrite=overwrite,
            is_main=self.info.is_main,
        )
        self._resume_path, self._resume_ckpt = point.path, point.checkpoint
        if point.changes:
            assert point.checkpoint is not None  # the changes are against its config
            for key, (old, new) in point.changes.items():
                logger.info(
                    "--resume: %s changed from %r to %r; in effect from iteration %d",
                    key,
                    old,
                    new,
                    point.checkpoint["iteration"] + 1,
                )
        if self.info.is_main:
            dump_config(cfg, self.output_dir / "config.yaml")
        self.paths = locate_or_generate_data(cfg)
        train_dataset, self.val_dataset = build_datasets(cfg, self.paths, val=evaluate)
        assert train_dataset is not None  # build_datasets(train=True) always builds it
        self.train_dataset = train_dataset
        self.stats = self.train_dataset.stats
        self.num_classes = len(self.train_dataset.cat_ids)
        # Same initial weights on every rank and for every world size; per-rank streams after.
        seed_all(cfg["seed"])
        self.model = build_detector(cfg, self.num_classes, self.stats).to(self.info.device)
        seed_all(cfg["seed"] + self.info.rank)
        self._history = LossHistory()
        self._nonfinite_streak = 0
        # [(path, health)] this run knows of, oldest first
        self._checkpoints: list[tuple[Path, dict]] = []
        logger.info(
            "training set %s: %d images, %d classes; %d processes on %s",
            self.paths["train_json"],
            len(self.train_dataset),
            self.num_classes,
            self.info.world_size,
            self.info.device,
        )

    # -- checkpoint state -------------------------------------------------------------------
    def _meta(self) -> dict:
        return training_meta(self.train_dataset.cat_ids, self.stats, self.stage2)

    def _save(self, name, *, it, epoch, position, optimizer, scheduler, scaler) -> None:
        rank_states = gather_rank_states(
            self.model,
            it=it,
            epoch=epoch,
            position=position,
            name=name,
            advice_tail=lambda: self._advice_tail(optimizer),
        )
        health = self._history.health()
        path = self.checkpointer.folder / name
        if self.info.is_main:
            # keep_checkpoints never deletes the checkpoint the stop advice would name
            healthy = [p for p, h in self._checkpoints if is_healthy(h)]
            self.checkpointer.save(
                name,
                {
                    "model": self.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "iteration": it,
                    "rank_states": rank_states,
                    "config": self.cfg,
                    "meta": self._meta(),
                    "health": health,
                    "nonfinite_streak": self._nonfinite_streak,
                },
                protect=healthy[-1:],
            )
        self._checkpoints.append((path, health))  # on every rank: every rank prints the advice
        du.barrier("barrier after checkpoint")

    def _restore(self, optimizer, scheduler, scaler):
        """(iteration, epoch, position) from the resume checkpoint, or (0, 0, 0)."""
        path, ckpt = self._resume_path, self._resume_ckpt
        if path is None:
            logger.warning(
                "--resume: no checkpoint in %s; starting from scratch", self.checkpointer.folder
            )
            return 0, 0, 0
        self._resume_ckpt = None  # loaded once (on the CPU: RNG states must stay CPU tensors)
        health = ckpt.get("health") or {}
        self._history = LossHistory(best=health.get("best_loss", health.get("initial_loss")))
        self._nonfinite_streak = ckpt.get("nonfinite_streak", 0)
        self._checkpoints = [(path, health)]
        return restore_train_state(
            ckpt,
            path,
            model=self.model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            solver=self.cfg["solver"],
            info=self.info,
        )

    # -- evaluation -------------------------------------------------------------------------
    def run_evaluation(self, out_dir) -> dict:
        data = self.cfg["data"]
        return evaluate_model(
            self.model,
            self.val_dataset,
            label_to_cat_id=self.train_dataset.label_to_cat_id,
            val_json=self.paths["val_json"],
            train_json=self.paths["train_json"],
            out_dir=out_dir,
            device=self.info.device,
            max_dets=self.cfg["test"]["max_dets"],
            topk_per_class=self.cfg["test"].get("topk_per_class", 0),
            batch_size=data["batch_size"],
            num_workers=data["num_workers"],
            amp=self.cfg["solver"]["amp"],
        )

    # -- the loop ---------------------------------------------------------------------------
    def train(self, *, param_groups=None, train_sampler=None, until=None, loss_keys=None) -> dict:
        """Train to `solver.max_iter`; returns the final metrics ({} without evaluation and on
        ranks other than 0).

        param_groups: what the optimizer updates (tensors or param-group dicts); default every
            parameter with requires_grad. An empty list means nothing to train (e.g. stage-2
            tau-norm): the model is saved as iteration 0 and evaluated.
        train_sampler: an index sampler (`set_epoch`, `__len__`, sharded per rank) replacing
            `build_train_sampler`'s; batched the same way (aspect-ratio groups, batch size).
        until: stop after this many iterations, without the final checkpoint and evaluation;
            the schedule is still the one of `solver.max_iter` (benchmarks/demo_stability.py).
        loss_keys: sum only these losses of the model's loss dict (stage 2:
            `prepare_stage2(...).loss_keys` drops the RPN losses); default all of them.
        """
        self._loss_keys = None if loss_keys is None else tuple(loss_keys)
        cfg, solver, info = self.cfg, self.cfg["solver"], self.info
        device = info.device
        check_solver(solver)
        if param_groups is None:
            param_groups = [p for p in self.model.parameters() if p.requires_grad]
        elif len(param_groups) == 0:
            return self._evaluate_untrained()
        optimizer = build_optimizer(param_groups, solver)
        scheduler = build_lr_scheduler(optimizer, solver)
        use_amp = bool(solver["amp"]) and device.type == "cuda"
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
        if train_sampler is None:
            batch_sampler = build_train_sampler(
                cfg["data"], self.train_dataset, info.world_size, info.rank, cfg["seed"]
            )
        else:
            batch_sampler = group_batches(train_sampler, self.train_dataset, cfg["data"])
        if len(batch_sampler) == 0:
            raise ValueError(
                "the training sampler yields no batches for this process; check "
                "data.sampler and data.batch_size"
            )

        it, epoch, position = (
            self._restore(optimizer, scheduler, scaler) if self.resume else (0, 0, 0)
        )
        max_iter = solver["max_iter"]
        stop_iter = max_iter if until is None else min(int(until), max_iter)
        model = self.model
        if info.world_size > 1:
            model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        log = TrainLogger(
            self.output_dir,
            max_iter=max_iter,
            start_iter=it,
            log_period=solver["log_period"],
            enabled=info.is_main,
            progress=self.progress,
        )
        ckpt_kw = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        data = cfg["data"]
        # label -> r/c/f group index, to log how often each frequency group is sampled (the point
        # of repeat-factor / class-aware sampling is that rare classes are seen more often).
        frequency = self.stats.frequency
        assert frequency is not None  # ClassStats.__post_init__ fills it in
        group_of_label = torch.tensor(
            [0] + [FREQ_GROUPS.index(f) for f in frequency], dtype=torch.long
        )
        mixup = data["mixup"]
        try:
            model.train()
            while it < stop_iter:
                batches = epoch_batches(
                    batch_sampler, epoch, position, seed=cfg["seed"], rank=info.rank
                )
                loader = make_loader(
                    self.train_dataset,
                    batches,
                    num_workers=data["num_workers"],
                    pin_memory=device.type == "cuda",
                    seed=cfg["seed"] * 1000 + epoch,
                )
                t_start = time.perf_counter()
                for images, targets in loader:
                    t_data = time.perf_counter()
                    labels = torch.cat([t["labels"] for t in targets]).long()
                    group_counts = torch.bincount(
                        group_of_label[labels], minlength=len(FREQ_GROUPS)
                    )
                    if mixup["enabled"]:
                        # one generator per (rank, epoch, batch): resume-exact like the samples
                        g = torch.Generator().manual_seed(
                            sample_seed(cfg["seed"], info.rank, epoch, position, _MIXUP_SLOT)
                        )
                        images, targets = mixup_detection(
                            images, targets, alpha=mixup["alpha"], prob=mixup["prob"], generator=g
                        )
                    losses, lr, group_counts, grad_norm = self._step(
                        model,
                        images,
                        targets,
                        optimizer,
                        scheduler,
                        scaler,
                        it=it,
                        epoch=epoch,
                        group_counts=group_counts,
                        log=log,
                    )
                    it += 1
                    position += 1
                    now = time.perf_counter()
                    log.update(
                        it,
                        epoch=epoch,
                        lr=lr,
                        losses=losses,
                        time_s=now - t_start,
                        data_time_s=t_data - t_start,
                        device=device,
                        grad_norm=grad_norm,
                        counts={f"samples_{g}": n for g, n in zip(FREQ_GROUPS, group_counts)},
                    )
                    if it % solver["checkpoint_period"] == 0 or it == max_iter:
                        self._save(
                            f"model_{it:07d}.pth", it=it, epoch=epoch, position=position, **ckpt_kw
                        )
                    if (
                        self.eval_enabled
                        and solver["eval_period"] > 0
                        and it % solver["eval_period"] == 0
                        and it != max_iter
                    ):
                        res = self.run_evaluation(self.output_dir / "eval" / f"iter_{it:07d}")
                        log.log_eval(it, res)
                        model.train()
                    if it >= stop_iter:
                        break
                    t_start = time.perf_counter()
                else:
                    epoch, position = epoch + 1, 0
            log.close_progress()
            log.log_count_totals(it)
            results = {}
            if self.eval_enabled and it >= max_iter:
                results = self.run_evaluation(self.output_dir)
                log.log_eval(it, results)
        finally:
            log.close()
        return results

    def _step(
        self,
        model,
        images,
        targets,
        optimizer,
        scheduler,
        scaler,
        *,
        it,
        epoch,
        group_counts,
        log=None,
    ):
        """One optimizer step; returns (rank-averaged loss values incl. their sum "loss", lr,
        per-frequency-group instance counts of the batch summed over ranks, global gradient norm
        before clipping). A skipped non-finite step (`solver.skip_nonfinite`) returns None for
        the losses; see `ltdet.engine.nonfinite`."""
        device = self.info.device
        solver = self.cfg["solver"]
        images, targets = _to_device(images, targets, device)
        # A skipped step must leave no trace, but its forward already updated the BatchNorm
        # running statistics (NaN if activations overflowed): keep a copy to put back.
        buffers = (
            {k: b.detach().clone() for k, b in self.model.named_buffers()}
            if solver["skip_nonfinite"] > 0
            else None
        )
        with torch.autocast(device_type=device.type, enabled=scaler.is_enabled()):
            loss_dict = model(images, targets)
        # `train(loss_keys=...)` may restrict the summed losses (stage 2 drops the RPN losses).
        keys = self._loss_keys
        if keys is not None:
            loss_dict = {k: v for k, v in loss_dict.items() if k in keys}
        loss = sum(loss_dict.values())
        # Averaged over ranks before the check, so every rank stops together on a bad value.
        # The batch's group counts ride along in the same collective (mean * world size = sum).
        reduced = du.all_reduce_mean(
            torch.cat(
                [
                    torch.stack([v.detach().float() for v in loss_dict.values()]),
                    group_counts.to(device=device, dtype=torch.float32),
                ]
            ),
            op="all_reduce of the loss values and group counts",
        )
        values, counts = reduced[: len(loss_dict)], reduced[len(loss_dict) :]
        counts = [int(round(c)) for c in (counts * du.get_world_size()).tolist()]
        bad = [f"{k}={v:.4g}" for k, v in zip(loss_dict, values.tolist()) if not math.isfinite(v)]
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = None
        if not bad:
            # The loss check above is on rank-averaged values, so every rank takes this branch
            # together (DDP's backward is a collective).
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # no-op without AMP; clipping and the norm see true grads
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = global_grad_norm(params)
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):
                if not scaler.is_enabled():  # with AMP an overflow is GradScaler's to skip
                    bad = [f"grad_norm={grad_norm}"]
                grad_norm = None
            elif solver["clip_grad_norm"] is not None:
                clip_with_norm(params, solver["clip_grad_norm"], norm)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            self._nonfinite_streak += 1
            allowed = solver["skip_nonfinite"]
            if self._nonfinite_streak > allowed:
                raise NonFiniteLossError(
                    stop_message(
                        it=it + 1,
                        epoch=epoch,
                        terms=bad,
                        lr=lr,
                        base_lr=solver["lr"],
                        clip=solver["clip_grad_norm"],
                        streak=self._nonfinite_streak,
                        allowed=allowed,
                        checkpoints=self._checkpoints,
                        config=self.output_dir / "config.yaml",
                    )
                )
            logger.warning(
                "iteration %d: skipped a non-finite step (%s); %d in a row, "
                "solver.skip_nonfinite=%d",
                it + 1,
                ", ".join(bad),
                self._nonfinite_streak,
                allowed,
            )
            if log is not None:
                log.log_skipped(it + 1, bad)
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(buffers[name])
            scheduler.step()  # as GradScaler: the schedule advances over a skipped step
            return None, lr, counts, None
        self._nonfinite_streak = 0
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses = dict(zip(loss_dict, values.tolist()))
        losses["loss"] = float(values.sum())
        self._history.add(losses["loss"])
        return losses, lr, counts, grad_norm

    def _evaluate_untrained(self) -> dict:
        logger.info("nothing to train (empty param_groups): saving and evaluating the model")
        if self.info.is_main:
            self.checkpointer.save(
                "model_0000000.pth",
                {
                    "model": self.model.state_dict(),
                    "iteration": 0,
                    "config": self.cfg,
                    "meta": self._meta(),
                },
            )
        du.barrier()
        return self.run_evaluation(self.output_dir) if self.eval_enabled else {}

    def _advice_tail(self, optimizer) -> str:
        solver = self.cfg["solver"]
        return (
            advice(
                lr=optimizer.param_groups[0]["lr"],
                base_lr=solver["lr"],
                clip=solver["clip_grad_norm"],
                checkpoints=self._checkpoints,
                config=self.output_dir / "config.yaml",
            )
            + "."
        )
