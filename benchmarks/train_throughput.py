"""Images per second of ltdet's `Trainer` against torchvision's reference training loop, on the
same model, data, batch and threads, alternating in one process; and where the time goes.

    python benchmarks/train_throughput.py                       # demo model, 2 threads, CPU
    python benchmarks/train_throughput.py --blocks 4 --iters 20 --threads 2
    python benchmarks/train_throughput.py --quick               # a tiny smoke run (< 60 s on CPU)
    python benchmarks/train_throughput.py --device cuda --amp --size 800 \
        --reference-losses torchvision --json runs/throughput.json   # benchmarks/device_check.sh

The two loops.
* "ltdet": `ltdet.engine.Trainer(cfg).train(until=...)` on the demo config
  (`configs/synthetic/faster_rcnn_r18_fpn.yaml`, CE and smooth L1 losses), unchanged except that
  no checkpoint is written while it is measured (`solver.checkpoint_period`) and no evaluation.
* "torchvision": the logic of torchvision's `references/detection/engine.py` `train_one_epoch`
  and of its `train.py` around it, written out here: loss = sum of the loss dict, the loss
  value checked for finiteness (`.item()`), `optimizer.zero_grad()`, backward, step (through a
  GradScaler with `--amp`), the linear warm-up `LinearLR` of epoch 0 stepped every iteration, a
  `MultiStepLR` stepped every epoch, and a MetricLogger that `.item()`s every loss, times data
  and iterations and prints a line every `print_freq` (here: `solver.log_period`, into a log
  file). SGD with the config's lr, momentum and weight decay, over the parameters with
  `requires_grad`. Its model is a deep copy of the trainer's model taken before training (same
  weights, ltdet's CE losses), or with `--reference-losses torchvision` the same copy with
  torchvision's own `RoIHeads` (torchvision's `fastrcnn_loss` and sampler) put back. Its data:
  the trainer's training set (ltdet's data set and transforms) through a plain `DataLoader` with
  ltdet's batch sampler (`build_train_sampler`, aspect-ratio grouping) and `collate_detection`,
  `data.num_workers` workers, as torchvision's `train.py` builds it.

Alternation. Both loops run in one process under the same `torch.set_num_threads`: the trainer
trains one continuous run, and a forward pre-hook on its model runs the reference loop's blocks
in between. After `--warmup` iterations of each loop, blocks of `--iters` iterations alternate
(ltdet, torchvision, ltdet, ...) `--blocks` times, so drifting machine load hits both alike. A
block's wall time spans exactly `--iters` iterations of its loop. The ratio is
mean images/s (ltdet) / mean images/s (torchvision); the per-pair ratios show its spread.

Phases (ms per iteration, measured from outside the trainer; with CUDA each boundary
synchronises, `--no-sync` turns that off):
  data        the wait for the next batch: ltdet's own `data_time` (log.jsonl windows inside
              the measured blocks), the reference loop's MetricLogger `data_time`
  forward     model forward pre-hook to forward hook
  loss check  forward end to `backward()`: loss sum, reduction, finiteness check, zero_grad
  backward    the `Tensor.backward` call (wrapped for this process)
  grad        backward end to `optimizer.step`: GradScaler unscale, gradient norm, clipping
  step        `optimizer.step` (torch's global optimizer step hooks)
  logging     ltdet: `TrainLogger.update`; torchvision: MetricLogger updates and printing
  other       the rest of the block's wall time: moving the batch to the device, batch
              statistics, GradScaler update, lr schedulers, the loop itself
"""

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict, deque
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.data import DataLoader
from torchvision.models.detection.roi_heads import RoIHeads

