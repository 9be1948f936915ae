"""What a row is: one configuration's figures (`ProfileRow`), when they are not a result (the stability rules),
and the figures that compare rows (vs ceiling, vs pytorch, threads needed).

Images/s is the median over timed windows with the min and max beside it, so one slow window (an epoch
boundary, a page cache miss) shows as spread instead of moving the headline figure. A model row measured
before and after the data rows (the ceiling, see tools/profiler/sweep.py) pools both passes' windows and
keeps each pass's median in `passes`, so drift between them is visible. At node scale (several processes
measuring at once) `combine` makes one row of the ranks' rows: the mean per GPU, each rank's figure, the total.

A profile on a shared or noisy machine can produce figures that cannot be true (training fed by a loader
faster than training on synthetic data) or that depend on which window one looks at. Each stability rule
returns the reason in words, or None; `flag_unstable` applies them all to a report's rows, in place.

Only ratios compare across machines; absolute images/s depend on the GPU, the CPU and the corpus.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from tools.profiler.measure import SPREAD_LIMIT, Measurement, cores_busy, spread_share
from tools.profiler.plan import AXES, SCOPES, ProfileConfig


@dataclass
class ProfileRow:
    """One configuration's figures; None means not measurable here (written `n/a`), never zero."""

    config: ProfileConfig
    error: str | None = None  # "<ExceptionType>: message" when the configuration failed
    timed_steps: int | None = None
    timed_seconds: float | None = None  # wall seconds over all timed windows
    images_per_sec_per_gpu: float | None = None  # median over windows (node scale: mean over ranks)
    images_per_sec_min: float | None = None  # slowest window
    images_per_sec_max: float | None = None  # fastest window
    window_images_per_sec: list[float] = field(default_factory=list)  # every timed window, in order
    passes: list[float] = field(default_factory=list)  # median images/s of each pass (the ceiling: before, after)
    step_time_ms: float | None = None  # median over windows of window wall time / steps
    data_wait_share: float | None = None  # e2e: fraction of wall time the host spent waiting in next(loader)
    cpu_cores_busy: float | None = None  # process + worker CPU seconds / wall seconds (per GPU)
    requests_per_image: float | None = None  # object-store requests per image read (measure.RequestCounter)
    gpu_util_pct: float | None = None  # NVML, median of one sample per window
    gpu_memory_peak_gib: float | None = None  # torch.cuda.max_memory_allocated (torch tensors only)
    gpu_memory_used_gib: float | None = None  # NVML: whole device in use (includes DALI's and cuDNN's pools)
    warmup_steps: int | None = None  # untimed steps before timing (minimum + steady check)
    warmup_seconds: float | None = None
    settled: bool | None = None  # step time steady before timing; None: the check was off
    vs_ceiling: float | None = None  # images/s / model ceiling images/s (same batch, image size, step)
    vs_pytorch: float | None = None  # images/s / the pytorch backend's, same mode and other axes
    threads_needed: int | None = None  # loader: whole CPU threads to feed the ceiling, assuming linear scaling
    unstable: list[str] = field(default_factory=list)  # why this row is not a result; empty: it is one
    notes: list[str] = field(default_factory=list)  # remarks that do not make it unstable
    # node scale (several processes measured at once); None for a one-process profile
    ranks: int = 1
    per_rank_images_per_sec: list[float] | None = None  # each rank's median, rank order
    images_per_sec_total: float | None = None  # sum over ranks: the node's throughput
    solo_images_per_sec: float | None = None  # rank 0 alone, the other ranks idle, same run
    scaling_efficiency: float | None = None  # mean per GPU / solo

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def stable(self) -> bool:
        """A result to read: measured, and no stability rule objected."""
        return self.ok and not self.unstable

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        return {**asdict(self.config), "label": self.config.label(), "is_unstable": bool(self.unstable), **body}


