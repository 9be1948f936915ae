"""Preemption: SIGTERM (Slurm, Kubernetes, torchrun forwarding either) and SIGUSR1 (Slurm's `--signal`) ask the
run to stop; the loop checkpoints at the next point where every rank agrees, then the process exits with
128 + the signal number, so a scheduler sees a job that did not finish and restarts it with `--resume auto`.

The handler only sets a flag: the loop reads it between steps (a Python attribute, no host sync). One process
stops after the step in flight; under DDP the ranks agree through the all-reduce of the next log step, so every
rank saves at the same step (at most --log-every steps later).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; `exit_status` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: str | None, step: int) -> None:
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "its checkpoint"
        super().__init__(f"stopped by {name} at step {step} after writing {where}; "
                         "run the same command with --resume auto to continue")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Context manager: while active, STOP_SIGNALS set `signum` instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
