"""`tune(...)`: the cheapest loader setting whose end-to-end throughput reaches `target` of the model ceiling.

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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

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
