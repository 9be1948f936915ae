"""Node scale: the profile's processes under torchrun, measuring the same configuration at the same time.

The question is images/s per GPU when every GPU of the node trains at once: N loaders then share the
node's CPU cores, PCIe and memory bandwidth, and a loader that fed one GPU can starve eight. Each
configuration is measured twice: rank 0 alone while the others wait (the one-process figure of the same
run), then all ranks together, every window started together. Rank 0 writes the report.

`Ranks` is the few collectives the profiler needs: agreement (a barrier that also carries flags), and
gathering each rank's results. `combine` turns the ranks' rows into one node row.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from tools.profiler.measure import SingleProcess
from tools.profiler.plan import ProfileConfig
from tools.profiler.row import ProfileRow
from tools.profiler.stability import MEASUREMENT_RULES, SPREAD_LIMIT


class Ranks:
    """The processes of this profile's process group (torchrun sets it up; training.dist starts it)."""

    def __init__(self, *, rank: int, world_size: int, local_world_size: int, device: Any) -> None:
        self.rank, self.world_size, self.local_world_size = rank, world_size, local_world_size
        self._device = device  # NCCL reduces device tensors, gloo host tensors

    def all_true(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag and-ed over all ranks, in one all-reduce: also the barrier every window starts from."""
        import torch
        import torch.distributed as tdist

        values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self._device)
        tdist.all_reduce(values, op=tdist.ReduceOp.MIN)
        return tuple(bool(v) for v in values.tolist())

    def gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects only)."""
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def ranks_of(info: Any) -> Ranks | SingleProcess:
    """Ranks for the process group training.dist.init() started; a SingleProcess without one."""
    from shards.process import processes_per_node

    if info.world_size <= 1:
        return SingleProcess()
    return Ranks(rank=info.rank, world_size=info.world_size, local_world_size=processes_per_node(),
                 device=info.device)


def combine(config: ProfileConfig, rank_rows: list[ProfileRow], solo: ProfileRow | None) -> ProfileRow:
    """One node row from each rank's row (same configuration, measured together) and rank 0's solo row."""
    failed = [(r, row.error) for r, row in enumerate(rank_rows) if not row.ok]
    if failed:
        # the rank whose own error stopped the others says what went wrong
        rank, error = next(((r, e) for r, e in failed if not e.startswith("OtherRankFailed")), failed[0])
        return ProfileRow(config, error=f"rank {rank}: {error}", ranks=len(rank_rows))
    rates = [row.images_per_sec_per_gpu for row in rank_rows]
    mean = statistics.fmean(rates)

    def mean_of(name: str) -> float | None:
        values = [getattr(row, name) for row in rank_rows]
        return None if any(v is None for v in values) else statistics.fmean(values)

    node = ProfileRow(
        config,
        timed_steps=sum(row.timed_steps for row in rank_rows),
        timed_seconds=max(row.timed_seconds for row in rank_rows),
        images_per_sec_per_gpu=mean,
        images_per_sec_min=min(rates),  # node rows: the slowest and fastest rank
        images_per_sec_max=max(rates),
        window_images_per_sec=[w for row in rank_rows for w in row.window_images_per_sec],
        passes=[statistics.fmean(p) for p in zip(*(row.passes for row in rank_rows), strict=True)],
        step_time_ms=mean_of("step_time_ms"),
        data_wait_share=mean_of("data_wait_share"),
        cpu_cores_busy=mean_of("cpu_cores_busy"),  # per GPU: each rank counts its own process and workers
        gpu_util_pct=mean_of("gpu_util_pct"),
        gpu_memory_peak_gib=mean_of("gpu_memory_peak_gib"),
        gpu_memory_used_gib=mean_of("gpu_memory_used_gib"),
        warmup_steps=max(row.warmup_steps for row in rank_rows),
        warmup_seconds=max(row.warmup_seconds for row in rank_rows),
        settled=None if any(row.settled is None for row in rank_rows) else all(row.settled for row in rank_rows),
        ranks=len(rank_rows),
        per_rank_images_per_sec=rates,
        images_per_sec_total=sum(rates),
    )
    for r, row in enumerate(rank_rows):
        node.unstable += [f"rank {r}: {reason}" for rule in MEASUREMENT_RULES if (reason := rule(row))]
    if solo is not None and solo.ok:
        node.solo_images_per_sec = solo.images_per_sec_per_gpu
        node.scaling_efficiency = mean / solo.images_per_sec_per_gpu
        node.unstable += [f"alone: {reason}" for rule in MEASUREMENT_RULES if (reason := rule(solo))]
    elif solo is not None:
        node.notes.append(f"rank 0 alone failed: {solo.error}")
    if (max(rates) - min(rates)) / mean > SPREAD_LIMIT:
        node.notes.append(f"ranks differ: the slowest makes {min(rates):.0f} img/s, and DDP trains at its pace")
    return node


def launch(nproc: int, argv: list[str]) -> int:
    """Run `saturate <argv>` as `nproc` processes on this node under torchrun; returns their exit status."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tools.cli", *argv]
    print("saturate profile: launching " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command)
