"""Throughput and metrics: the numbers in each log line, RUN_DIR/metrics.jsonl, summary.json and curves.png.

Throughput is measured over windows of `log_every` steps that end at a host sync (reading the loss), so the
wall time of a window covers the device work of its steps: images/s computed from it is real, not the rate at
which the host enqueued kernels. Windows that end inside the first `throughput_warmup_steps` steps after a
start or a resize (torch.compile, cudnn.benchmark autotuning, DALI prefetch fill) are left out of averages.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from shards.process import atomic_write


@dataclass
class Window:
    """One log window as every rank measured it (host clock, seconds)."""

    steps: int
    images: int  # images this process trained on in the window
    wall_s: float  # seconds from the previous log sync to this one
    data_wait_s: float  # seconds spent blocked in next(loader) during the window


class ThroughputMeter:
    """Accumulates log windows; averages skip the warm-up steps."""

    def __init__(self, *, world_size: int, warmup_steps: int) -> None:
        self.world_size = world_size
        self.warmup_steps = warmup_steps
        self.steps_since_reset = 0
        self.counted = Window(0, 0, 0.0, 0.0)

    def reset_warmup(self) -> None:
        """Call after anything that re-tunes kernels or refills queues (start, resume, resize)."""
        self.steps_since_reset = 0

    def add(self, window: Window) -> None:
        """Count `window` only if it started after the warm-up (a fresh process starts in warm-up)."""
        started_at = self.steps_since_reset
        self.steps_since_reset += window.steps
        if started_at >= self.warmup_steps:
            c = self.counted
            self.counted = Window(c.steps + window.steps, c.images + window.images,
                                  c.wall_s + window.wall_s, c.data_wait_s + window.data_wait_s)

    @property
    def images_per_sec_per_gpu(self) -> float | None:
        c = self.counted
        return c.images / c.wall_s if c.wall_s > 0 else None

    @property
    def images_per_sec(self) -> float | None:
        per_gpu = self.images_per_sec_per_gpu
        return per_gpu * self.world_size if per_gpu is not None else None

    @property
    def data_wait_share(self) -> float | None:
        c = self.counted
        return c.data_wait_s / c.wall_s if c.wall_s > 0 else None


class MetricsLog:
    """RUN_DIR/metrics.jsonl, one JSON object per log step and per evaluation (rank 0 only), plus TensorBoard
    scalars when `tensorboard` is installed (it is optional: nothing else depends on it). Nothing is created
    before the first record, so a run that fails at start leaves no RUN_DIR behind."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool) -> None:
        self.enabled = enabled
        self.records: list[dict] = []
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tensorboard = None
        self._opened = False

    def _open(self) -> None:
        self._opened = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:  # tensorboard is not a dependency
            self.tensorboard = None

    def drop_after(self, step: int, *, eval_owed: bool = False) -> int:
        """Remove the records of steps after `step` (a resume from a checkpoint at `step` logs them again: a
        kill -9 after a log step left them behind), and with `eval_owed` the evaluation records at `step` too (the
        checkpoint says its evaluation is owed: a kill between the eval record and the checkpoint that marks it
        done left one, and the resumed run evaluates again); returns how many went."""
        if not self.enabled:
            return 0
        return drop_records_after(self.path, step, kind_at_step="eval" if eval_owed else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if not self._opened:
            self._open()
        record = {"time": time.time(), **record}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


class SampleKeyLog:
    """RUN_DIR/sample_keys/rank-NNN.jsonl (`--log-sample-keys`): the sample keys of every micro-batch this rank
    trained on, one JSON object each ({"epoch", "step", "micro", "keys"}), so which samples made each global
    batch can be checked afterwards, on any number of processes. Each rank writes its own file."""

    FOLDER = "sample_keys"

    def __init__(self, run_dir: str | os.PathLike, *, rank: int) -> None:
        self.path = Path(run_dir) / self.FOLDER / f"rank-{rank:03d}.jsonl"
        self._file = None

    def write(self, *, epoch: int, step: int, micro: int, keys: list[str]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed by close()
        self._file.write(json.dumps({"epoch": epoch, "step": step, "micro": micro, "keys": list(keys)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def drop_after(cls, run_dir: str | os.PathLike, step: int) -> int:
        """Remove every rank's records of steps after `step` (a resume from there trains them again); returns how
        many went."""
        folder = Path(run_dir) / cls.FOLDER
        return sum(drop_records_after(path, step) for path in sorted(folder.glob("rank-*.jsonl")))


def drop_records_after(path: str | os.PathLike, step: int, *, kind_at_step: str | None = None) -> int:
    """Remove the JSON-lines records of `path` whose "step" is above `step`, and those of kind `kind_at_step` at
    `step`, atomically; returns how many."""
    path = Path(path)
    if not path.is_file():
        return 0

    def keep(record: dict) -> bool:
        at = record.get("step", 0)
        return at < step or (at == step and record.get("kind") != kind_at_step) if kind_at_step else at <= step

    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and keep(json.loads(line))]
    if len(kept) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: list[dict], path: str | os.PathLike) -> Path:
    """curves.png: training loss, val top-1/top-5 (and the EMA's, dashed) and images/s per GPU against the
    optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in evals], [r["top1"] for r in evals], "o-", label="top-1")
    axes[1].plot([r["step"] for r in evals], [r["top5"] for r in evals], "o-", label="top-5")
    ema = [r for r in evals if "ema_top1" in r]
    if ema:  # --ema-decay: the averaged weights, dashed in the same colours
        axes[1].plot([r["step"] for r in ema], [r["ema_top1"] for r in ema], "o--", color="C0", label="EMA top-1")
        axes[1].plot([r["step"] for r in ema], [r["ema_top5"] for r in ema], "o--", color="C1", label="EMA top-5")
    axes[1].set(title="validation accuracy (%)", xlabel="step")
    axes[1].legend()
    axes[2].plot([r["step"] for r in train], [r["images_per_sec_per_gpu"] for r in train])
    axes[2].set(title="images/s per GPU", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Write JSON atomically (shards.process) so a reader never sees half of it."""
    return atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def eval_line(r: dict) -> str:
    """The log line of an evaluation result (top-1/top-5 with their counts, loss; the EMA's beside them)."""
    line = (f"val step {r['step']}: top-1 {r['top1']:.2f}% ({r['correct1']}/{r['total']}) "
            f"top-5 {r['top5']:.2f}% ({r['correct5']}/{r['total']}) loss {r['loss']:.4f}")
    if "ema_top1" in r:
        line += f" | EMA top-1 {r['ema_top1']:.2f}% top-5 {r['ema_top5']:.2f}% loss {r['ema_loss']:.4f}"
    return line


def say_on_main(info: Any) -> Callable[[str], None]:
    """print() for rank 0 (`info.is_main`, a training.dist.DistInfo) that does not break tqdm bars; a no-op on
    the other ranks."""
    def say(text: str) -> None:
        if info.is_main:
            tqdm.write(text, file=sys.stdout)
    return say