def summarise(config: ProfileConfig, passes: list[Measurement]) -> ProfileRow:
    """A row from the passes measured for `config` (one normally; two for the bracketed ceiling)."""
    windows = [w for p in passes for w in p.windows]
    rates = [w.images_per_sec for w in windows]
    wall = sum(w.seconds for w in windows)
    utils = [w.gpu_util_pct for w in windows if w.gpu_util_pct is not None]
    peaks = [p.gpu_memory_peak_gib for p in passes if p.gpu_memory_peak_gib is not None]
    used = [p.gpu_memory_used_gib for p in passes if p.gpu_memory_used_gib is not None]
    settled = [p.settled for p in passes if p.settled is not None]
    notes = [f"measured again: a pass's windows spread {min(r):.0f}-{max(r):.0f} img/s"
             for p in passes for r in p.discarded]
    sent = [w.requests for w in windows]
    return ProfileRow(
        config,
        timed_steps=sum(w.steps for w in windows),
        timed_seconds=wall,
        images_per_sec_per_gpu=statistics.median(rates),
        images_per_sec_min=min(rates),
        images_per_sec_max=max(rates),
        window_images_per_sec=rates,
        passes=[statistics.median(w.images_per_sec for w in p.windows) for p in passes],
        step_time_ms=statistics.median(w.step_seconds for w in windows) * 1e3,
        data_wait_share=sum(w.wait_seconds for w in windows) / wall if config.mode == "e2e" else None,
        cpu_cores_busy=cores_busy(sum(w.cpu_seconds for w in windows), wall),
        requests_per_image=sum(sent) / sum(w.images for w in windows) if None not in sent else None,
        gpu_util_pct=statistics.median(utils) if utils else None,
        gpu_memory_peak_gib=max(peaks) if peaks else None,
        gpu_memory_used_gib=max(used) if used else None,
        warmup_steps=sum(p.warmup_steps for p in passes),
        warmup_seconds=sum(p.warmup_seconds for p in passes),
        settled=all(settled) if settled else None,
        notes=notes,
    )


def combine(config: ProfileConfig, rank_rows: list[ProfileRow], solo: ProfileRow | None) -> ProfileRow:
    """One node row from each rank's row (same configuration, measured together) and rank 0's solo row."""
    failed = [(r, row.error) for r, row in enumerate(rank_rows) if not row.ok]
    if failed:
        # the rank whose own error stopped the others says what went wrong
        rank, error = next(((r, e) for r, e in failed if not e.startswith("OtherRankFailed")), failed[0])
        return ProfileRow(config, error=f"rank {rank}: {error}", ranks=len(rank_rows))
    rates = [row.images_per_sec_per_gpu for row in rank_rows]
    mean = statistics.fmean(rates)

    def mean_of(name: str) -> float | None:
        values = [getattr(row, name) for row in rank_rows]
        return None if any(v is None for v in values) else statistics.fmean(values)

    node = ProfileRow(
        config,
        timed_steps=sum(row.timed_steps for row in rank_rows),
        timed_seconds=max(row.timed_seconds for row in rank_rows),
        images_per_sec_per_gpu=mean,
        images_per_sec_min=min(rates),  # node rows: the slowest and fastest rank
        images_per_sec_max=max(rates),
        window_images_per_sec=[w for row in rank_rows for w in row.window_images_per_sec],
        passes=[statistics.fmean(p) for p in zip(*(row.passes for row in rank_rows), strict=True)],
        step_time_ms=mean_of("step_time_ms"),
        data_wait_share=mean_of("data_wait_share"),
        cpu_cores_busy=mean_of("cpu_cores_busy"),  # per GPU: each rank counts its own process and workers
        requests_per_image=mean_of("requests_per_image"),  # each rank counts its own requests
        gpu_util_pct=mean_of("gpu_util_pct"),
        gpu_memory_peak_gib=mean_of("gpu_memory_peak_gib"),
        gpu_memory_used_gib=mean_of("gpu_memory_used_gib"),
        warmup_steps=max(row.warmup_steps for row in rank_rows),
        warmup_seconds=max(row.warmup_seconds for row in rank_rows),
        settled=None if any(row.settled is None for row in rank_rows) else all(row.settled for row in rank_rows),
        ranks=len(rank_rows),
        per_rank_images_per_sec=rates,
        images_per_sec_total=sum(rates),
    )
    for r, row in enumerate(rank_rows):
        node.unstable += [f"rank {r}: {reason}" for reason in measurement_reasons(row)]
    if solo is not None and solo.ok:
        node.solo_images_per_sec = solo.images_per_sec_per_gpu
        node.scaling_efficiency = mean / solo.images_per_sec_per_gpu
        node.unstable += [f"alone: {reason}" for reason in measurement_reasons(solo)]
    elif solo is not None:
        node.notes.append(f"rank 0 alone failed: {solo.error}")
    if (max(rates) - min(rates)) / mean > SPREAD_LIMIT:
        node.notes.append(f"ranks differ: the slowest makes {min(rates):.0f} img/s, and DDP trains at its pace")
    return node