from ltdet.config import load_config
from ltdet.data import build_train_sampler, collate_detection, make_synthetic_lvis
from ltdet.engine import Trainer, TrainLogger

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/synthetic/faster_rcnn_r18_fpn.yaml"
LOOPS = ("ltdet", "torchvision")
PHASES = {
    "data": "data (wait for the batch)",
    "forward": "forward",
    "loss_check": "loss sum / finite check / zero_grad",
    "backward": "backward",
    "grad": "unscale / grad norm / clip",
    "step": "optimiser step",
    "logging": "logging",
    "other": "other bookkeeping (to device, counts, schedulers, loop)",
}
# The modules ltdet's RoI heads add to torchvision's (losses, RoI sampler, LDS / FDS hooks).
LTDET_HEAD_MODULES = ("cls_loss", "box_loss", "sampler", "lds", "fds")


# ------------------------------------------------------------------------------------------------
# Timing from outside the loops.


class Recorder:
    """Phase sums and block times of one loop."""

    def __init__(self, name: str, clock: "PhaseClock"):
        self.name, self.clock = name, clock
        self.sums = defaultdict(float)
        self.blocks = []  # dicts: wall, cpu, iters, peak_mb, start_mb
        self.measuring = False
        self.t_fwd0 = self.t_fwd1 = self.t_bwd1 = self.t_step0 = 0.0
        self._block = None

    def add(self, phase: str, seconds: float) -> None:
        if self.measuring:
            self.sums[phase] += seconds

    def start_block(self) -> None:
        cuda = self.clock.device.type == "cuda"
        self.clock.sync_now()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.clock.device)
        start_mb = torch.cuda.memory_allocated(self.clock.device) / 2**20 if cuda else None
        self._block = dict(t=time.perf_counter(), cpu=time.process_time(), start_mb=start_mb)
        self.measuring = True

    def end_block(self, iters: int) -> None:
        self.clock.sync_now()
        wall = time.perf_counter() - self._block["t"]
        cpu = time.process_time() - self._block["cpu"]
        cuda = self.clock.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.clock.device) / 2**20 if cuda else None
        self.blocks.append(
            dict(wall=wall, cpu=cpu, iters=iters, peak_mb=peak, start_mb=self._block["start_mb"])
        )
        self.measuring = False


