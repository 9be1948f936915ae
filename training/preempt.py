"""Preemption: SIGTERM (Slurm, Kubernetes, torchrun forwarding either) and SIGUSR1 (Slurm's `--signal`) ask the
run to stop; the loop checkpoints at the next point where every rank agrees, then the process exits with
128 + the signal number, so a scheduler sees a job that did not finish and restarts it with `--resume auto`.

The handler only sets a flag: the loop reads it between steps (a Python attribute, no host sync). One process
stops after the step in flight; under DDP the ranks agree through the all-reduce of the next log step, so every
rank saves at the same step (at most --log-every steps later).

A stop signal that finds the loop waiting for data (`StopRequest.waiting`: a batch, or the evaluation) and the
wait lasting more than `stall_grace` seconds (STALL_GRACE for a wait that began after the signal) interrupts it:
a store that stopped answering must not hold a preempted job until the scheduler's SIGKILL. A healthy wait takes
milliseconds and ends within the grace, and the stop then takes the usual path (a checkpoint at the end of the
step). The interruption is the process-wide stop request of shards.process (`request_stop`: StopRequested is
raised in the wait, and the object store's retries end too). A process alone (grace STALL_GRACE_ALONE) then
checkpoints at the last step it finished, unless part of a --grad-accum-steps group was already read. Under DDP
(STALL_GRACE) the other ranks may be inside a collective nobody can join, so the rank exits without a checkpoint
and the run resumes from its last one. The wait must be interruptible by Python: the `pytorch` backend's is;
DALI's happens inside DALI's C++ and ends when DALI's own reader gives up.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from shards.process import clear_stop, request_stop, stop_interrupts

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
#: Seconds a data wait may outlast a stop signal under DDP before it counts as a stall (a healthy wait takes
#: milliseconds; a pipeline starting an epoch, a few seconds).
STALL_GRACE = 10.0  # seconds
#: The same for a process alone: nobody waits for it, so it stops sooner (a scheduler's grace is often 30 s).
STALL_GRACE_ALONE = 2.0  # seconds


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; `exit_status` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: str | None, step: int, *, why_none: str | None = None) -> None:
        """`why_none`: no checkpoint was written, and why (the run continues from its last one)."""
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "its checkpoint"
        if why_none is not None:
            super().__init__(f"stopped by {name} at step {step} without a checkpoint ({why_none}); run the same "
                             "command with --resume auto to continue from the last checkpoint")
        else:
            super().__init__(f"stopped by {name} at step {step} after writing {where}; "
                             "run the same command with --resume auto to continue")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Context manager: while active, STOP_SIGNALS set `signum` instead of killing the process. `stall_grace`:
    seconds a data wait may go on after a stop signal before it is interrupted (see the module docstring)."""

    def __init__(self, *, stall_grace: float = 0.0) -> None:
        self.signum: int | None = None
        self.stall_grace = stall_grace
        self._previous: dict[int, object] = {}
        self._waiting = False
        self._expired = False  # the grace of the wait in progress ran out
        self._timer: threading.Timer | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        if not self._waiting:
            return  # the loop stops at its next agreed step
        if self._expired:
            self._waiting = False  # raised once: the code that handles it may wait again (closing the loader)
            request_stop(f"{signal.Signals(self.signum).name} while waiting for data")  # raises StopRequested
        self._start_timer(self.stall_grace)

    def _start_timer(self, seconds: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(seconds, self._grace_over)
            self._timer.daemon = True
            self._timer.start()

    def _grace_over(self) -> None:
        """Timer thread: the wait outlived its grace; the stop signal goes to the main thread again, whose handler
        now interrupts the wait."""
        if self._waiting and self.signum is not None:
            self._expired = True
            signal.pthread_kill(threading.main_thread().ident, self.signum)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The loop waits for data inside this. A wait that begins after a stop signal (the rest of a group of
        accumulated micro-batches, say) is interrupted once it outlasts the grace too."""
        self._waiting, self._expired = True, False
        if self.signum is not None:
            self._start_timer(self.stall_grace)
        try:
            with stop_interrupts():
                yield
        finally:
            self._waiting = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def __enter__(self) -> StopRequest:
        clear_stop()  # the request is process-wide: one left by an earlier run here must not stop this one
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
