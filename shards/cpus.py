"""How many CPU cores this process may really use: the one answer the converter, `verify`, the trainer's
thread split, the profiler and `saturate synth` share.

`os.cpu_count()` is the machine's total, which is wrong in a container, under Slurm, or with `taskset`: the
affinity mask, a cgroup CPU quota (Docker `--cpus`, Kubernetes CPU limits) and Slurm's `SLURM_CPUS_PER_TASK`
each lower it, and oversubscribing cores makes loaders and OpenMP threads spin against each other.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` quota; None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may use (>= 1): the affinity mask, capped by a cgroup quota (rounded up: 1.5 CPUs
    of quota still lets two threads make progress) and by $SLURM_CPUS_PER_TASK."""
    count = _affinity()
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    return count


#: Worker processes `convert` and `verify` accept at most; more is a typo (and each one is forked at once).
MAX_WORKERS = 4096


def check_workers(workers: int | None) -> None:
    """A ValueError naming --workers unless it is None (the usable cores) or in 1..MAX_WORKERS."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers {workers} must be in 1..{MAX_WORKERS} (or leave it out: the usable CPU cores)")


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo), for telling machines apart in profiles and tune results."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
