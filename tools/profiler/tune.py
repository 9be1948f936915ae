"""`tune(...)`: the cheapest loader setting whose end-to-end throughput reaches `target` of the model ceiling,
behind `saturate profile --tune`; `short_tune()` behind `saturate train --num-threads auto` when no tune.json
entry matches.

    ceiling   the training step on synthetic data (measured before the search, and again after it)
    search    threads per GPU doubled from 1 until a setting feeds the ceiling, then bisected down to the
              fewest that do; then one thread fewer with the knobs that worked, else with one other knob
              changed (`hw_decoder_load` for dali-gpu, prefetch depth), as long as that still feeds it.
              Nothing feeds it: the other knobs are tried at the best thread count, and the best
              reachable setting is the answer, said so.
    budget    at most `max_trials` trials, and a trial starts only if the longest one so far still fits the
              time budget; every rank of a node-scale tune takes the same decisions (figures are the node's).

Cheapest means fewest CPU threads per GPU, then the shallowest prefetch (host memory). The result is a
tune.json entry (training/tuning.py says what one holds and how `--num-threads auto` finds it).

`search` is the search alone, on any `measure(setting)`; `run_tune` measures on real loaders: every trial is
an e2e configuration measured like a profile row (steady warm-up, timed windows; at node scale all ranks at
once, the figure their mean per GPU). When the ceilings before and after the search differ by more than
row.DRIFT_LIMIT, the entry says the result is uncertain.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tools.profiler.gpu import GpuMonitor
from tools.profiler.measure import Timing, Workload, cpu_split
from tools.profiler.plan import ProfileConfig, Sweep, check_sweep
from tools.profiler.report import describe_corpus, describe_machine
from tools.profiler.row import CEILING_MARGIN, DRIFT_LIMIT, measurement_reasons
from tools.profiler.sweep import Session, augment_keywords, default_threads, ranks_of

TARGET = 0.98  # e2e / ceiling that counts as "the GPU is fed"
NOISE = 0.02  # fractions of the ceiling closer than this are a tie when nothing reaches the target
DEFAULT_MAX_TRIALS = 12
DEFAULT_TIME_BUDGET = 600.0  # seconds for the search (the two ceiling measurements come on top)
#: Prefetch depths tried per backend, the default first (pytorch: batches per worker).
PREFETCH_CHOICES = {"dali-gpu": (2, 3, 4), "dali-cpu": (2, 3, 4), "pytorch": (2, 4)}
#: hw_decoder_load values tried for dali-gpu, the default (pipeline.constants.HW_DECODER_LOAD) first.
HW_LOAD_CHOICES = (0.65, 0.75, 1.0, 0.5, 0.25, 0.0)


@dataclass(frozen=True)
class Setting:
    """One loader setting the search can try."""

    threads: int  # DALI CPU threads / DataLoader workers, per GPU
    prefetch: int  # batches (DALI queue depth; per worker for pytorch)
    hw_decoder_load: float | None = None  # dali-gpu only

    @property
    def cost(self) -> tuple[int, int]:
        return self.threads, self.prefetch

    def with_threads(self, threads: int) -> Setting:
        return Setting(threads, self.prefetch, self.hw_decoder_load)


@dataclass
class Trial:
    setting: Setting
    images_per_sec_per_gpu: float | None
    fraction: float | None  # of the ceiling
    seconds: float  # wall time the trial took (build, warm-up, windows)
    error: str | None = None
    unstable: list[str] = field(default_factory=list)


@dataclass
class SearchResult:
    best: Trial | None  # the cheapest trial reaching the target, else the best reachable
    reached: bool
    trials: list[Trial]
    stopped: str | None  # why the search ended before it was done, if it did


class _BudgetSpent(Exception):
    pass


def alternatives(backend: str, current: Setting) -> list[Setting]:
    """`current` with one other knob changed: (dali-gpu) another decoder load first, as it costs no CPU
    thread and no memory, then another prefetch depth."""
    out = []
    if backend == "dali-gpu":
        out += [Setting(current.threads, current.prefetch, x) for x in HW_LOAD_CHOICES if x != current.hw_decoder_load]
    return out + [Setting(current.threads, p, current.hw_decoder_load) for p in PREFETCH_CHOICES[backend]
                  if p != current.prefetch]


def search(
    *,
    backend: str,
    ceiling: float,
    measure: Callable[[Setting], tuple[float | None, str | None, list[str]]],
    max_threads: int,
    max_trials: int = DEFAULT_MAX_TRIALS,
    time_budget: float = DEFAULT_TIME_BUDGET,
    target: float = TARGET,
    clock: Callable[[], float] = time.monotonic,
    agree: Callable[[bool], bool] = lambda go: go,
) -> SearchResult:
    """Find the cheapest setting reaching `target` x `ceiling`; `measure(setting)` returns (images/s per GPU,
    error, unstable reasons). `agree`: every rank's go-ahead for the next trial (node scale)."""
    started, trials, tried = clock(), [], {}

    def trial(setting: Setting) -> Trial:
        if setting in tried:
            return tried[setting]
        longest = max((t.seconds for t in trials), default=0.0)
        if not agree(len(trials) < max_trials and clock() - started + longest <= time_budget):
            raise _BudgetSpent
        begun = clock()
        rate, error, unstable = measure(setting)
        result = Trial(setting, rate, rate / ceiling if rate else None, clock() - begun, error, unstable)
        trials.append(result)
        tried[setting] = result
        return result

    def feeds(t: Trial) -> bool:
        return t.fraction is not None and t.fraction >= target

    base = Setting(1, PREFETCH_CHOICES[backend][0], HW_LOAD_CHOICES[0] if backend == "dali-gpu" else None)
    stopped = None
    try:
        fail, fed, threads = 0, None, 1
        while fed is None:  # double the threads until the ceiling is fed or the cores run out
            if feeds(trial(base.with_threads(threads))):
                fed = threads
            elif threads >= max_threads:
                break
            else:
                fail, threads = threads, min(2 * threads, max_threads)
        if fed is not None:
            while fed - fail > 1:  # the fewest threads that feed it, at the default knobs
                mid = (fail + fed) // 2
                fail, fed = (fail, mid) if feeds(trial(base.with_threads(mid))) else (mid, fed)
            current = base
            while fed > 1:  # can one thread fewer feed it, with the knobs that worked or another one?
                fewer = current.with_threads(fed - 1)
                found = next((s for s in [fewer, *alternatives(backend, fewer)] if feeds(trial(s))), None)
                if found is None:
                    break
                fed, current = fed - 1, found
        else:
            best = max((t for t in trials if t.fraction), key=lambda t: t.fraction, default=None)
            if best is not None:
                for setting in alternatives(backend, best.setting):
                    trial(setting)
    except _BudgetSpent:
        spent = clock() - started
        stopped = (f"trial budget spent ({max_trials} trials)" if len(trials) >= max_trials
                   else f"time budget spent ({spent:.0f} of {time_budget:.0f} s)")
    return choose(trials, target=target, stopped=stopped)


