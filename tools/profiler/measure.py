"""How one configuration is measured: build its loader (and the trainer's own training step), warm up until the
step time is steady, time `windows` windows, tear down. What failed is raised for the caller to turn into an
error row (tools/profiler/sweep.py).

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

On the CPU a configuration's `model_threads` sets the model's intra-op threads: the cores the loader leaves
(`cpu_split`, the trainer's own rule), so the ceiling and the e2e rows split the cores as `saturate train`.

Requests to an object store are counted per window (`RequestCounter`), so each row says how many requests per
image its backend sends: on a relay in front of a plain-http endpoint when the profile started one
(tools/request_relay.py: every request on the wire, DALI's own AWS client included), else through boto3's hooks
(shards.request_log: the `pytorch` backend, the indexes and a shard cache's downloads, not DALI's own reads, so
DALI rows say n/a); a local folder sends none.

CPU seconds ('CPU cores busy') count this process and its worker processes. Live children are read one by
one: the kernel adds a child's time to the parent's `children_*` counters only once it has been waited for,
and DataLoader workers end at every epoch boundary.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.profiler.gpu import GpuMonitor
from tools.profiler.plan import TRAINING_MODES, ProfileConfig

DEFAULT_WINDOWS = 5  # timed windows per configuration
DEFAULT_WARMUP = 20  # untimed steps at least, before the steady check
DEFAULT_DURATION = 15.0  # seconds of timed work per configuration when neither steps nor duration is given
DEFAULT_MAX_WARMUP = 60.0  # seconds the steady check may take before the row is flagged as never settled
STEADY_TOLERANCE = 0.10  # consecutive warm-up windows whose step times differ by at most this fraction: steady
#: (fastest - slowest window) / median above this: the windows disagree too much for one figure. A pass
#: that spreads wider is measured once more (a stall from another process should not cost the row); a
#: second wide spread stays, and the row is marked unstable (tools/profiler/row.py).
SPREAD_LIMIT = 0.30


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
class Workload:
    """What every configuration of a profile reads and trains."""

    shards_dir: str | os.PathLike
    split: str
    arch: str
    num_classes: int  # the corpus's, so the ceiling trains the same head as e2e
    #: randaugment_n, randaugment_m, random_erasing for rows with an augmentation policy (build_loader's keywords)
    augment_options: dict = field(default_factory=dict)
    #: build_loader's cache_dir/cache_limit for the data rows: the store read through a node-local shard cache
    cache_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    """One timed (or warm-up) window's raw figures."""

    images: int
    steps: int
    seconds: float  # wall
    wait_seconds: float  # host time blocked in next(loader)
    cpu_seconds: float  # this process and its workers
    gpu_util_pct: float | None = None
    requests: int | None = None  # to the object store during the window (RequestCounter); None: not counted

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


def run_config(
    config: ProfileConfig,
    *,
    workload: Workload,
    device: Any,
    timing: Timing,
    gpu_monitor: GpuMonitor,
    ranks: Any = None,
    clock: Callable[[], float] = time.perf_counter,
    requests: RequestCounter | None = None,
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
                       clock=clock, requests=requests, backend=config.backend)
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


def build_loader(config: ProfileConfig, *, workload: Workload) -> Any:
    """The training pipeline (augmentation, shuffle) whichever split it reads: that is what feeds a step."""
    from pipeline import build_loader as pipeline_loader
    from shards.process import job_place

    if config.backend == "synthetic":
        # a long epoch so no epoch boundary lands in a window
        return pipeline_loader(None, "train", train=True, batch_size=config.batch_size, image_size=config.image_size,
                               backend="synthetic", num_classes=workload.num_classes,
                               num_samples=config.batch_size * 10_000 * job_place()[0].world_size)
    # the loader's axes pass straight through as build_loader keywords (tools/profiler/plan.py); an axis not set
    # (None) leaves the loader's default. The policy's knobs go with a policy.
    options = workload.augment_options if config.augment is not None else {}
    return pipeline_loader(workload.shards_dir, workload.split, train=True, batch_size=config.batch_size,
                           image_size=config.image_size, backend=config.backend, **config.loader_keywords(), **options,
                           **workload.cache_options)


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


