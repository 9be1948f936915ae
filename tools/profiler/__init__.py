"""Is the GPU starved, and what would feed it? One run, one corpus, three measurements side by side.

    loader  each data backend alone (dali-gpu, dali-cpu, pytorch): how fast can it produce batches?
    model   the training step fed by the `synthetic` backend: the ceiling no loader can lift it above
    e2e     the training step fed by each data backend: what training actually gets, and the share of the
            wall time the step loop spent waiting for data

One module per job:

    plan.py       ProfileConfig, Sweep, plan_configs, check_sweep: what is measured
    measure.py    Timing, measure: warm-up until steady, timed windows, one sync per window
    counters.py   CPU seconds of this process and its workers ('CPU cores busy')
    gpu.py        GpuMonitor: NVML utilisation and memory of this process's GPU, found by UUID / PCI bus id
    run.py        run_config: build one configuration's loader and training step, measure, tear down
    row.py        ProfileRow, summarise: one configuration's figures from its measured passes
    stability.py  the rules that mark a row unstable instead of printing it as a result
    ratios.py     vs ceiling, vs pytorch, threads needed
    node.py       Ranks, combine, launch: node scale under torchrun (per-rank, mean, total, scaling)
    sweep.py      profile(): the whole sweep, the ceiling measured before and after the rows it bounds
    report.py     Report: report.json, report.md; plot.py: report.png
    tune.py       tune(): the cheapest loader setting that feeds the ceiling, written to tune.json

Only ratios (against the model ceiling and against the `pytorch` backend) compare across machines.
"""

from tools.profiler.measure import DEFAULT_DURATION, DEFAULT_MAX_WARMUP, DEFAULT_WARMUP, DEFAULT_WINDOWS, Timing
from tools.profiler.plan import DATA_BACKENDS, MODES, ProfileConfig, Sweep, check_sweep, plan_configs
from tools.profiler.report import Report
from tools.profiler.row import ProfileRow
from tools.profiler.sweep import profile

__all__ = [
    "DATA_BACKENDS", "DEFAULT_DURATION", "DEFAULT_MAX_WARMUP", "DEFAULT_WARMUP", "DEFAULT_WINDOWS", "MODES",
    "ProfileConfig", "ProfileRow", "Report", "Sweep", "Timing", "check_sweep", "plan_configs", "profile",
]