def choose(trials: list[Trial], *, target: float, stopped: str | None = None) -> SearchResult:
    """The cheapest trial reaching `target` (ties: the faster), else the best reachable (ties: the cheaper)."""
    fed = [t for t in trials if t.fraction is not None and t.fraction >= target]
    if fed:
        best = min(fed, key=lambda t: (t.setting.cost, -t.fraction))
    else:  # the cheapest of those within measurement noise of the best fraction
        measured = [t for t in trials if t.fraction]
        top = max((t.fraction for t in measured), default=None)
        near = [t for t in measured if t.fraction >= top - NOISE]
        best = min(near, key=lambda t: (t.setting.cost, -t.fraction)) if near else None
    return SearchResult(best, bool(fed), trials, stopped)


def rescore(result: SearchResult, *, ceiling: float, target: float) -> SearchResult:
    """The same trials judged against another ceiling (the one measured after the search may be higher)."""
    for t in result.trials:
        t.fraction = t.images_per_sec_per_gpu / ceiling if t.images_per_sec_per_gpu else None
    return choose(result.trials, target=target, stopped=result.stopped)


def entry_for(result: SearchResult, *, match: dict, ceiling: tuple[float, float, float], target: float,
              backend: str, corpus: dict, machine: dict, budget: dict, notes: list[str]) -> dict[str, Any]:
    """The tune.json entry of a search (training.tuning.make_entry defines it). ceiling: images/s per GPU
    measured before and after the search, and the one the fractions are against (the fastest seen)."""
    from training.tuning import make_entry

    best = result.best
    if best is None:
        raise RuntimeError("tune: no trial produced a figure (" + "; ".join(
            f"{t.setting}: {t.error}" for t in result.trials) + ")")
    s = best.setting
    return make_entry(
        match=match, setting={"num_threads": s.threads, "prefetch_depth": s.prefetch,
                              "hw_decoder_load": s.hw_decoder_load},
        backend=backend, reached_target=result.reached, target=target, ceiling=ceiling,
        images_per_sec_per_gpu=best.images_per_sec_per_gpu, fraction_of_ceiling=best.fraction,
        stopped=result.stopped, notes=notes, budget=budget, corpus=corpus, machine=machine,
        trials=[{**asdict(t.setting), "images_per_sec_per_gpu": t.images_per_sec_per_gpu, "fraction": t.fraction,
                 "seconds": t.seconds, "error": t.error, "unstable": t.unstable} for t in result.trials],
    )