# --- when a row is not a result -------------------------------------------------------------------------
#: e2e above its own ceiling by more than this fraction cannot be true: something drifted between the rows.
CEILING_MARGIN = 0.05
#: the ceiling's passes (before and after the data rows) differing by more than this fraction: it drifted.
DRIFT_LIMIT = 0.10


def window_spread(row: ProfileRow) -> str | None:
    """The measure a pass is retried on (`spread_share`), over the row's windows (one process's)."""
    if not row.images_per_sec_per_gpu:
        return None
    share = spread_share(row.window_images_per_sec)
    if share <= SPREAD_LIMIT:
        return None
    return (f"windows spread {row.images_per_sec_min:.0f}-{row.images_per_sec_max:.0f} img/s, {share:.0%} of the "
            f"median (limit {SPREAD_LIMIT:.0%})")


def not_settled(row: ProfileRow) -> str | None:
    if row.settled is not False:
        return None
    # The seconds count everything before timing: the pipeline's start and the first --warmup steps too (they can
    # outlast --max-warmup, which bounds only the search for a steady step time), and every pass of the row
    over = f" over {len(row.passes)} passes" if len(row.passes) > 1 else ""
    return (f"step time not steady after {row.warmup_steps} warm-up steps{over} "
            f"({row.warmup_seconds:.0f} s, the pipeline's start and first steps included)")


def ceiling_drift(row: ProfileRow) -> str | None:
    """Model rows measured twice (before and after the data rows) must agree."""
    if row.config.mode != "model" or len(row.passes) < 2:
        return None
    low, high = min(row.passes), max(row.passes)
    if low > 0 and (high - low) / low <= DRIFT_LIMIT:
        return None
    before, after = row.passes[0], row.passes[-1]
    return f"ceiling moved from {before:.0f} to {after:.0f} img/s between before and after the data rows"


def above_ceiling(row: ProfileRow) -> str | None:
    if row.config.mode != "e2e" or row.vs_ceiling is None or row.vs_ceiling <= 1.0 + CEILING_MARGIN:
        return None
    return f"e2e {row.vs_ceiling:.2f}x its ceiling (at most {1 + CEILING_MARGIN:.2f}x is possible)"


#: The rules about one process's windows (applied rank by rank at node scale).
MEASUREMENT_RULES = (not_settled, window_spread)


def measurement_reasons(row: ProfileRow) -> list[str]:
    """Why one process's measurement of `row` is not a result (MEASUREMENT_RULES); none for a failed row."""
    return [reason for rule in MEASUREMENT_RULES if row.ok and (reason := rule(row))]


def flag_unstable(rows: Sequence[ProfileRow], ceilings: dict[tuple, ProfileRow]) -> None:
    """Append each rule's reason to `row.unstable`. `ceilings`: ceiling key -> the model row it compares with;
    a data row whose ceiling is unstable cannot give a trustworthy ratio either."""
    for row in rows:
        if not row.ok:
            continue
        # a node row's min-max is the range over ranks; its windows were judged rank by rank (combine)
        own = measurement_reasons(row) if row.ranks == 1 else []
        for reason in (*own, ceiling_drift(row), above_ceiling(row)):
            if reason and reason not in row.unstable:
                row.unstable.append(reason)
    for row in rows:
        ceiling = ceilings.get(row.config.ceiling_key()) if row.config.mode == "e2e" else None
        if row.ok and ceiling is not None and ceiling is not row and ceiling.unstable:
            row.unstable.append("its ceiling row is unstable")


# --- the figures that compare rows ---------------------------------------------------------------------
#: The baseline every other backend is compared with (its ratio column).
BASELINE_BACKEND = "pytorch"


def ceiling_rows(rows: Sequence[ProfileRow]) -> dict[tuple, ProfileRow]:
    """Ceiling key (batch, image size, precision, compile) -> the model row to compare with: the fastest stable
    one (on the CPU there is one per model thread count), else the fastest. An unstable pass (two model threads
    fighting other processes for two cores) must not become the yardstick of rows that measured fine."""
    best: dict[tuple, ProfileRow] = {}
    for r in rows:
        key = r.config.ceiling_key()
        if r.ok and r.config.mode == "model" and (
                key not in best or (r.stable, r.images_per_sec_per_gpu) > (best[key].stable,
                                                                            best[key].images_per_sec_per_gpu)):
            best[key] = r
    return best