class PhaseClock:
    """Timestamps at the phase boundaries of whichever loop is running (`current`)."""

    def __init__(self, device: torch.device, sync: bool):
        self.device = device
        self.sync = sync and device.type == "cuda"
        self.loops = {name: Recorder(name, self) for name in LOOPS}
        self.current = self.loops["ltdet"]

    def sync_now(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # hooks ---------------------------------------------------------------------------------
    def forward_start(self, rec: Recorder) -> None:
        rec.t_fwd0 = self.now()

    def forward_end(self, rec: Recorder) -> None:
        rec.t_fwd1 = self.now()
        rec.add("forward", rec.t_fwd1 - rec.t_fwd0)

    def step_pre(self, optimizer, args, kwargs) -> None:
        rec = self.current
        rec.t_step0 = self.now()
        rec.add("grad", rec.t_step0 - rec.t_bwd1)

    def step_post(self, optimizer, args, kwargs) -> None:
        rec = self.current
        rec.add("step", self.now() - rec.t_step0)

    @contextmanager
    def installed(self, models: dict):
        """Forward hooks on each loop's model, the optimizer step hooks, and `Tensor.backward`
        and `TrainLogger.update` wrapped, for the duration of the block."""
        handles = []
        for name, model in models.items():
            rec = self.loops[name]
            handles.append(
                model.register_forward_pre_hook(
                    lambda module, args, rec=rec: self.forward_start(rec)
                )
            )
            handles.append(
                model.register_forward_hook(
                    lambda module, args, out, rec=rec: self.forward_end(rec)
                )
            )
        handles.append(register_optimizer_step_pre_hook(self.step_pre))
        handles.append(register_optimizer_step_post_hook(self.step_post))
        backward, update = torch.Tensor.backward, TrainLogger.update
        clock = self

        def timed_backward(tensor, *args, **kwargs):
            rec = clock.current
            t0 = clock.now()
            rec.add("loss_check", t0 - rec.t_fwd1)
            try:
                return backward(tensor, *args, **kwargs)
            finally:
                rec.t_bwd1 = clock.now()
                rec.add("backward", rec.t_bwd1 - t0)

        def timed_update(logger, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return update(logger, *args, **kwargs)
            finally:
                clock.loops["ltdet"].add("logging", time.perf_counter() - t0)

        torch.Tensor.backward = timed_backward
        TrainLogger.update = timed_update
        try:
            yield
        finally:
            torch.Tensor.backward, TrainLogger.update = backward, update
            for h in handles:
                h.remove()


# ------------------------------------------------------------------------------------------------
# torchvision's reference loop (references/detection/engine.py, utils.py), re-written.


class SmoothedValue:
    """A window of values with its median / mean, and the running total (utils.SmoothedValue)."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median,
            avg=self.avg,
            global_avg=self.global_avg,
            max=max(self.deque),
            value=self.deque[-1],
        )


class MetricLogger:
    """utils.MetricLogger: meters updated from tensors (`.item()`), a log line every
    `print_freq` iterations with the iteration and data times and (CUDA) the peak memory.
    `on_data(seconds)` and `on_logging(seconds)` report to the benchmark's recorder."""

    def __init__(self, file, on_data, on_logging, delimiter: str = "  "):
        self.meters = defaultdict(SmoothedValue)
        self.file, self.delimiter = file, delimiter
        self.on_data, self.on_logging = on_data, on_logging

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **kwargs) -> None:
        t0 = time.perf_counter()
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(v)
        self.on_logging(time.perf_counter() - t0)

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = ""):
        start = end = time.perf_counter()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        n = len(iterable)
        for i, obj in enumerate(iterable):
            data_time.update(time.perf_counter() - end)
            self.on_data(data_time.deque[-1])
            yield obj
            t0 = time.perf_counter()
            iter_time.update(t0 - end)
            if i % print_freq == 0 or i == n - 1:
                eta = iter_time.global_avg * (n - i)
                memory = (
                    f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}"
                    if torch.cuda.is_available()
                    else ""
                )
                print(
                    f"{header} [{i}/{n}]  eta: {eta:.0f} s  {self}  time: {iter_time}  "
                    f"data: {data_time}{memory}",
                    file=self.file,
                )
            self.on_logging(time.perf_counter() - t0)
            end = time.perf_counter()
        print(f"{header} Total time: {time.perf_counter() - start:.1f} s", file=self.file)


def train_one_epoch(model, optimizer, data_loader, device, epoch, print_freq, scaler, logger):
    """torchvision's `train_one_epoch`, as a generator: it yields after every iteration so that
    the benchmark can pause it between blocks."""
    model.train()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    lr_scheduler = None
    if epoch == 0:
        lr_scheduler = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0 / 1000, total_iters=min(1000, len(data_loader) - 1)
        )
    for images, targets in logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]"):
        images = list(image.to(device) for image in images)
        targets = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in targets
        ]
        with torch.autocast(device.type, enabled=scaler is not None):
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        # one process: torchvision's reduce_dict returns the dict as it is
        loss_dict_reduced = loss_dict
        losses_reduced = sum(loss for loss in loss_dict_reduced.values())
        loss_value = losses_reduced.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"reference loop: loss is {loss_value}, stopping training "
                f"({ {k: float(v) for k, v in loss_dict_reduced.items()} })"
            )
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses.backward()
            optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        logger.update(loss=losses_reduced, **loss_dict_reduced)
        logger.update(lr=optimizer.param_groups[0]["lr"])
        yield


