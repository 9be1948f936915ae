"""One configuration's figures (`ProfileRow`), summarised from one or more measured passes.

Images/s is the median over timed windows with the min and max beside it, so one slow window (an epoch
boundary, a page cache miss) shows as spread instead of moving the headline figure. A model row measured
before and after the data rows (the ceiling, see tools/profiler/sweep.py) pools both passes' windows and
keeps each pass's median in `passes`, so drift between them is visible.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tools.profiler.measure import Measurement, cores_busy
from tools.profiler.plan import ProfileConfig


@dataclass
class ProfileRow:
    """One configuration's figures; None means not measurable here (written `n/a`), never zero."""

    config: ProfileConfig
    error: str | None = None  # "<ExceptionType>: message" when the configuration failed
    timed_steps: int | None = None
    timed_seconds: float | None = None  # wall seconds over all timed windows
    images_per_sec_per_gpu: float | None = None  # median over windows (node scale: mean over ranks)
    images_per_sec_min: float | None = None  # slowest window
    images_per_sec_max: float | None = None  # fastest window
    window_images_per_sec: list[float] = field(default_factory=list)  # every timed window, in order
    passes: list[float] = field(default_factory=list)  # median images/s of each pass (the ceiling: before, after)
    step_time_ms: float | None = None  # median over windows of window wall time / steps
    data_wait_share: float | None = None  # e2e: fraction of wall time the host spent waiting in next(loader)
    cpu_cores_busy: float | None = None  # process + worker CPU seconds / wall seconds (per GPU)
    gpu_util_pct: float | None = None  # NVML, median of one sample per window
    gpu_memory_peak_gib: float | None = None  # torch.cuda.max_memory_allocated (torch tensors only)
    gpu_memory_used_gib: float | None = None  # NVML: whole device in use (includes DALI's and cuDNN's pools)
    warmup_steps: int | None = None  # untimed steps before timing (minimum + steady check)
    warmup_seconds: float | None = None
    settled: bool | None = None  # step time steady before timing; None: the check was off
    vs_ceiling: float | None = None  # images/s / model ceiling images/s (same batch, image size, step)
    vs_pytorch: float | None = None  # images/s / the pytorch backend's, same mode and other axes
    threads_needed: int | None = None  # loader: whole CPU threads to feed the ceiling, assuming linear scaling
    unstable: list[str] = field(default_factory=list)  # why this row is not a result; empty: it is one
    notes: list[str] = field(default_factory=list)  # remarks that do not make it unstable
    # node scale (several processes measured at once); None for a one-process profile
    ranks: int = 1
    per_rank_images_per_sec: list[float] | None = None  # each rank's median, rank order
    images_per_sec_total: float | None = None  # sum over ranks: the node's throughput
    solo_images_per_sec: float | None = None  # rank 0 alone, the other ranks idle, same run
    scaling_efficiency: float | None = None  # mean per GPU / solo

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def stable(self) -> bool:
        """A result to read: measured, and no stability rule objected."""
        return self.ok and not self.unstable

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        return {**asdict(self.config), "label": self.config.label(), "is_unstable": bool(self.unstable), **body}


def summarise(config: ProfileConfig, passes: list[Measurement]) -> ProfileRow:
    """A row from the passes measured for `config` (one normally; two for the bracketed ceiling)."""
    windows = [w for p in passes for w in p.windows]
    rates = [w.images_per_sec for w in windows]
    wall = sum(w.seconds for w in windows)
    utils = [w.gpu_util_pct for w in windows if w.gpu_util_pct is not None]
    peaks = [p.gpu_memory_peak_gib for p in passes if p.gpu_memory_peak_gib is not None]
    used = [p.gpu_memory_used_gib for p in passes if p.gpu_memory_used_gib is not None]
    settled = [p.settled for p in passes if p.settled is not None]
    notes = [f"measured again: a pass's windows spread {min(r):.0f}-{max(r):.0f} img/s"
             for p in passes for r in p.discarded]
    return ProfileRow(
        config,
        timed_steps=sum(w.steps for w in windows),
        timed_seconds=wall,
        images_per_sec_per_gpu=statistics.median(rates),
        images_per_sec_min=min(rates),
        images_per_sec_max=max(rates),
        window_images_per_sec=rates,
        passes=[statistics.median(w.images_per_sec for w in p.windows) for p in passes],
        step_time_ms=statistics.median(w.step_seconds for w in windows) * 1e3,
        data_wait_share=sum(w.wait_seconds for w in windows) / wall if config.mode == "e2e" else None,
        cpu_cores_busy=cores_busy(sum(w.cpu_seconds for w in windows), wall),
        gpu_util_pct=statistics.median(utils) if utils else None,
        gpu_memory_peak_gib=max(peaks) if peaks else None,
        gpu_memory_used_gib=max(used) if used else None,
        warmup_steps=sum(p.warmup_steps for p in passes),
        warmup_seconds=sum(p.warmup_seconds for p in passes),
        settled=all(settled) if settled else None,
        notes=notes,
    )
