"""Node scale: the profile's processes under torchrun, measuring the same configuration at the same time.

The question is images/s per GPU when every GPU of the node trains at once: N loaders then share the
node's CPU cores, PCIe and memory bandwidth, and a loader that fed one GPU can starve eight. Each
configuration is measured twice: rank 0 alone while the others wait (the one-process figure of the same
run), then all ranks together, every window started together. Rank 0 writes the report.

`Ranks` is the few collectives the profiler needs: agreement (a barrier that also carries flags), and
gathering each rank's results. `combine` (tools/profiler/row.py) turns the ranks' rows into one node row.
"""

from __future__ import annotations

import sys
from typing import Any

from tools.profiler.measure import SingleProcess


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


def launch(nproc: int, argv: list[str]) -> int:
    """Run `saturate <argv>` as `nproc` processes on this node under torchrun; returns their exit status."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tools.cli", *argv]
    print("saturate profile: launching " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return subprocess.call(command)
