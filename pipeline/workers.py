"""The pytorch backend's DataLoader worker processes: what they do with stop signals, and how they end.

    batches = start_pass(DataLoader(..., worker_init_fn=leave_stop_signals_to_parent))
    end_pass(batches)   # the pass is no longer wanted: its workers are killed now

Workers ignore SIGTERM and SIGUSR1 and leave the decision to the trainer (leave_stop_signals_to_parent). torch
and multiprocessing end workers with SIGTERM when their polite shutdown fails, so this module ends them itself,
with SIGKILL: when a pass is dropped (end_pass), and when the interpreter exits with passes still open
(_end_at_exit) -- without that, a script that left a loop early, or whose loader the garbage collector ended,
waited minutes at exit for workers that no one would stop.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 -- registers its exit hook (SIGTERM + join) before ours, so ours runs first
import signal
import weakref
from typing import Any

_OPEN: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators of passes not ended yet
_WORKERS: list = []  # the worker processes of every pass started in this process


def leave_stop_signals_to_parent(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGUSR1. Schedulers send them to every process of a job (Kubernetes
    signals the whole pod): a worker that died of one would fail the epoch before the trainer could write its
    preemption checkpoint. The workers still end with their parent (torch's DataLoader watches it)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def start_pass(loader: Any) -> Any:
    """`iter(loader)` for a torch DataLoader, its workers tracked so that they end with the pass or the process."""
    batches = iter(loader)
    _OPEN.add(batches)
    _WORKERS[:] = [worker for worker in _WORKERS if worker.is_alive()] + list(getattr(batches, "_workers", ()))
    return batches


def end_pass(batches: Any) -> None:
    """End a pass's workers now. torch's shutdown asks them to finish, waits 5 s for each, then sends SIGTERM,
    which they ignore: a worker inside a store read that gets no answer would hold the shutdown, and this
    process's exit, for up to the store's time bound (shards.store). Its batches are no longer wanted, so it is
    killed, after torch stops watching its pid (else its SIGCHLD handler reports the kill as a failed worker).
    `_workers`, `_worker_pids_set` and `_remove_worker_pids` are torch's own (1.x to 2.14); without them only that
    report comes back."""
    _OPEN.discard(batches)
    alive = [worker for worker in getattr(batches, "_workers", ()) if worker.is_alive()]
    if alive and getattr(batches, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for worker in alive:
        worker.kill()
    if alive:
        for worker in alive:
            worker.join(timeout=5)
        # torch's own shutdown (run later by the iterator's finaliser) would set an Event whose lock a killed worker
        # may have held (workers check it every batch): a hang, seen after Ctrl-C. Nothing is left to shut down
        # but the pin-memory thread, told here; the index queues are not flushed to workers that are gone.
        batches._shutdown = True
        done = getattr(batches, "_pin_memory_thread_done_event", None)
        if done is not None:
            done.set()
        for queue in getattr(batches, "_index_queues", ()):
            queue.cancel_join_thread()
            queue.close()


@atexit.register
def _end_at_exit() -> None:
    """Kill the workers still alive when the interpreter exits: of passes still open, and of passes whose
    iterator the garbage collector ended (torch's shutdown from a finaliser can fail to reach them).
    multiprocessing's own exit hook would SIGTERM and join them, and wait for as long as they live."""
    for batches in list(_OPEN):
        end_pass(batches)
    for worker in _WORKERS:
        if worker.is_alive():
            worker.kill()
