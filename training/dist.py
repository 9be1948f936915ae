"""The process group: started from this process's place in the job (shards.process reads torchrun's RANK,
WORLD_SIZE and LOCAL_RANK), and the few collectives training needs. A process alone starts no group and every
collective below is a no-op, so the training loop never branches on "distributed or not". NCCL on GPUs, gloo on
CPU.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from shards.process import STARTED_BY, end_with_parent, environment_place, under_torchrun


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank of this process
    world_size: int  # processes in the job
    local_rank: int  # rank on this node = the GPU index this process drives
    device: torch.device  # where this process's model and batches live

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0


_INFO: DistInfo | None = None


def init() -> DistInfo:
    """Read torchrun's environment, pick the device, and start the process group when world_size > 1. Under
    torchrun the rank also asks to be stopped (SIGTERM) when torchrun dies."""
    global _INFO
    if _INFO is not None:
        return _INFO
    place = environment_place()
    if under_torchrun():
        # torchrun starts each rank in a session of its own and forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT:
        # a SIGUSR1 (Slurm's --signal) or SIGKILL that ends torchrun would leave the ranks training as orphans.
        # The kernel now sends each rank SIGTERM when torchrun dies: the usual stop, one checkpoint, exit 143.
        end_with_parent(signal.SIGTERM, parent=STARTED_BY)
    rank, world_size, local_rank = place.rank, place.world_size, place.local_rank
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    _INFO = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    return _INFO


def shutdown() -> None:
    global _INFO
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _INFO = None


@contextlib.contextmanager
def session() -> Iterator[DistInfo]:
    """`init()` for a piece of work that may run alone or inside a caller's process group (the profiler's sweep
    and tune): on exit the group is shut down only if this call started it; a caller's group is left running."""
    owns = not (tdist.is_available() and tdist.is_initialized())
    info = init()
    try:
        yield info
    finally:
        if owns:
            shutdown()


def active() -> bool:
    return tdist.is_initialized() and tdist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place (a sync point: call it on log/eval steps only)."""
    if active():
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: object) -> list:
    """[obj of rank 0, obj of rank 1, ...] (pickled; for small plain objects such as loader states)."""
    if not active():
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        tdist.barrier()