def reference_iterations(model, dataset, cfg, device, *, amp, log_file, rec):
    """An endless stream of reference-loop iterations (epoch after epoch, as train.py runs
    `train_one_epoch`): each `next()` runs one."""
    solver, data = cfg["solver"], cfg["data"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=solver["lr"], momentum=solver["momentum"], weight_decay=solver["weight_decay"]
    )
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10**6], gamma=0.1)
    scaler = torch.amp.GradScaler(device.type) if amp and device.type == "cuda" else None
    batch_sampler = build_train_sampler(data, dataset, 1, 0, cfg["seed"])
    loader = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=data["num_workers"],
        collate_fn=collate_detection,
        pin_memory=device.type == "cuda",
    )
    epoch = 0
    while True:
        batch_sampler.set_epoch(epoch)
        logger = MetricLogger(
            log_file,
            on_data=lambda s: rec.add("data", s),
            on_logging=lambda s: rec.add("logging", s),
        )
        yield from train_one_epoch(
            model, optimizer, loader, device, epoch, solver["log_period"], scaler, logger
        )
        lr_scheduler.step()
        epoch += 1


def with_torchvision_losses(model: nn.Module) -> nn.Module:
    """`model` (built by ltdet) with torchvision's own `RoIHeads` put back, sharing every
    submodule: torchvision's box losses (`fastrcnn_loss`) and RoI sampler instead of ltdet's."""
    ours = model.roi_heads
    head = RoIHeads.__new__(RoIHeads)
    nn.Module.__init__(head)
    head.__dict__.update(
        {k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in vars(ours).items()}
    )
    for name in LTDET_HEAD_MODULES:
        head._modules.pop(name, None)
        head.__dict__.pop(name, None)
    model.roi_heads = head
    return model


# ------------------------------------------------------------------------------------------------
# The run.


def build_config(args, out: Path) -> dict:
    opts = [
        f"output_dir={out / 'ltdet_run'}",
        f"device={args.device}",
        f"solver.amp={str(args.amp).lower()}",
        "solver.checkpoint_period=1000000000",
    ]
    if args.quick:
        # a tiny generated set of small images: the smoke run needs no bundled data
        paths = make_synthetic_lvis(
            out / "tiny_set",
            seed=0,
            num_train=48,
            num_val=8,
            num_classes=8,
            max_images_per_class=40,
            val_instances_per_class=2,
            image_size=args.size,
        )
        opts += [
            f"data.train.json={paths['train_json']}",
            f"data.train.images={paths['image_root']}",
        ]
    if args.size is not None:
        opts += [
            f"data.min_size=[{args.size}]",
            f"data.max_size={max(args.size, round(args.size * 1333 / 800))}",
        ]
    if args.batch is not None:
        opts.append(f"data.batch_size={args.batch}")
    if args.workers is not None:
        opts.append(f"data.num_workers={args.workers}")
    if args.log_period is not None:
        opts.append(f"solver.log_period={args.log_period}")
    cfg = load_config(args.config, opts + list(args.opts))
    total = 2 * args.warmup + args.blocks * args.iters + 1
    cfg["solver"]["max_iter"] = max(cfg["solver"]["max_iter"], total + 1)
    return cfg


