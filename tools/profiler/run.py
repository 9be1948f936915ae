"""Run one configuration in this process: build the loader (and the trainer's own training step), measure,
tear down. What failed is raised for the caller to turn into an error row.

On the CPU a configuration's `model_threads` sets the model's intra-op threads: the cores the loader leaves
(`cpu_split`, the trainer's own rule), so the ceiling and the e2e rows split the cores as `saturate train`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tools.profiler.gpu import GpuMonitor
from tools.profiler.measure import Measurement, SingleProcess, Timing, agreed, measure
from tools.profiler.plan import TRAINING_MODES, ProfileConfig


@dataclass(frozen=True)
class Workload:
    """What every configuration of a profile reads and trains."""

    shards_dir: str | os.PathLike
    split: str
    arch: str
    num_classes: int  # the corpus's, so the ceiling trains the same head as e2e
    #: randaugment_n, randaugment_m, random_erasing for rows with an augmentation policy (build_loader's keywords)
    augment_options: dict = field(default_factory=dict)


def run_config(
    config: ProfileConfig,
    *,
    workload: Workload,
    device: Any,
    timing: Timing,
    gpu_monitor: GpuMonitor,
    ranks: Any = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Build, measure, tear down (always). Under several ranks, all agree the build worked before timing."""
    import torch

    ranks = ranks or SingleProcess()
    loader = step = None
    model_threads = torch.get_num_threads()

    def build() -> tuple:
        nonlocal loader, step  # set as built, so that `finally` closes a loader whose step then failed to build
        loader = build_loader(config, workload=workload)
        if config.mode in TRAINING_MODES:
            step = build_step(config, arch=workload.arch, num_classes=loader.num_classes, device=device)
        return (None,)

    try:
        agreed(ranks, build, failed="failed to build this configuration")
        if config.model_threads is not None:
            torch.set_num_threads(config.model_threads)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        return measure(endless(loader), step, device=device, timing=timing, gpu_monitor=gpu_monitor, ranks=ranks,
                       clock=clock)
    finally:
        torch.set_num_threads(model_threads)
        if loader is not None:
            try:
                loader.close()
            except Exception as err:  # closing a loader that failed mid-epoch may fail again; keep the row
                print(f"saturate profile: closing {config.label()} failed: {err}", file=sys.stderr)
        step = loader = None  # drop the model, its optimizer state and the loader's buffers ...
        if device.type == "cuda":
            torch.cuda.empty_cache()  # ... so the next configuration's memory figures start from empty


def cpu_split(device: Any) -> Callable[[int], int] | None:
    """loader threads -> the model's CPU threads, as `saturate train` splits the cores; None on a GPU, or
    when $OMP_NUM_THREADS decides (the trainer leaves it alone then, too)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    from training.train import cpu_model_threads

    return cpu_model_threads


def build_loader(config: ProfileConfig, *, workload: Workload) -> Any:
    """The training pipeline (augmentation, shuffle) whichever split it reads: that is what feeds a step."""
    from pipeline import build_loader as pipeline_loader

    if config.backend == "synthetic":
        # a long epoch so no epoch boundary lands in a window
        return pipeline_loader(None, "train", train=True, batch_size=config.batch_size, image_size=config.image_size,
                               backend="synthetic", num_classes=workload.num_classes,
                               num_samples=config.batch_size * 10_000 * _world_size())
    # the loader's axes pass straight through as build_loader keywords (tools/profiler/plan.py); an axis not set
    # (None) leaves the loader's default. The policy's knobs go with a policy.
    options = workload.augment_options if config.augment is not None else {}
    return pipeline_loader(workload.shards_dir, workload.split, train=True, batch_size=config.batch_size,
                           image_size=config.image_size, backend=config.backend, **config.loader_keywords(), **options)


def _world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def build_step(config: ProfileConfig, *, arch: str, num_classes: int, device: Any) -> Callable:
    """The trainer's own TrainStep (same code as `saturate train`) on a fresh model. Not wrapped in DDP: the
    ranks of a node-scale profile step independently, sharing the node's CPU cores, PCIe and memory."""
    from training.model import build_model
    from training.optim import build_optimizer
    from training.step import TrainStep

    model = build_model(arch, num_classes=num_classes, channels_last=True).to(device)
    optimizer = build_optimizer(model, lr=0.1)
    return TrainStep(model, optimizer, **config.step_keywords())  # the step's axes: precision, compile


def endless(loader: Any) -> Iterator:
    """Batches across epoch boundaries: a new iter() starts the next epoch (the boundary is timed too)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"the {getattr(loader, 'backend', '?')} loader yielded no batch in an epoch")