# --- the tune on real loaders ---------------------------------------------------------------------------
#: What `saturate train --num-threads auto` spends when it has to tune first.
SHORT_TUNE = dict(timing=Timing(steps=None, duration=4.0, windows=2, warmup=5, max_warmup=10.0), max_trials=6,
                  time_budget=120.0)


def tune(shards_dir: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """`run_tune` in this process's process group (started here under torchrun, and ended if started here)."""
    from training import dist

    with dist.session() as info:
        return run_tune(shards_dir, info=info, **options)


def run_tune(
    shards_dir: str | os.PathLike,
    *,
    info: Any,
    backend: str,
    arch: str,
    batch_size: int,
    image_size: int,
    precision: str,
    compile: bool = False,
    split: str = "train",
    augment: str = "rrc-flip",
    randaugment_n: int | None = None,
    randaugment_m: int | None = None,
    random_erasing: float = 0.0,
    timing: Timing,
    max_threads: int | None = None,
    max_trials: int = DEFAULT_MAX_TRIALS,
    time_budget: float = DEFAULT_TIME_BUDGET,
    target: float = TARGET,
    progress: bool = True,
    before_measuring: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Measure the ceiling, search the loader knobs, measure the ceiling again; returns the tune.json entry.
    max_threads: the most loader threads per GPU to try (default: CPU cores per GPU). augment and its knobs:
    the training run's augmentation policy (pipeline.augment), which the loader setting must afford.
    before_measuring: called once every option and the corpus have been checked (the command line checks
    there that it can write its result)."""
    from pipeline.augment import make_policy
    from shards.process import processes_per_node
    from training.tuning import machine_key, match_key

    check_tune(backend=backend, arch=arch, batch_size=batch_size, image_size=image_size, precision=precision,
               compile=compile, augment=augment, timing=timing, max_threads=max_threads, max_trials=max_trials,
               time_budget=time_budget, target=target)
    ranks = ranks_of(info)
    say = print if progress and ranks.rank == 0 else (lambda *_, **__: None)
    augment_options = augment_keywords(randaugment_n=randaugment_n, randaugment_m=randaugment_m,
                                       random_erasing=random_erasing)
    policy = make_policy(augment=augment, **augment_options)
    corpus = describe_corpus(shards_dir, split)
    if before_measuring is not None:
        before_measuring()
    session = Session(ranks, Workload(shards_dir, split, arch, corpus["num_classes"], augment_options), info.device,
                      timing, GpuMonitor(info.device))
    model = ProfileConfig("model", "synthetic", batch_size, image_size, precision=precision, compile=compile)
    model_threads = cpu_split(info.device)  # on the CPU: the model's threads, the cores the loader leaves
    # on the CPU the ceiling is the faster of the model on the whole share and beside one loader thread
    models = ([replace(model, model_threads=n) for n in sorted({model_threads(0), model_threads(1)}, reverse=True)]
              if model_threads else [model])

    def ceiling() -> float:
        rows = [session.row(m, [session.measure(m)]) for m in models]
        failed = next((row for row in rows if not row.ok), None)
        if failed is not None:
            raise RuntimeError(f"tune: the model ceiling could not be measured: {failed.error}")
        fastest = max(row.images_per_sec_per_gpu for row in rows)
        say(f"tune: ceiling {fastest:.0f} img/s/GPU ({arch}, batch {batch_size}, {image_size}px, {precision})",
            file=sys.stderr)
        return fastest

    def measure(setting: Setting) -> tuple[float | None, str | None, list[str]]:
        config = ProfileConfig("e2e", backend, batch_size, image_size, threads=setting.threads,
                               hw_decoder_load=setting.hw_decoder_load, precision=precision, compile=compile,
                               prefetch=setting.prefetch, augment=augment,
                               model_threads=model_threads(setting.threads) if model_threads else None)
        row = session.row(config, [session.measure(config)])
        figure = f"{row.images_per_sec_per_gpu:.0f} img/s/GPU" if row.ok else row.error
        say(f"tune: {config.label()}: {figure}", file=sys.stderr)
        unstable = row.unstable if row.ranks > 1 else measurement_reasons(row)  # node rows were judged per rank
        return row.images_per_sec_per_gpu, row.error, unstable

    max_threads = max_threads or default_threads(ranks)
    before = ceiling()
    result = search(backend=backend, ceiling=before, measure=measure, max_threads=max_threads,
                    max_trials=max_trials, time_budget=time_budget, target=target,
                    agree=lambda go: ranks.all_true(go)[0])
    after = ceiling()
    session.monitor.close()
    # A disturbance only ever slows a measurement down, so the ceiling is the fastest the step was seen to go:
    # the higher of the two ceilings, or an e2e trial if one went faster still (the ceiling was disturbed).
    fastest = max([before, after, *(t.images_per_sec_per_gpu or 0.0 for t in result.trials)])
    result = rescore(result, ceiling=fastest, target=target)
    notes = []
    if abs(after - before) > DRIFT_LIMIT * min(after, before):
        notes.append(f"the ceiling moved from {before:.0f} to {after:.0f} img/s/GPU during the tune: the machine "
                     "was not steady, so the result is uncertain; tune again on a quiet machine")
    if fastest > max(before, after) * (1 + CEILING_MARGIN):
        notes.append(f"an e2e trial ran at {fastest:.0f} img/s/GPU, above the ceiling measured "
                     f"({max(before, after):.0f}): the ceiling measurement was disturbed, so fractions are against "
                     "that trial")
    match = match_key(arch=arch, batch_size=batch_size, image_size=image_size, precision=precision,
                      compile=compile, backend=backend, processes_per_node=processes_per_node(),
                      machine=machine_key(), augment=policy.spec)
    budget = {"max_trials": max_trials, "time_budget_s": time_budget, "max_threads": max_threads,
              "trial_duration_s": timing.duration, "trial_steps": timing.steps,
              "search_seconds": sum(t.seconds for t in result.trials)}
    return entry_for(result, match=match, ceiling=(before, after, fastest), target=target, backend=backend,
                     corpus=corpus, machine=describe_machine(), budget=budget, notes=notes)


def check_tune(*, backend: str, arch: str, batch_size: int, image_size: int, precision: str, compile: bool,
               augment: str, timing: Timing, max_threads: int | None, max_trials: int, time_budget: float,
               target: float) -> None:
    """Reject a bad tune before anything is measured (the profile's own checks on its one configuration, then
    the search's bounds); each message names the flag to fix. Without it `--max-trials 0` ended in 'no trial
    produced a figure', `--backends foo` in a KeyError and `--max-threads 0` wrote a tune.json."""
    from training.model import is_classifier

    sweep = Sweep(modes=("e2e",), backends=(backend,), batch_sizes=(batch_size,), image_sizes=(image_size,),
                  threads=(1,), precisions=(precision,), compile_modes=(compile,), augments=(augment,))
    check_sweep(sweep, steps=timing.steps, duration=timing.duration, warmup=timing.warmup, windows=timing.windows,
                max_warmup=timing.max_warmup)
    if max_threads is not None and max_threads < 1:
        raise ValueError(f"--max-threads: an integer >= 1 (loader threads per GPU), got {max_threads}")
    if max_trials < 1:
        raise ValueError(f"--max-trials: an integer >= 1, got {max_trials}")
    if not (math.isfinite(time_budget) and time_budget > 0):
        raise ValueError(f"--time-budget: seconds > 0, got {time_budget}")
    if not 0 < target <= 1:  # NaN fails this too
        raise ValueError(f"--target: a fraction of the ceiling in (0, 1], got {target}")
    if not is_classifier(arch):
        raise ValueError(f"--arch: {arch!r} is not a torchvision classification model")


def tune_files(*, out_dir: str | os.PathLike, shards_dir: str | os.PathLike) -> list[Path]:
    """Where a tune's entry goes: OUT/tune.json, and SHARDS/tune.json when the shards are a local folder."""
    from shards.store import is_store_url
    from training.tuning import TUNE_FILE

    return [Path(out_dir) / TUNE_FILE] + ([] if is_store_url(shards_dir) else [Path(shards_dir) / TUNE_FILE])


def check_tune_files(*, out_dir: str | os.PathLike, shards_dir: str | os.PathLike) -> None:
    """Before measuring: a tune.json the entry would be merged into must be readable, else a ValueError naming
    it. Found only when writing, it cost the whole tune's result (minutes of measurement)."""
    from training.tuning import TuneFileError, read_entries

    for path in tune_files(out_dir=out_dir, shards_dir=shards_dir):
        try:
            read_entries(path)
        except TuneFileError as err:
            raise ValueError(f"{path}: not a tune file this tune can be added to ({err.reason}); move it away "
                             "first") from None


def write_entry(entry: dict[str, Any], *, out_dir: str | os.PathLike, shards_dir: str | os.PathLike) -> list[str]:
    """Write the entry to OUT/tune.json and into SHARDS/tune.json (where `--num-threads auto` looks);
    returns what was written or why not, one line each."""
    from shards.store import is_store_url
    from training.config import ConfigError
    from training.tuning import TUNE_FILE, add_entry

    lines = []
    if is_store_url(shards_dir):  # tune.json is a local file; saturate train looks in RUN_DIR for store data
        lines.append(f"not written beside the shards in {shards_dir} (an object store): pass --tune-file "
                     f"{Path(out_dir) / TUNE_FILE} to saturate train, or copy it into its --run-dir")
    for path in tune_files(out_dir=out_dir, shards_dir=shards_dir):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lines.append(f"wrote {add_entry(path, entry)}")
        except (OSError, ConfigError) as err:  # read-only, or damaged since the check: the other may still work
            elsewhere = Path(out_dir) / TUNE_FILE
            lines.append(f"could not write {path} ({err})" + ("" if path == elsewhere else
                                                               f"; pass --tune-file {elsewhere} to saturate train"))
    return lines


def short_tune(cfg: Any) -> dict[str, Any]:
    """The tune `saturate train --num-threads auto` runs when no entry matches (its match is the run's own)."""
    from training import dist
    from training.tuning import run_key

    info = dist.init()  # train() started it: the tune runs on every rank of the job
    entry = run_tune(cfg.data, info=info, backend=cfg.backend, arch=cfg.arch,
                 batch_size=cfg.per_process_batch(info.world_size), image_size=cfg.image_size,
                 precision=cfg.precision, compile=cfg.compile, split=cfg.train_split, augment=cfg.augment,
                 randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m, random_erasing=cfg.random_erasing,
                 **SHORT_TUNE)
    entry["match"] = run_key(cfg, world_size=info.world_size)
    return entry