def ltdet_data_ms(log_jsonl: Path, first: int, last: int, period: int):
    """Mean `data_time` (ms) of the trainer's log windows inside iterations (first, last]."""
    if not log_jsonl.is_file():
        return None
    values = []
    for line in log_jsonl.read_text().splitlines():
        rec = json.loads(line)
        if "data_time" in rec and rec["iter"] - period >= first and rec["iter"] <= last:
            values.append(rec["data_time"])
    return 1000 * statistics.mean(values) if values else None


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="train_throughput_"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = build_config(args, out)
    W, N, B = args.warmup, args.iters, args.blocks
    trainer = Trainer(cfg, evaluate=False, progress=False, overwrite=True)
    device = trainer.info.device
    # Copied before any hook is registered: deepcopy would copy the hooks too.
    ref_model = copy.deepcopy(trainer.model)
    if args.reference_losses == "torchvision":
        ref_model = with_torchvision_losses(ref_model)
    clock = PhaseClock(device, sync=not args.no_sync)
    lt, tv = clock.loops["ltdet"], clock.loops["torchvision"]
    batch = cfg["data"]["batch_size"]
    log_file = open(out / "reference_log.txt", "w", encoding="utf-8")
    ref = reference_iterations(
        ref_model, trainer.train_dataset, cfg, device, amp=args.amp, log_file=log_file, rec=tv
    )
    state = {"it": 0, "block": 0}

    def run_reference(iters: int, measured: bool) -> None:
        clock.current = tv
        if measured:
            tv.start_block()
        for _ in range(iters):
            next(ref)
        if measured:
            tv.end_block(iters)
        clock.current = lt

    def between_iterations(module, args_):
        # ltdet's iteration state["it"] + 1 is about to run its forward
        it = state["it"] = state["it"] + 1
        if it == W + 1:
            run_reference(W, measured=False)  # the reference loop's warm-up
            lt.start_block()
        elif it > W + 1 and (it - W - 1) % N == 0 and state["block"] < B:
            lt.end_block(N)
            run_reference(N, measured=True)
            state["block"] += 1
            if state["block"] < B:
                lt.start_block()
            print(
                f"  block {state['block']}/{B}: ltdet {N * batch / lt.blocks[-1]['wall']:.2f}, "
                f"torchvision {N * batch / tv.blocks[-1]['wall']:.2f} images/s",
                flush=True,
            )

    t_start = time.perf_counter()
    with ExitStack() as stack:
        # registered first: it runs before the timing pre-hook, so that the reference blocks
        # it runs fall outside the timed forward of this iteration
        handle = trainer.model.register_forward_pre_hook(between_iterations)
        stack.callback(handle.remove)
        stack.enter_context(clock.installed({"ltdet": trainer.model, "torchvision": ref_model}))
        trainer.train(until=W + B * N + 1)
    wall_total = time.perf_counter() - t_start
    ref.close()  # ends the reference loop's epoch: its loader workers exit
    log_file.close()
    if len(tv.blocks) < B:
        raise RuntimeError(f"only {len(tv.blocks)} of {B} blocks ran: the trainer stopped early")

    data_ms = ltdet_data_ms(
        Path(cfg["output_dir"]) / "log.jsonl", W, W + B * N, cfg["solver"]["log_period"]
    )
    result = {
        "config": args.config,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "min_size": cfg["data"]["min_size"],
        "max_size": cfg["data"]["max_size"],
        "amp": bool(args.amp and device.type == "cuda"),
        "workers": cfg["data"]["num_workers"],
        "warmup": W,
        "iters": N,
        "blocks": B,
        "reference_losses": args.reference_losses,
        "sync": clock.sync,
        "torch": torch.__version__,
        "wall_total_s": wall_total,
        "loops": {},
    }
    for rec in (lt, tv):
        iters = sum(b["iters"] for b in rec.blocks)
        wall = sum(b["wall"] for b in rec.blocks)
        sums = dict(rec.sums)
        if rec is lt:
            sums["data"] = None if data_ms is None else data_ms / 1000 * iters
        ms = {
            k: (None if sums.get(k) is None else 1000 * sums[k] / iters)
            for k in PHASES
            if k != "other"
        }
        ms["other"] = 1000 * wall / iters - sum(v for v in ms.values() if v is not None)
        peaks = [b["peak_mb"] for b in rec.blocks if b["peak_mb"] is not None]
        result["loops"][rec.name] = {
            "images_per_s": statistics.mean(N * batch / b["wall"] for b in rec.blocks),
            "block_images_per_s": [b["iters"] * batch / b["wall"] for b in rec.blocks],
            "ms_per_iter": 1000 * wall / iters,
            "wall_s": wall,
            "cpu_s": sum(b["cpu"] for b in rec.blocks),
            "peak_mb": max(peaks) if peaks else None,
            "peak_above_start_mb": (
                max(b["peak_mb"] - b["start_mb"] for b in rec.blocks) if peaks else None
            ),
            "phases_ms": ms,
        }
    a, b = result["loops"]["ltdet"], result["loops"]["torchvision"]
    pairs = [x / y for x, y in zip(a["block_images_per_s"], b["block_images_per_s"])]
    result["ratio"] = a["images_per_s"] / b["images_per_s"]
    result["pair_ratios"] = pairs
    if args.out is None and not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    loops = result["loops"]
    own = " (torchvision losses)" if result["reference_losses"] == "torchvision" else ""
    names = {"ltdet": "ltdet Trainer", "torchvision": "torchvision reference loop" + own}
    lines = [
        f"train throughput: {result['config']}, device {result['device']}, "
        f"{result['threads']} threads, batch {result['batch']}, images "
        f"{result['min_size']}/{result['max_size']} px, AMP {'on' if result['amp'] else 'off'}, "
        f"{result['workers']} loader workers; {result['warmup']} warm-up iterations per loop, then "
        f"{result['blocks']} alternating blocks x {result['iters']} iterations per loop; "
        f"torch {result['torch']}; whole run {result['wall_total_s']:.0f} s",
        "",
        "| loop | images/s | per block | ms/iter | wall s | main-process CPU s | peak CUDA MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in LOOPS:
        r = loops[key]
        lines.append(
            f"| {names[key]} | {r['images_per_s']:.2f} | "
            f"{min(r['block_images_per_s']):.2f}-{max(r['block_images_per_s']):.2f} | "
            f"{r['ms_per_iter']:.0f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{_fmt(r['peak_mb'], '.0f')} |"
        )
    pairs = result["pair_ratios"]
    lines += [
        "",
        f"ratio ltdet / torchvision: **{result['ratio']:.3f}** (goal >= 0.95); per "
        f"block pair: median {statistics.median(pairs):.3f}, "
        f"min {min(pairs):.3f}, max {max(pairs):.3f}",
        "",
        "| phase, ms per iteration | ltdet | torchvision | ltdet - torchvision |",
        "|---|---|---|---|",
    ]
    a, b = loops["ltdet"]["phases_ms"], loops["torchvision"]["phases_ms"]
    for key, label in PHASES.items():
        diff = None if a[key] is None or b[key] is None else a[key] - b[key]
        lines.append(f"| {label} | {_fmt(a[key])} | {_fmt(b[key])} | {_fmt(diff, '+.1f')} |")
    ta, tb = loops["ltdet"]["ms_per_iter"], loops["torchvision"]["ms_per_iter"]
    lines.append(f"| total | {ta:.1f} | {tb:.1f} | {ta - tb:+.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--iters", type=int, default=20, help="iterations per block (default 20)")
    p.add_argument("--blocks", type=int, default=4, help="blocks per loop (default 4)")
    p.add_argument(
        "--warmup", type=int, default=20, help="untimed iterations per loop first (default 20)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch", type=int, default=None, help="default: the config's")
    p.add_argument(
        "--workers", type=int, default=None, help="data loader workers; default: the config's"
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="training image size (data.min_size; max_size scaled as 800/1333)",
    )
    p.add_argument(
        "--log-period",
        type=int,
        default=None,
        help="solver.log_period, also the reference's print_freq; default: config's",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument(
        "--reference-losses",
        choices=("ltdet", "torchvision"),
        default="ltdet",
        help="losses of the reference loop's model: ltdet's CE (same model, "
        "default) or torchvision's own RoIHeads",
    )
    p.add_argument(
        "--no-sync", action="store_true", help="CUDA: no synchronisation at phase boundaries"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: 2 + 2 x 3 iterations per loop, batch 2 of 64 px images "
        "of a 48-image generated set",
    )
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.blocks, args.warmup = 3, 2, 2
        args.size = args.size or 64
        args.batch = args.batch or 2
        args.log_period = args.log_period or args.iters
    for key in ("iters", "blocks", "warmup", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)  # the config's relative paths (the bundled data set) are the repository's
    result = run(args)
    print(markdown(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