def cpu_split(device: Any) -> Callable[[int], int] | None:
    """loader threads -> the model's CPU threads, as `saturate train` splits the cores; None on a GPU, or
    when $OMP_NUM_THREADS decides (the trainer leaves it alone then, too)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    from training.train import cpu_model_threads

    return cpu_model_threads


def measure(
    batches: Iterator,
    step: Callable | None,
    *,
    device: Any,
    timing: Timing,
    gpu_monitor: GpuMonitor,
    ranks: Any = None,
    clock: Callable[[], float] = time.perf_counter,
    requests: RequestCounter | None = None,
    backend: str = "",
) -> Measurement:
    """Time `step` over `batches` (or the loader alone when `step` is None); see the module docstring.
    `requests` counts the object store's requests of `backend` in each window."""
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
        sent = requests.count(backend) if requests is not None else None
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
        cpu = cpu_seconds_delta(cpu_start, cpu_seconds_snapshot())
        if sent is not None:
            sent = requests.count(backend) - sent
        return Window(images, count, wall, wait, cpu, util, sent)

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


def spread_share(rates: list[float]) -> float:
    """(max - min) / median of window images/s; 0 for fewer than two windows."""
    import statistics

    return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else 0.0


class RequestCounter:
    """Requests sent to the object store so far, by the rows of one backend (see the module docstring): a
    running count (compare two readings), or None where it cannot be counted honestly."""

    def __init__(self, *, store: bool, relay_log: Path | None = None) -> None:
        """`store`: the profile reads an object store (else nothing is sent: 0); `relay_log`: the relay's
        one-line-per-request file, when a relay carries the traffic."""
        self.store, self.relay_log = store, relay_log

    @property
    def how(self) -> str:
        """How the requests are counted, for the report."""
        if not self.store:
            return "a local folder: no requests"
        if self.relay_log is not None:
            return ("on a relay in front of the store's http:// endpoint (tools/request_relay.py): every request, "
                    "DALI's own reads included")
        return ("through boto3's hooks (shards.request_log): pytorch reads, indexes and a cache's downloads; "
                "DALI's own AWS client is not seen, so DALI rows are n/a (an http:// endpoint is counted on a relay)")

    def count(self, backend: str) -> int | None:
        if not self.store or backend == "synthetic":
            return 0
        if self.relay_log is not None:
            with open(self.relay_log, "rb") as f:
                return f.read().count(b"\n")
        if backend.startswith("dali"):
            return None
        from shards.request_log import request_counts

        return request_counts().requests


class SingleProcess:
    """The Ranks of one process: every agreement is its own."""

    rank, world_size = 0, 1

    def all_true(self, *flags: bool) -> tuple[bool, ...]:
        return tuple(bool(f) for f in flags)


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


# --- CPU seconds of this process and its workers -------------------------------------------------------
#: Timed wall time below this many kernel clock ticks gives no CPU-busy figure (the quantisation error of
#: process CPU times, counted in ticks, would be larger than the figure).
CPU_TICKS_MEASURABLE = 20

Snapshot = dict[int | str, float]  # "self", "reaped" or a child's pid -> CPU seconds


def cpu_seconds_snapshot() -> Snapshot:
    """CPU seconds (user + system) of this process, of each live descendant, and of descendants reaped."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    snapshot: Snapshot = {
        "self": times.user + times.system,
        "reaped": times.children_user + times.children_system,
    }
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # exited between listing and reading; its time shows up in "reaped"
            continue
        snapshot[child.pid] = t.user + t.system
    return snapshot


def cpu_seconds_delta(before: Snapshot, after: Snapshot) -> float:
    """CPU seconds spent between two snapshots. A child born in between counts from zero. A child that ended
    in between moved its whole lifetime into "reaped", so its time before the first snapshot is taken back
    out (without this, DataLoader workers ending at an epoch boundary were counted twice)."""
    spent = sum(seconds - before.get(key, 0.0) for key, seconds in after.items())
    spent -= sum(seconds for key, seconds in before.items() if key not in after)
    return max(spent, 0.0)


def clock_tick() -> float:
    """Seconds per kernel clock tick, the resolution of process CPU times (0.01 s on Linux)."""
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 0.01


def cores_busy(cpu_seconds: float, wall_seconds: float) -> float | None:
    """CPU seconds per wall second, or None when the wall time is too short for the tick resolution."""
    if wall_seconds < CPU_TICKS_MEASURABLE * clock_tick():
        return None
    return cpu_seconds / wall_seconds
