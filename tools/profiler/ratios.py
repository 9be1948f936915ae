"""The figures that compare rows: vs ceiling, vs pytorch, threads needed; then the stability flags.

Only ratios compare across machines; absolute images/s depend on the GPU, the CPU and the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from tools.profiler.plan import AXES, SCOPES, ProfileConfig
from tools.profiler.row import ProfileRow
from tools.profiler.stability import flag_unstable

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
