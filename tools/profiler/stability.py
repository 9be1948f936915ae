"""When a row is not a result: the rules that flag a measurement as unstable instead of printing it.

A profile on a shared or noisy machine can produce figures that cannot be true (training fed by a loader
faster than training on synthetic data) or that depend on which window one looks at. Each rule returns
the reason in words, or None; `flag_unstable` applies them all to a report's rows, in place.
"""

from __future__ import annotations

from collections.abc import Sequence

from tools.profiler.measure import SPREAD_LIMIT, spread_share
from tools.profiler.row import ProfileRow

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


def flag_unstable(rows: Sequence[ProfileRow], ceilings: dict[tuple, ProfileRow]) -> None:
    """Append each rule's reason to `row.unstable`. `ceilings`: ceiling key -> the model row it compares with;
    a data row whose ceiling is unstable cannot give a trustworthy ratio either."""
    for row in rows:
        if not row.ok:
            continue
        # a node row's min-max is the range over ranks; its windows were judged rank by rank (node.combine)
        rules = (ceiling_drift, above_ceiling) if row.ranks > 1 else MEASUREMENT_RULES + (ceiling_drift, above_ceiling)
        for rule in rules:
            reason = rule(row)
            if reason and reason not in row.unstable:
                row.unstable.append(reason)
    for row in rows:
        ceiling = ceilings.get(row.config.ceiling_key()) if row.config.mode == "e2e" else None
        if row.ok and ceiling is not None and ceiling is not row and ceiling.unstable:
            row.unstable.append("its ceiling row is unstable")
