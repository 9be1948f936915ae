"""`profile(...)`: run the sweep (in one process, or on every rank of a node under torchrun) and return the Report.

Order (`schedule`): for each batch and image size, the model rows (the ceiling), the data rows (loader,
e2e), then the model rows again. The ceiling brackets in time the rows compared with it, so a machine that
got faster or slower during the profile cannot make one row look better than its ceiling: the two passes
are pooled, and when they disagree the ceiling and every e2e row compared with it are marked unstable.

A configuration that fails (no GPU for dali-gpu, a loader that raises, out of memory) becomes an error row
holding the message; the profile goes on.

Object storage: every row says how many requests per image its loader sent to the store (measure.RequestCounter).
When the store's endpoint is plain http:// (a MinIO, a local test server), the profile starts a counting relay
in front of it (`counting_relay`) and points this process at it before anything reads the store, so DALI's own
AWS client, which keeps the first endpoint it sees for the whole process, is counted too. With `cache_dir` every
data row reads through a node-local shard cache (pipeline.cache_use); the rows are measured once steady, so they
show the cache as it is by then (pre-stage it with `saturate shards cache` to measure it warm from the first row).

Node scale: under torchrun every rank measures the same configuration at the same time. The question is
images/s per GPU when every GPU of the node trains at once: N loaders then share the node's CPU cores, PCIe
and memory bandwidth, and a loader that fed one GPU can starve eight. Each configuration is measured twice:
rank 0 alone while the others wait (the one-process figure of the same run), then all ranks together, every
window started together (row.combine makes the node row). Rank 0 writes the report. `Ranks` is the few
collectives the profiler needs: agreement (a barrier that also carries flags), and gathering each rank's
results; `launch` starts the ranks for `--nproc`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tools.profiler.gpu import GpuMonitor
from tools.profiler.measure import (
    DEFAULT_DURATION,
    DEFAULT_MAX_WARMUP,
    DEFAULT_WARMUP,
    DEFAULT_WINDOWS,
    Measurement,
    RequestCounter,
    SingleProcess,
    Timing,
    Workload,
    cpu_split,
    run_config,
)
from tools.profiler.plan import ProfileConfig, Sweep, check_sweep, plan_configs, sweep_dict, with_cpu_model_threads
from tools.profiler.report import Report, describe_corpus, describe_machine
from tools.profiler.row import ProfileRow, add_ratios, combine, summarise

Outcome = Measurement | str  # a measured pass, or "<ExceptionType>: message"


def schedule(configs: Sequence[ProfileConfig]) -> list[tuple[ProfileConfig, int]]:
    """(configuration, pass) in the order they are measured: see the module docstring."""
    order: list[tuple[ProfileConfig, int]] = []
    groups = list(dict.fromkeys((c.batch_size, c.image_size) for c in configs))
    for group in groups:
        model = [c for c in configs if c.mode == "model" and (c.batch_size, c.image_size) == group]
        data = [c for c in configs if c.mode != "model" and (c.batch_size, c.image_size) == group]
        order += [(c, 0) for c in model] + [(c, 0) for c in data]
        if data:
            order += [(c, 1) for c in model]
    return order


@dataclass
class Session:
    """What every configuration of one profile (or tune) shares: ranks, corpus and model, device, timing."""

    ranks: Any  # Ranks or measure.SingleProcess
    workload: Workload
    device: Any
    timing: Timing
    monitor: GpuMonitor
    clock: Callable[[], float] = time.perf_counter
    requests: RequestCounter | None = None  # the store's requests per window (None: not counted)

    def measure(self, config: ProfileConfig) -> list[tuple[Outcome, Outcome | None]]:
        """One pass of `config`: per rank, (outcome measured with every rank, rank 0's outcome alone)."""
        def attempt(ranks: Any) -> Outcome:
            try:
                return run_config(config, workload=self.workload, device=self.device, timing=self.timing,
                                  gpu_monitor=self.monitor, ranks=ranks, clock=self.clock, requests=self.requests)
            except Exception as err:  # a broken backend is a row of the report, not the end of the profile
                return f"{type(err).__name__}: {err}"

        if self.ranks.world_size == 1:
            return [(attempt(self.ranks), None)]
        solo = attempt(SingleProcess()) if self.ranks.rank == 0 else None
        self.ranks.all_true(True)  # the other ranks wait here while rank 0 measures alone
        return self.ranks.gather((attempt(self.ranks), solo))

    def row(self, config: ProfileConfig, passes: list[list[tuple[Outcome, Outcome | None]]]) -> ProfileRow:
        """The row of `config` from its passes (node scale: each rank's row combined, with rank 0 alone)."""
        def rank_row(outcomes: list[Outcome]) -> ProfileRow:
            error = next((o for o in outcomes if isinstance(o, str)), None)
            return ProfileRow(config, error=error) if error else summarise(config, outcomes)

        if self.ranks.world_size == 1:
            return rank_row([p[0][0] for p in passes])
        rank_rows = [rank_row([p[r][0] for p in passes]) for r in range(self.ranks.world_size)]
        return combine(config, rank_rows, rank_row([p[0][1] for p in passes]))


def default_backends() -> tuple[tuple[str, ...], str | None]:
    """dali-gpu and pytorch on a GPU box; dali-cpu and pytorch without one, with a note saying so."""
    import torch

    if torch.cuda.is_available():
        return ("dali-gpu", "pytorch"), None
    return ("dali-cpu", "pytorch"), "no CUDA GPU visible: profiling dali-cpu and pytorch instead of dali-gpu"


def default_threads(ranks: Any) -> int:
    """CPU cores per GPU: what one training process of this node can give its loader."""
    import torch

    from shards.process import usable_cpus

    sharing = getattr(ranks, "local_world_size", 1)
    return max(1, usable_cpus() // max(1, sharing if sharing > 1 else torch.cuda.device_count()))


def profile(shards_dir: str | os.PathLike, **options: Any) -> Report:
    """Run the sweep over `<shards_dir>/<split>-*.tar` (see `run_profile` for the options); under torchrun,
    every rank calls this and rank 0 writes the report. Starts and ends the process group if it starts it."""
    from training import dist

    with dist.session() as info:
        return run_profile(shards_dir, info=info, **options)


def run_profile(
    shards_dir: str | os.PathLike,
    *,
    info: Any,
    out_dir: str | os.PathLike | None = None,
    randaugment_n: int | None = None,
    randaugment_m: int | None = None,
    random_erasing: float = 0.0,
    arch: str = "resnet50",
    split: str = "train",
    steps: int | None = None,
    duration: float | None = None,
    warmup: int = DEFAULT_WARMUP,
    windows: int = DEFAULT_WINDOWS,
    max_warmup: float = DEFAULT_MAX_WARMUP,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: str | int | None = None,
    **axes: Sequence | None,
) -> Report:
    """axes: the values to sweep, one keyword per `Sweep` field (modes, backends, batch_sizes, image_sizes,
    threads, hw_decoder_loads, precisions, compile_modes, prefetch_depths, augments: tools/profiler/plan.py);
    an axis not given (or None) sweeps its default. backends None: `default_backends()`, the data backends for
    the loader and e2e modes; threads None: `default_threads()`, CPU threads (DALI) / worker processes (pytorch).
    steps / duration: timed work per configuration, in steps or seconds (split over `windows` windows);
    neither means DEFAULT_DURATION seconds. warmup: untimed steps at least; max_warmup: seconds the
    steady-step-time check may add (0: off). randaugment_n/m and random_erasing apply to every row with an
    augmentation policy (`augments`; None: the loader's default). cache_dir/cache_limit: every data row reads an
    object store through a node-local shard cache (build_loader's keywords)."""
    ranks = ranks_of(info)
    main = ranks.rank == 0
    notes: list[str] = []
    given = {name: tuple(values) for name, values in axes.items() if values is not None}
    if "backends" not in given:
        given["backends"], note = default_backends()
        if note:
            notes.append(note)
            if progress and main:  # said before the long run starts; the CLI's summary repeats report.notes
                print(f"saturate profile: note: {note}", file=sys.stderr)
    given.setdefault("threads", (default_threads(ranks),))
    if steps is None and duration is None:
        duration = DEFAULT_DURATION
    augment_options = augment_keywords(randaugment_n=randaugment_n, randaugment_m=randaugment_m,
                                       random_erasing=random_erasing)
    sweep = Sweep(**given)
    if sweep.augments == (None,) and augment_options:  # --random-erasing alone: on top of the default policy
        sweep = replace(sweep, augments=("rrc-flip",))
    check_sweep(sweep, steps=steps, duration=duration, warmup=warmup, windows=windows, max_warmup=max_warmup)
    from shards.schema import check_split_name
    from training.model import is_classifier

    check_split_name(split, "--split")
    if {"model", "e2e"} & set(sweep.modes) and not is_classifier(arch):
        # checked once here rather than as one error row per training configuration
        raise ValueError(f"--arch: {arch!r} is not a torchvision classification model")
    cache_options = cache_keywords(shards_dir, sweep, cache_dir=cache_dir, cache_limit=cache_limit)
    requests, stop_relay = counting_relay(shards_dir)
    try:
        return measure_sweep(shards_dir, sweep, info=info, ranks=ranks, main=main, notes=notes, out_dir=out_dir,
                             augment_options=augment_options, cache_options=cache_options, requests=requests,
                             arch=arch, split=split, timing=Timing(steps, duration, windows, warmup, max_warmup),
                             progress=progress)
    finally:
        stop_relay()


def measure_sweep(shards_dir: str | os.PathLike, sweep: Sweep, *, info: Any, ranks: Any, main: bool, notes: list[str],
                  out_dir: str | os.PathLike | None, augment_options: dict, cache_options: dict,
                  requests: RequestCounter, arch: str, split: str, timing: Timing, progress: bool) -> Report:
    """run_profile once the sweep is checked: describe, measure every configuration, write the report."""
    from tqdm import tqdm

    corpus = describe_corpus(shards_dir, split)
    if out_dir is not None and main:
        Report.prepare(out_dir)
    machine = describe_machine()
    configs = plan_configs(sweep)
    model_threads = cpu_split(info.device)
    if model_threads is not None:
        configs = with_cpu_model_threads(configs, model_threads)
    workload = Workload(shards_dir, split, arch, corpus.get("num_classes") or 1000, augment_options, cache_options)
    session = Session(ranks, workload, info.device, timing, GpuMonitor(info.device), requests=requests)
    passes: dict[ProfileConfig, list] = {}
    base_notes = list(notes)
    settings = {"shards_dir": str(shards_dir), "split": split, "arch": arch, "device": str(info.device),
                **sweep_dict(sweep), **augment_options, "steps": timing.steps, "duration": timing.duration,
                "warmup": timing.warmup, "windows": timing.windows, "max_warmup": timing.max_warmup,
                "ranks": ranks.world_size, "configurations": len(configs), "store": requests.store, **cache_options}

    def report_so_far(done: bool) -> Report:
        measured = [config for config in configs if config in passes]
        rows = [session.row(config, passes[config]) for config in measured]
        add_ratios(rows)
        notes = base_notes + run_notes(info.device, ranks, session.monitor)
        if augment_options:
            notes.append("every row with an augment policy also has " + ", ".join(
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in augment_options.items()))
        if requests.store:
            notes.append(f"req/img: requests per image read from the store, counted {requests.how}")
        if not done:
            notes.append(f"partial: {len(measured)} of {len(configs)} configurations measured so far (the profile "
                         "was still running; a ceiling measured before its data rows has only its first pass)")
        return Report(corpus=corpus, machine=machine, settings=settings, rows=rows, notes=notes)

    units = schedule(configs)
    bar = tqdm(units, desc="saturate profile", unit="config", disable=not (progress and main), file=sys.stderr)
    for config, again in bar:
        bar.set_postfix_str(config.label() + (" (ceiling again)" if again else ""))
        passes.setdefault(config, []).append(session.measure(config))
        if out_dir is not None and main:  # a run cut short (a time limit) still leaves every row measured so far
            report_so_far(done=False).write(out_dir, plot=False)
    session.monitor.close()
    report = report_so_far(done=True)
    if out_dir is not None and main:
        report.write(out_dir)
    return report


def cache_keywords(shards_dir: str | os.PathLike, sweep: Sweep, *, cache_dir: Any, cache_limit: Any) -> dict:
    """build_loader's cache_dir/cache_limit for the data rows, checked once for every backend swept
    (pipeline.cache_use names the keyword of a bad one: it becomes the flag)."""
    from pipeline import LoaderOptionError
    from pipeline.cache_use import check_cache_options
    from training.config import flag

    if cache_dir is None and cache_limit is None:
        return {}
    try:
        for backend in sweep.backends:
            cache_limit = check_cache_options(backend, shards_dir, cache_dir=cache_dir, cache_limit=cache_limit)
    except LoaderOptionError as err:
        raise ValueError(f"{flag(err.keyword)}: {err.reason}, got {err.value!r}") from None
    return {"cache_dir": str(cache_dir), "cache_limit": cache_limit}


def counting_relay(shards_dir: str | os.PathLike) -> tuple[RequestCounter, Callable[[], None]]:
    """(the counter of the store's requests, what stops it). For an s3:// location behind a plain-http endpoint,
    a relay (tools/request_relay.py) in its own process in front of the endpoint, and this process pointed at it
    (AWS_ENDPOINT_URL) until stopped. It must start before anything in this process reads the store: DALI's AWS
    client keeps the first endpoint it saw."""
    import subprocess
    import tempfile
    from urllib.parse import urlsplit

    from shards.store import is_store_url
    from tools.local_s3 import free_port, wait_for_port

    if not is_store_url(str(shards_dir)):
        return RequestCounter(store=False), lambda: None
    names = [n for n in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(n)]
    endpoint = urlsplit(os.environ[names[0]]) if names else None
    if endpoint is None or endpoint.scheme != "http" or not endpoint.port:
        return RequestCounter(store=True), lambda: None  # https or AWS itself: boto3's hooks count
    fd, log = tempfile.mkstemp(prefix="saturate-requests-", suffix=".log")
    os.close(fd)
    port = free_port()
    relay = subprocess.Popen([sys.executable, "-m", "tools.request_relay", str(port),
                              f"{endpoint.hostname}:{endpoint.port}", "--requests", log])
    saved = {name: os.environ[name] for name in names}
    wait_for_port(port)
    os.environ.update({name: f"http://127.0.0.1:{port}" for name in names})

    def stop() -> None:
        os.environ.update(saved)
        relay.terminate()
        relay.wait(timeout=30)
        os.unlink(log)

    return RequestCounter(store=True, relay_log=Path(log)), stop


def augment_keywords(*, randaugment_n: int | None = None, randaugment_m: int | None = None,
                     random_erasing: float = 0.0) -> dict[str, Any]:
    """build_loader's augmentation knobs that differ from their defaults, checked (pipeline.augment names the
    keyword of a bad one)."""
    from pipeline.augment import PolicyError, make_policy
    from training.config import flag

    given = {"randaugment_n": randaugment_n, "randaugment_m": randaugment_m, "random_erasing": random_erasing or None}
    options = {k: v for k, v in given.items() if v is not None}
    try:
        make_policy(**options)
    except PolicyError as err:  # the keyword becomes the flag a person typed
        raise ValueError(f"{flag(err.keyword)}: {err.reason}, got {err.value!r}") from None
    return options


def run_notes(device: Any, ranks: Any, monitor: GpuMonitor) -> list[str]:
    notes = []
    if device.type != "cuda":
        notes.append("no CUDA GPU: GPU utilisation and memory are n/a; the model runs on the CPU with the cores "
                     "the loader leaves (model threads), as `saturate train` would" if cpu_split(device) else
                     "no CUDA GPU: GPU utilisation and memory are n/a; the model runs on the CPU with "
                     f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} threads")
    if monitor.unavailable:
        notes.append(monitor.unavailable)
    if ranks.world_size > 1:
        notes.append(f"{ranks.world_size} ranks ({ranks.local_world_size} per node) measured each configuration "
                     "together; rank 0 also measured it alone")
    return notes


# --- node scale -----------------------------------------------------------------------------------------
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
