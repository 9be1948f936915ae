"""Is the GPU starved, and what would feed it? One run, one corpus, three measurements side by side.

    loader  each data backend alone (dali-gpu, dali-cpu, pytorch): how fast can it produce batches?
    model   the training step fed by the `synthetic` backend: the ceiling no loader can lift it above
    e2e     the training step fed by each data backend: what training actually gets, and the share of the
            wall time the step loop spent waiting for data

One module per step of the data flow; one row's measurement reads in plan.py and measure.py:

    plan.py     what to measure: ProfileConfig (each swept field declares its own axis), Sweep, plan_configs
    measure.py  how one configuration is measured: build loader and step, warm up until steady, timed windows
    gpu.py      GpuMonitor: NVML utilisation and memory of this process's GPU, found by UUID / PCI bus id
    row.py      what a row is: ProfileRow from its passes (or ranks), the stability rules, the ratios
    sweep.py    profile(): the whole sweep, the ceiling before and after its rows, node scale under torchrun
    report.py   Report: report.json, report.md, report.png, and the corpus and machine they were measured on
    tune.py     tune(): the cheapest loader setting that feeds the ceiling, written to tune.json

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
