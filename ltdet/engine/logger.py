"""Run logging: console/file logging setup, JSON lines, TensorBoard and the progress bar.

Only the main process writes; other ranks get a `TrainLogger(enabled=False)` whose methods do
nothing, so the training loop calls them unconditionally.

log.jsonl: one JSON object per line. Training lines (every `log_period` iterations) hold
`iter` (optimizer steps done), `epoch`, `lr`, each loss term and `loss` (their sum, averaged over
the last `log_period` iterations and over ranks), `loss_max` (the window's largest `loss`),
`grad_norm` and `grad_norm_max` (mean and max of the global gradient norm before clipping),
`time` and `data_time` (seconds per iteration, same window), `eta_seconds`, `memory_mb` (peak
CUDA memory, or peak process RSS on CPU). A window whose steps were all skipped (non-finite, see
`solver.skip_nonfinite`) has no loss keys. Evaluation lines hold `iter` and `eval` (the metrics
dict); `{"iter", "skipped", "nonfinite"}` lines record each skipped step.
"""

import json
import logging
import math
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

import torch

if TYPE_CHECKING:  # a heavy import, done at run time only by the main process (see __init__)
    from torch.utils.tensorboard import SummaryWriter

_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"


def setup_console_logging(rank: int = 0) -> None:
    """For command-line tools: one stderr handler on the root logger (INFO on rank 0, WARNING on
    the others). Installed before anything else configures logging (the `lvis` package calls
    `logging.basicConfig` when imported; this pre-empts it), so every line prints once."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=_FORMAT,
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # lvis logs every json load at INFO ("Loading annotations", "Creating index", ...)
    logging.getLogger("lvis").setLevel(logging.WARNING)


class _RunFileHandler(logging.FileHandler):
    """The log.txt handler of `setup_logging`; `_ltdet` marks it for removal by the next call."""

    _ltdet = True


def setup_logging(output_dir=None, rank: int = 0) -> None:
    """Send ltdet's records to `output_dir/log.txt` on rank 0; ltdet logs INFO on rank 0 and
    WARNING elsewhere. Console output is the application's choice (`setup_console_logging`);
    records propagate to the root logger as usual."""
    root = logging.getLogger("ltdet")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for h in list(root.handlers):
        if getattr(h, "_ltdet", False):
            root.removeHandler(h)
            h.close()
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handler = _RunFileHandler(Path(output_dir) / "log.txt")
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _truncate_jsonl(path: Path, start_iter: int) -> None:
    """On resume, drop lines of iterations after the checkpoint: they are about to be redone."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by the crash that preceded this resume
            continue
        if rec.get("iter", 0) <= start_iter:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        path.write_text("".join(keep), encoding="utf-8")


