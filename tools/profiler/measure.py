"""Time one configuration: warm up until the step time is steady, then `windows` timed windows.

Warm-up: at least `warmup` untimed steps (torch.compile compiles, DALI fills its queue), then warm-up
windows of the timed windows' length until two consecutive ones agree on the step time within
`steady_tolerance`, or `max_warmup` seconds pass (the row then says it never settled). A fixed step count
cannot know when one-time costs (cuDNN autotuning, allocator growth, page cache) are over; the step time can.

Sync discipline: inside a window nothing synchronises the host with the device -- no .item(), no .cpu(); the
image count is the labels' shape (host metadata) and the clock is the host's. A window ends with exactly one
torch.cuda.synchronize(), so the work queued in it is finished before its end time is read.

Under several processes (node scale) every rank starts each window together: the agreement after each
window (`Ranks.all_true`) is the barrier, and it is also how all ranks decide together that the warm-up is
over, or that one rank failed and everyone stops (a rank that left early would hang the others).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tools.profiler.counters import cpu_seconds_delta, cpu_seconds_snapshot
from tools.profiler.gpu import GpuMonitor

DEFAULT_WINDOWS = 5  # timed windows per configuration
DEFAULT_WARMUP = 20  # untimed steps at least, before the steady check
DEFAULT_DURATION = 15.0  # seconds of timed work per configuration when neither steps nor duration is given
DEFAULT_MAX_WARMUP = 60.0  # seconds the steady check may take before the row is flagged as never settled
STEADY_TOLERANCE = 0.10  # consecutive warm-up windows whose step times differ by at most this fraction: steady
#: (fastest - slowest window) / median above this: the windows disagree too much for one figure. A pass
#: that spreads wider is measured once more (a stall from another process should not cost the row); a
#: second wide spread stays, and the row is marked unstable (tools/profiler/stability.py).
SPREAD_LIMIT = 0.30


def spread_share(rates: list[float]) -> float:
    """(max - min) / median of window images/s; 0 for fewer than two windows."""
    import statistics

    return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else 0.0


class OtherRankFailed(RuntimeError):
    """Another process of a node-scale profile failed; this one stopped with it (its row says which)."""


def agreed(ranks: Any, run: Callable[[], tuple], *, flags: int = 0,
           failed: str = "failed during this configuration") -> tuple:
    """Run on this rank, then agree with all ranks: `run` returns (result, *flags) and each flag comes back
    and-ed over every rank. A failure anywhere stops every rank (this rank re-raises its own error, the others
    raise OtherRankFailed saying the other rank `failed`), so no rank waits in a collective for one that died."""
    try:
        result, *held = run()
        error = None
    except Exception as err:
        result, held, error = None, [False] * flags, err
    ok, *held = ranks.all_true(error is None, *held)
    if error is not None:
        raise error
    if not ok:
        raise OtherRankFailed(f"another rank {failed} (see its row)")
    return (result, *held)


@dataclass(frozen=True)
class Timing:
    """How long one configuration is measured."""

    steps: int | None  # timed steps over all windows, or None with `duration`
    duration: float | None  # timed seconds over all windows, or None with `steps`
    windows: int
    warmup: int  # untimed steps before the steady check
    max_warmup: float = DEFAULT_MAX_WARMUP  # seconds; 0 turns the steady check off
    steady_tolerance: float = STEADY_TOLERANCE
    retries: int = 1  # passes measured again when their windows spread wider than SPREAD_LIMIT

    def window_steps(self) -> list[int] | None:
        """Steps per window when bounded by steps: `steps` split as evenly as possible over at most `windows`."""
        if self.steps is None:
            return None
        n = min(self.windows, self.steps)
        return [self.steps // n + (1 if w < self.steps % n else 0) for w in range(n)]


@dataclass(frozen=True)
class Window:
    """One timed (or warm-up) window's raw figures."""

    images: int
    steps: int
    seconds: float  # wall
    wait_seconds: float  # host time blocked in next(loader)
    cpu_seconds: float  # this process and its workers
    gpu_util_pct: float | None = None

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps


