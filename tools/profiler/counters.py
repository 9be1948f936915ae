"""CPU seconds of this process and of its worker processes: the 'CPU cores busy' figure.

Live children must be read one by one: the kernel adds a child's time to the parent's `children_*` counters
only once it has been waited for, and DataLoader workers end at every epoch boundary.
"""

from __future__ import annotations

import os

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