class TrainLogger:
    """Collects per-iteration losses and timings; writes log.jsonl, TensorBoard and the bar."""

    # None until __init__ opens them (main process only)
    _writer: Optional["SummaryWriter"]
    _jsonl: Optional[TextIO]

    def __init__(
        self,
        output_dir,
        *,
        max_iter: int,
        start_iter: int,
        log_period: int,
        enabled: bool = True,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.max_iter = max_iter
        self.log_period = max(int(log_period), 1)
        self._window: defaultdict[str, list[float]] = defaultdict(list)
        self._counts: defaultdict[str, int] = defaultdict(int)
        self.count_totals: defaultdict[str, int] = defaultdict(int)
        self._start_time = time.perf_counter()
        self._start_iter = start_iter
        self._bar = None
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _truncate_jsonl(out / "log.jsonl", start_iter)
        self._jsonl = open(out / "log.jsonl", "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # heavy import: main process only

        self._writer = SummaryWriter(log_dir=str(out), purge_step=start_iter or None)
        if progress:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self._bar = tqdm(
                total=max_iter,
                initial=start_iter,
                desc="train",
                unit="it",
                dynamic_ncols=True,
                mininterval=1.0 if tty else 30.0,
                file=sys.stderr,
            )

    def update(
        self,
        it: int,
        *,
        epoch: int,
        lr: float,
        losses: dict | None,
        time_s: float,
        data_time_s: float,
        device: torch.device,
        counts: dict | None = None,
        grad_norm: float | None = None,
    ) -> None:
        """Record iteration `it` (steps done so far, 1-based); write a line every log_period.

        losses are averaged over the log window; `counts` (e.g. sampled instances per frequency
        group) are summed over it, and totalled over the run for `summary()`. `losses=None`
        marks a skipped step (it counts for time and counts, not for the loss averages);
        `grad_norm` None (AMP's scaler found an overflow) is left out of the gradient averages.
        """
        if not self.enabled:
            return
        jsonl, writer = self._outputs()
        for k, v in (losses or {}).items():
            self._window[k].append(v)
        if grad_norm is not None and math.isfinite(grad_norm):
            self._window["grad_norm"].append(grad_norm)
        for k, v in (counts or {}).items():
            self._counts[k] += v
            self.count_totals[k] += v
        self._window["time"].append(time_s)
        self._window["data_time"].append(data_time_s)
        if self._bar is not None:
            self._bar.update(1)
        if it % self.log_period and it != self.max_iter:
            return
        avg = {k: sum(v) / len(v) for k, v in self._window.items()}
        peak = {
            f"{k}_max": max(self._window[k]) for k in ("loss", "grad_norm") if self._window.get(k)
        }
        loss_keys = [k for k in self._window if k not in ("time", "data_time", "grad_norm")]
        self._window.clear()
        done = it - self._start_iter
        per_iter = (time.perf_counter() - self._start_time) / max(done, 1)
        eta = per_iter * (self.max_iter - it)
        record = {"iter": it, "epoch": epoch, "lr": lr}
        record.update({k: avg[k] for k in loss_keys})
        if "grad_norm" in avg:
            record["grad_norm"] = avg["grad_norm"]
        record.update(peak)
        record.update(self._counts)
        self._counts.clear()
        record.update(
            time=avg["time"],
            data_time=avg["data_time"],
            eta_seconds=eta,
            memory_mb=peak_memory_mb(device),
        )
        jsonl.write(json.dumps(record) + "\n")
        jsonl.flush()
        for k, v in record.items():
            if k not in ("iter", "epoch"):
                writer.add_scalar(f"train/{k}", v, it)
        if self._bar is not None:
            shown = {k: f"{avg[k]:.3f}" for k in loss_keys if k == "loss" or len(loss_keys) <= 4}
            shown["lr"] = f"{lr:.2e}"
            self._bar.set_postfix(shown, refresh=False)
        logging.getLogger("ltdet.engine").debug("iter %d %s eta %s", it, record, format_eta(eta))

    def log_skipped(self, it: int, terms: list) -> None:
        """One log.jsonl line for a step skipped because `terms` were non-finite."""
        if not self.enabled:
            return
        jsonl, writer = self._outputs()
        jsonl.write(json.dumps({"iter": it, "skipped": True, "nonfinite": list(terms)}) + "\n")
        jsonl.flush()

    def log_eval(self, it: int, metrics: dict) -> None:
        if not self.enabled:
            return
        jsonl, writer = self._outputs()
        scalars = _flat_scalars(metrics)
        jsonl.write(json.dumps({"iter": it, "eval": scalars}) + "\n")
        jsonl.flush()
        for k, v in scalars.items():
            writer.add_scalar(f"eval/{k}", v, it)

    def log_count_totals(self, it: int) -> None:
        """One log.jsonl line with the counts summed since this process started training (since
        the resumed iteration after --resume), and the same on the console."""
        if not self.enabled or not self.count_totals:
            return
        jsonl, writer = self._outputs()
        totals = dict(self.count_totals)
        jsonl.write(
            json.dumps({"iter": it, "since_iter": self._start_iter, "count_totals": totals}) + "\n"
        )
        jsonl.flush()
        logging.getLogger("ltdet.engine").info(
            "sampled instances per frequency group, iterations %d-%d: %s",
            self._start_iter + 1,
            it,
            ", ".join(f"{k}={v}" for k, v in totals.items()),
        )

    def _outputs(self) -> tuple[TextIO, "SummaryWriter"]:
        """log.jsonl and the TensorBoard writer, which `__init__` opens whenever enabled."""
        assert self._jsonl is not None and self._writer is not None
        return self._jsonl, self._writer

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_progress()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _flat_scalars(metrics: dict, prefix: str = "") -> dict:
    """The numbers of an evaluation result; nested results (a mask model's "segm", Fixed AP's
    "fixed": {iou type: result}) as "segm/AP", "fixed/bbox/AP"."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = v
    return out