@dataclass
class Measurement:
    """One pass over a configuration: its timed windows and how the warm-up went."""

    windows: list[Window]
    warmup_steps: int
    warmup_seconds: float
    settled: bool | None  # None: the steady check was off
    gpu_memory_peak_gib: float | None = None
    gpu_memory_used_gib: float | None = None
    discarded: list[list[float]] = field(default_factory=list)  # images/s of windows measured again (spread)


class SingleProcess:
    """The Ranks of one process: every agreement is its own."""

    rank, world_size = 0, 1

    def all_true(self, *flags: bool) -> tuple[bool, ...]:
        return tuple(bool(f) for f in flags)


def measure(
    batches: Iterator,
    step: Callable | None,
    *,
    device: Any,
    timing: Timing,
    gpu_monitor: GpuMonitor,
    ranks: Any = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Time `step` over `batches` (or the loader alone when `step` is None); see the module docstring."""
    ranks = ranks or SingleProcess()

    def sync() -> None:
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)

    def feed(batch: tuple) -> None:
        images, labels = batch[0], batch[1]
        if step is not None:
            if images.device != device:  # a CPU backend feeding a GPU model: the copy is part of its cost
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            step(images, labels)

    def window(steps: int | None, seconds: float | None) -> Window:
        cpu_start, start = cpu_seconds_snapshot(), clock()
        images = count = 0
        wait = 0.0
        while True:
            asked = clock()
            batch = next(batches)
            wait += clock() - asked
            feed(batch)
            images += int(batch[1].shape[0])  # shape is host metadata: no sync
            count += 1
            if (count >= steps) if steps is not None else (clock() - start >= seconds):
                break
        util = gpu_monitor.utilization()  # sampled while the window's work is still running
        sync()  # the one host sync of this window
        wall = clock() - start
        return Window(images, count, wall, wait, cpu_seconds_delta(cpu_start, cpu_seconds_snapshot()), util)

    def minimum_warmup() -> tuple:
        for _ in range(timing.warmup):
            feed(next(batches))
        sync()
        return (None,)

    def warm_window(previous: float | None, spent: float) -> tuple:
        """A warm-up window, whether its step time agrees with the previous one's, and whether time is left."""
        w = window(*bound)
        steady = previous is not None and abs(w.step_seconds - previous) <= timing.steady_tolerance * min(
            w.step_seconds, previous)
        return w, steady, spent + w.seconds < timing.max_warmup

    plan = timing.window_steps()
    bound = (plan[0], None) if plan else (None, timing.duration / timing.windows)
    warm_start = clock()
    agreed(ranks, minimum_warmup)
    warm_steps, settled, previous = timing.warmup, None, None
    while timing.max_warmup > 0:
        w, steady, in_time = agreed(ranks, functools.partial(warm_window, previous, clock() - warm_start),
                                    flags=2)
        warm_steps += w.steps
        previous = w.step_seconds
        if steady or not in_time:
            settled = steady
            break
    warmup_seconds = clock() - warm_start
    discarded: list[list[float]] = []
    while True:
        windows = []
        for w in range(len(plan) if plan else timing.windows):
            run = functools.partial(window, plan[w] if plan else None, bound[1])
            windows.append(agreed(ranks, lambda run=run: (run(),))[0])
        rates = [w.images_per_sec for w in windows]
        (steady,) = ranks.all_true(spread_share(rates) <= SPREAD_LIMIT)
        if steady or len(discarded) >= timing.retries:
            break
        discarded.append(rates)
    peak = None
    if device.type == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated(device) / 2**30
    return Measurement(windows, warm_steps, warmup_seconds, settled, peak, gpu_monitor.memory_used_gib(), discarded)