def fastest_model_rows(rows: Sequence[ProfileRow]) -> dict[tuple[int, int], ProfileRow]:
    """(batch, image size) -> the fastest model row, stable or not: what a model row's cost is against (1.0 for
    it) and the plot's ceiling line. Loader and e2e rows use the stable-first `ceiling_rows` instead."""
    fastest: dict[tuple[int, int], ProfileRow] = {}
    for r in rows:
        key = (r.config.batch_size, r.config.image_size)
        if r.ok and r.config.mode == "model" and (
                key not in fastest or r.images_per_sec_per_gpu > fastest[key].images_per_sec_per_gpu):
            fastest[key] = r
    return fastest


def fastest_ceiling(ceilings: dict[tuple, ProfileRow], *, batch_size: int, image_size: int) -> float | None:
    """The model ceiling (images/s per GPU) for a loader at this batch and image size: the fastest of
    `ceilings` (from `ceiling_rows`), stable rows first."""
    candidates = [r for r in ceilings.values()
                  if (r.config.batch_size, r.config.image_size) == (batch_size, image_size)]
    stable = [r for r in candidates if r.stable] or candidates
    return max((r.images_per_sec_per_gpu for r in stable), default=None)


def threads_needed(ceiling: float, images_per_sec: float, threads: int) -> tuple[int, str | None]:
    """Whole CPU threads this loader needs to feed `ceiling`, assuming linear scaling in threads, and a note
    when the answer is not a plain extrapolation."""
    per_thread = images_per_sec / threads  # images/s per CPU thread
    if per_thread >= ceiling:
        return 1, f"one thread ({per_thread:.0f} img/s) already outpaces the ceiling ({ceiling:.0f} img/s)"
    return math.ceil(ceiling / per_thread - 1e-9), None


def baseline_config(config: ProfileConfig) -> ProfileConfig:
    """The configuration of the pytorch row `config` is compared with: the same mode and axes, less the axes
    pytorch does not have (`hw_decoder_load`)."""
    absent = {name: None for name, a in AXES.items() if a.scope and not SCOPES[a.scope](config.mode, BASELINE_BACKEND)}
    return replace(config, backend=BASELINE_BACKEND, **absent)


def add_ratios(rows: Sequence[ProfileRow]) -> None:
    """Fill vs_ceiling, vs_pytorch and threads_needed (in place), then flag the unstable rows."""
    # a model row's own measurement decides whether it may be a ceiling: judge those first
    flag_unstable([r for r in rows if r.config.mode == "model"], {})
    ceilings = ceiling_rows(rows)
    fastest_models = fastest_model_rows(rows)
    baselines = [r for r in rows if r.ok and r.config.backend == BASELINE_BACKEND]
    for row in rows:
        if not row.ok or not row.images_per_sec_per_gpu:
            continue
        c = row.config
        if c.mode == "model":
            # against the fastest precision/compile/thread count at this batch and image size, stable or not:
            # 1.0 for it, the cost of others. (Against the stable-first ceiling, an unstable faster model row
            # read 1.27x "of the ceiling" on a busy machine: a ratio no model row can have.)
            fastest = fastest_models[c.batch_size, c.image_size]
            row.vs_ceiling = row.images_per_sec_per_gpu / fastest.images_per_sec_per_gpu
            continue
        if c.mode == "e2e":
            own = ceilings.get(c.ceiling_key())
            ceiling = own.images_per_sec_per_gpu if own else None
        else:
            ceiling = fastest_ceiling(ceilings, batch_size=c.batch_size, image_size=c.image_size)
        if ceiling:
            row.vs_ceiling = row.images_per_sec_per_gpu / ceiling
            if c.mode == "loader" and c.threads:
                row.threads_needed, note = threads_needed(ceiling, row.images_per_sec_per_gpu, c.threads)
                if note:
                    row.notes.append(note)
        base = next((b for b in baselines if b.config == baseline_config(c)), None)
        if base is not None and base.images_per_sec_per_gpu:
            row.vs_pytorch = row.images_per_sec_per_gpu / base.images_per_sec_per_gpu
    flag_unstable(rows, ceilings)
