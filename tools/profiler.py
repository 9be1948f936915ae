"""Is the GPU starved, and what would feed it? One run, one corpus, three measurements side by side.

    loader  each data backend alone (dali-gpu, dali-cpu, pytorch): how fast can it produce batches?
    model   the training step fed by the `synthetic` backend: the ceiling no loader can lift it above
    e2e     the training step fed by each data backend: what training actually gets, and the share of the
            wall time the step loop spent waiting for data

Every configuration is a point in a sweep (batch size, image size, CPU threads, `hw_decoder_load`,
precision, torch.compile); each axis applies only to the modes and backends it changes, so the number of
configurations is the product of the axes that matter, not of all of them (`plan_configs`).

Measurement of one configuration (`measure`): `warmup` steps, a synchronize, then `windows` timed windows
bounded by steps or seconds. Images/s is reported as the median over windows with the min and max, so one
slow window (an epoch boundary, a compile, a page cache miss) shows as spread instead of moving the
headline figure. A configuration that fails (no GPU for dali-gpu, a loader that raises, out of memory)
becomes an error row holding the message; the profile goes on.

`profile(...)` runs the sweep and returns a `Report`, which writes report.json, report.md and report.png.
Only ratios (against the model ceiling and against the `pytorch` backend) compare across machines.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.constants import HW_DECODER_LOAD
from shards.cpus import usable_cpus
from training.config import PRECISIONS  # light imports: neither pulls in torch or DALI

MODES: tuple[str, ...] = ("loader", "model", "e2e")
#: Backends that read the corpus; `synthetic` is the model mode's source, never profiled as a loader.
DATA_BACKENDS: tuple[str, ...] = ("dali-gpu", "dali-cpu", "pytorch")
#: The baseline every other backend is compared with (its ratio column).
BASELINE_BACKEND = "pytorch"
DEFAULT_WINDOWS = 5  # timed windows per configuration
DEFAULT_WARMUP = 20  # steps before timing: DALI prefetch, cuDNN autotune, torch.compile
DEFAULT_DURATION = 15.0  # seconds of timed work per configuration when neither steps nor duration is given
CPU_TICKS_MEASURABLE = 20  # timed wall time below this many kernel clock ticks gives no CPU-busy figure
RESOLUTION_SAMPLE = 256  # images whose JPEG header is read to describe the corpus resolution
NA = "n/a"


# --- what is measured --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileConfig:
    """One point of the sweep. Axes that do not apply to the mode/backend are None (printed `-`)."""

    mode: str  # loader | model | e2e
    backend: str  # dali-gpu | dali-cpu | pytorch | synthetic (model mode)
    batch_size: int  # images per step per GPU
    image_size: int  # pixels, side of the square the model sees
    threads: int | None = None  # DALI CPU threads or DataLoader worker processes; None for synthetic
    hw_decoder_load: float | None = None  # dali-gpu only: share of JPEGs sent to the hardware decoder
    precision: str | None = None  # training modes only
    compile: bool | None = None  # training modes only

    def label(self) -> str:
        """Short human label of the swept axes, e.g. `dali-gpu t8 hw0.65 bs256 224px bf16 compile`."""
        parts = [self.backend]
        if self.threads is not None:
            parts.append(f"t{self.threads}")
        if self.hw_decoder_load is not None:
            parts.append(f"hw{self.hw_decoder_load:g}")
        parts += [f"bs{self.batch_size}", f"{self.image_size}px"]
        if self.precision is not None:
            parts.append(self.precision)
        if self.compile:
            parts.append("compile")
        return " ".join(parts)


@dataclass
class ProfileRow:
    """One configuration's figures; None means not measurable here (written `n/a`), never zero."""

    config: ProfileConfig
    error: str | None = None  # "<ExceptionType>: message" when the configuration failed
    timed_steps: int | None = None
    timed_seconds: float | None = None  # wall seconds over all timed windows
    images_per_sec_per_gpu: float | None = None  # median over windows
    images_per_sec_min: float | None = None
    images_per_sec_max: float | None = None
    step_time_ms: float | None = None  # median over windows of window wall time / steps
    data_wait_share: float | None = None  # e2e: fraction of wall time the host spent waiting in next(loader)
    cpu_cores_busy: float | None = None  # process + worker CPU seconds / wall seconds
    gpu_util_pct: float | None = None  # NVML, median of one sample per window
    gpu_memory_peak_gib: float | None = None  # torch.cuda.max_memory_allocated (torch tensors only)
    gpu_memory_used_gib: float | None = None  # NVML: whole device in use (includes DALI's and cuDNN's pools)
    vs_ceiling: float | None = None  # images/s / model ceiling images/s (same batch and image size)
    vs_pytorch: float | None = None  # images/s / the pytorch backend's, same mode and same other axes
    threads_needed: float | None = None  # loader: CPU threads to feed the ceiling, assuming linear scaling

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        return {**asdict(self.config), "label": self.config.label(), **body}


@dataclass
class Report:
    """Everything one profile measured, and the files it writes."""

    corpus: dict[str, Any]
    machine: dict[str, Any]
    settings: dict[str, Any]
    rows: list[ProfileRow]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "corpus": self.corpus,
            "machine": self.machine,
            "settings": self.settings,
            "notes": self.notes,
            "rows": [row.to_dict() for row in self.rows],
        }

    def ceiling(self, *, batch_size: int, image_size: int) -> float | None:
        """The model ceiling (images/s per GPU) for this batch and image size: the fastest model-mode row."""
        rates = [
            r.images_per_sec_per_gpu for r in self.rows
            if r.ok and r.config.mode == "model" and r.config.batch_size == batch_size
            and r.config.image_size == image_size
        ]
        return max(rates) if rates else None

    def table_markdown(self) -> str:
        """The side-by-side table: one line per configuration, `n/a` where a figure cannot be measured."""
        head = [
            "mode", "backend", "threads", "hw_load", "batch", "px", "precision", "compile", "img/s/GPU",
            "min-max", "step ms", "data wait", "CPU cores", "GPU util", "GPU mem GiB", "vs ceiling",
            "vs pytorch", "threads needed",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            c = row.config
            cells = [
                c.mode, c.backend, _axis(c.threads), _axis(c.hw_decoder_load), str(c.batch_size),
                str(c.image_size), _axis(c.precision), _axis(None if c.compile is None else ("on" if c.compile
                                                                                            else "off")),
            ]
            if not row.ok:
                message = row.error.replace("|", "/").replace("\n", " ")
                cells += [f"ERROR: {message}"] + [""] * (len(head) - len(cells) - 1)
            else:
                memory = row.gpu_memory_used_gib if row.gpu_memory_used_gib is not None else row.gpu_memory_peak_gib
                cells += [
                    _fmt(row.images_per_sec_per_gpu, "{:.0f}"),
                    f"{_fmt(row.images_per_sec_min, '{:.0f}')}-{_fmt(row.images_per_sec_max, '{:.0f}')}",
                    _fmt(row.step_time_ms, "{:.1f}"),
                    _fmt(row.data_wait_share, "{:.0%}", missing="-" if c.mode != "e2e" else NA),
                    _fmt(row.cpu_cores_busy, "{:.1f}"),
                    _fmt(row.gpu_util_pct, "{:.0f}%"),
                    _fmt(memory, "{:.1f}"),
                    _fmt(row.vs_ceiling, "{:.2f}x"),
                    _fmt(row.vs_pytorch, "{:.2f}x", missing="-" if c.mode == "model" else NA),
                    _fmt(row.threads_needed, "{:.3g}", missing="-" if c.mode != "loader" else NA),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        """report.md: corpus, machine, the table, and how to read it."""
        corpus, machine = self.corpus, self.machine
        out = ["# saturate profile", ""]
        for title, section in (("Corpus", corpus), ("Machine", machine), ("Settings", self.settings)):
            out += [f"## {title}", ""]
            out += [f"- {k}: {_fmt(v, '{:.4g}' if isinstance(v, float) else '{}')}" for k, v in section.items()]
            out += [""]
        if self.notes:
            out += ["## Notes", ""] + [f"- {note}" for note in self.notes] + [""]
        out += ["## Results", "", self.table_markdown()]
        out += [
            "img/s/GPU: median over timed windows (min-max beside it). data wait: share of the e2e wall time "
            "the step loop spent in next(loader). CPU cores: CPU seconds of this process and its workers per "
            "wall second. vs ceiling: against the model mode (synthetic data) at the same batch and image "
            "size. threads needed: CPU threads this loader needs to feed the ceiling, from its images/s per "
            "thread (assumes linear scaling; the thread sweep shows whether it holds). See docs/profiling.md.",
            "",
        ]
        return "\n".join(out)

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write report.json, report.md and report.png into `out_dir` (created); returns their paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "report.png"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        paths["md"].write_text(self.to_markdown())
        plot_report(self, paths["png"])
        return paths


def _axis(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _fmt(value: Any, spec: str = "{}", *, missing: str = NA) -> str:
    if value is None:
        return missing
    if isinstance(value, float) and not math.isfinite(value):
        return NA
    return spec.format(value)


# --- the sweep ------------------------------------------------------------------------------------------
def plan_configs(
    *,
    modes: Sequence[str],
    backends: Sequence[str],
    batch_sizes: Sequence[int],
    image_sizes: Sequence[int],
    threads: Sequence[int],
    hw_decoder_loads: Sequence[float],
    precisions: Sequence[str],
    compile_modes: Sequence[bool],
) -> list[ProfileConfig]:
    """Every configuration to run, in report order: model rows first (the ceiling), then loader, then e2e.

    Each axis multiplies only where it changes something: threads the data backends, `hw_decoder_load`
    dali-gpu only, precision and compile the training step only (model and e2e). The model mode reads
    synthetic data, so it ignores `backends`, threads and `hw_decoder_load`.
    """
    configs: list[ProfileConfig] = []
    for batch_size in batch_sizes:
        for image_size in image_sizes:
            training = [(p, c) for p in precisions for c in compile_modes]
            if "model" in modes:
                configs += [
                    ProfileConfig("model", "synthetic", batch_size, image_size, precision=p, compile=c)
                    for p, c in training
                ]
            for mode in ("loader", "e2e"):
                if mode not in modes:
                    continue
                for backend in backends:
                    loads = hw_decoder_loads if backend == "dali-gpu" else (None,)
                    for n in threads:
                        for load in loads:
                            for p, c in training if mode == "e2e" else [(None, None)]:
                                configs.append(ProfileConfig(mode, backend, batch_size, image_size, n, load, p, c))
    return configs


def check_sweep(
    *,
    modes: Sequence[str],
    backends: Sequence[str],
    batch_sizes: Sequence[int],
    image_sizes: Sequence[int],
    threads: Sequence[int],
    hw_decoder_loads: Sequence[float],
    precisions: Sequence[str],
    steps: int | None,
    duration: float | None,
    warmup: int,
    windows: int,
) -> None:
    """Reject a bad sweep before anything is built; each message names the flag to fix."""
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    need(bool(modes) and set(modes) <= set(MODES), f"--modes: choose from {', '.join(MODES)}, got {list(modes)}")
    need(set(backends) <= set(DATA_BACKENDS),
         f"--backends: choose from {', '.join(DATA_BACKENDS)} (synthetic is the model mode), got {list(backends)}")
    need(bool(backends) or set(modes) == {"model"}, "--backends: none given")
    need(bool(batch_sizes) and all(isinstance(b, int) and b >= 1 for b in batch_sizes),
         f"--batch-size: integers >= 1, got {list(batch_sizes)}")
    need(bool(image_sizes) and all(isinstance(s, int) and s >= 1 for s in image_sizes),
         f"--image-size: integers >= 1 (pixels), got {list(image_sizes)}")
    need(bool(threads) and all(isinstance(n, int) and n >= 1 for n in threads),
         f"--threads: integers >= 1, got {list(threads)}")
    need(bool(hw_decoder_loads) and all(0.0 <= x <= 1.0 for x in hw_decoder_loads),
         f"--hw-decoder-load: fractions in [0, 1], got {list(hw_decoder_loads)}")
    need(bool(precisions) and set(precisions) <= set(PRECISIONS),
         f"--precision: choose from {', '.join(PRECISIONS)}, got {list(precisions)}")
    need(steps is None or duration is None, "give --steps or --duration, not both")
    need(steps is None or steps >= 1, f"--steps: an integer >= 1, got {steps}")
    need(duration is None or duration > 0, f"--duration: seconds > 0, got {duration}")
    need(warmup >= 0, f"--warmup: steps >= 0, got {warmup}")
    need(windows >= 1, f"--windows: an integer >= 1, got {windows}")


def default_backends() -> tuple[tuple[str, ...], str | None]:
    """dali-gpu and pytorch on a GPU box; dali-cpu and pytorch without one, with a note saying so."""
    import torch

    if torch.cuda.is_available():
        return ("dali-gpu", "pytorch"), None
    return ("dali-cpu", "pytorch"), "no CUDA GPU visible: profiling dali-cpu and pytorch instead of dali-gpu"


def default_threads() -> int:
    """CPU cores per GPU: what one training rank of this machine can give its loader."""
    import torch

    return max(1, usable_cpus() // max(1, torch.cuda.device_count()))


def profile(
    shards_dir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    modes: Sequence[str] = MODES,
    backends: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (256,),
    image_sizes: Sequence[int] = (224,),
    threads: Sequence[int] | None = None,
    hw_decoder_loads: Sequence[float] = (HW_DECODER_LOAD,),
    precisions: Sequence[str] = ("bf16",),
    compile_modes: Sequence[bool] = (False,),
    arch: str = "resnet50",
    split: str = "train",
    steps: int | None = None,
    duration: float | None = None,
    warmup: int = DEFAULT_WARMUP,
    windows: int = DEFAULT_WINDOWS,
    progress: bool = True,
) -> Report:
    """Run the sweep over `<shards_dir>/<split>-*.tar` and return the Report (written to `out_dir` if given).

    backends: data backends for the loader and e2e modes; None picks `default_backends()`.
    threads: CPU threads (DALI) / worker processes (pytorch) to sweep; None is `default_threads()`.
    steps / duration: timed work per configuration, in steps or seconds (split over `windows` windows);
    neither given means `DEFAULT_DURATION` seconds. warmup: untimed steps first (compile happens there).
    """
    notes: list[str] = []
    if backends is None:
        backends, note = default_backends()
        if note:
            notes.append(note)
            if progress:  # say it before the long run starts; the CLI's summary repeats report.notes
                print(f"saturate profile: note: {note}", file=sys.stderr)
    threads = (default_threads(),) if threads is None else tuple(threads)
    if steps is None and duration is None:
        duration = DEFAULT_DURATION
    check_sweep(
        modes=list(modes), backends=list(backends), batch_sizes=list(batch_sizes), image_sizes=list(image_sizes),
        threads=list(threads), hw_decoder_loads=list(hw_decoder_loads), precisions=list(precisions),
        steps=steps, duration=duration, warmup=warmup, windows=windows,
    )
    import torch
    from tqdm import tqdm

    from shards.schema import SPLITS
    from training.model import is_classifier

    if split not in SPLITS:
        raise ValueError(f"--split: choose one of {', '.join(SPLITS)}, got {split!r}")
    if {"model", "e2e"} & set(modes) and not is_classifier(arch):
        # checked once here rather than as one error row per training configuration
        raise ValueError(f"--arch: {arch!r} is not a torchvision classification model")
    corpus = describe_corpus(shards_dir, split)
    machine = describe_machine()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    configs = plan_configs(
        modes=modes, backends=backends, batch_sizes=batch_sizes, image_sizes=image_sizes, threads=threads,
        hw_decoder_loads=hw_decoder_loads, precisions=precisions, compile_modes=compile_modes,
    )
    settings = {
        "shards_dir": str(shards_dir), "split": split, "arch": arch, "device": str(device),
        "modes": list(modes), "backends": list(backends), "batch_sizes": list(batch_sizes),
        "image_sizes": list(image_sizes), "threads": list(threads), "hw_decoder_loads": list(hw_decoder_loads),
        "precisions": list(precisions), "compile_modes": list(compile_modes), "steps": steps,
        "duration": duration, "warmup": warmup, "windows": windows, "configurations": len(configs),
    }
    if device.type != "cuda":
        notes.append("no CUDA GPU: GPU utilisation and memory are n/a, the model runs on the CPU")
    gpu_monitor = GpuMonitor(device)
    rows = []
    bar = tqdm(configs, desc="saturate profile", unit="config", disable=not progress, file=sys.stderr)
    for config in bar:
        bar.set_postfix_str(config.label())
        rows.append(run_config(
            config, shards_dir=shards_dir, split=split, arch=arch, num_classes=corpus.get("num_classes") or 1000,
            device=device, steps=steps, duration=duration, warmup=warmup, windows=windows, gpu_monitor=gpu_monitor,
        ))
    gpu_monitor.close()
    report = Report(corpus=corpus, machine=machine, settings=settings, rows=rows, notes=notes)
    add_ratios(report)
    if out_dir is not None:
        report.write(out_dir)
    return report


def add_ratios(report: Report) -> None:
    """Fill vs_ceiling, vs_pytorch and threads_needed from the measured rows (in place)."""
    def same_axes(a: ProfileConfig, b: ProfileConfig) -> bool:
        return (a.mode, a.batch_size, a.image_size, a.threads, a.precision, a.compile) == (
            b.mode, b.batch_size, b.image_size, b.threads, b.precision, b.compile)

    baselines = [r for r in report.rows if r.ok and r.config.backend == BASELINE_BACKEND]
    for row in report.rows:
        if not row.ok or not row.images_per_sec_per_gpu:
            continue
        c = row.config
        if c.mode == "model":
            # the ceiling of its own precision/compile: 1.0 for the fastest, the cost of the others
            same = [r.images_per_sec_per_gpu for r in report.rows if r.ok and r.config.mode == "model"
                    and (r.config.batch_size, r.config.image_size) == (c.batch_size, c.image_size)]
            row.vs_ceiling = row.images_per_sec_per_gpu / max(same)
            continue
        if c.mode == "e2e":
            ceilings = [r.images_per_sec_per_gpu for r in report.rows if r.ok and r.config.mode == "model" and (
                r.config.batch_size, r.config.image_size, r.config.precision, r.config.compile) == (
                c.batch_size, c.image_size, c.precision, c.compile)]
            ceiling = ceilings[0] if ceilings else None
        else:
            ceiling = report.ceiling(batch_size=c.batch_size, image_size=c.image_size)
        if ceiling:
            row.vs_ceiling = row.images_per_sec_per_gpu / ceiling
            if c.mode == "loader" and c.threads:
                per_thread = row.images_per_sec_per_gpu / c.threads  # images/s per CPU thread
                row.threads_needed = ceiling / per_thread
        base = next((b for b in baselines if same_axes(b.config, c)), None)
        if base is not None and base.images_per_sec_per_gpu:
            row.vs_pytorch = row.images_per_sec_per_gpu / base.images_per_sec_per_gpu


# --- one configuration ----------------------------------------------------------------------------------
def run_config(
    config: ProfileConfig,
    *,
    shards_dir: str | os.PathLike,
    split: str,
    arch: str,
    num_classes: int,
    device: Any,
    steps: int | None,
    duration: float | None,
    warmup: int,
    windows: int,
    gpu_monitor: GpuMonitor,
) -> ProfileRow:
    """Build the loader (and the training step), measure, tear down. Any exception becomes an error row."""
    import torch

    loader = step = None
    try:
        loader = _build_loader(config, shards_dir=shards_dir, split=split, num_classes=num_classes)
        if config.mode in ("model", "e2e"):
            step = _build_step(config, arch=arch, num_classes=loader.num_classes, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = measure(
            _endless(loader), step, config=config, device=device, steps=steps, duration=duration, warmup=warmup,
            windows=windows, gpu_monitor=gpu_monitor,
        )
    except Exception as err:  # a broken backend is a row of the report, not the end of the profile
        row = ProfileRow(config, error=f"{type(err).__name__}: {err}")
    finally:
        if loader is not None:
            try:
                loader.close()
            except Exception as err:  # closing a loader that failed mid-epoch may fail again; keep the row
                print(f"saturate profile: closing {config.label()} failed: {err}", file=sys.stderr)
        step = loader = None  # drop the model, its optimizer state and the loader's buffers ...
        if device.type == "cuda":
            torch.cuda.empty_cache()  # ... so the next configuration's memory figures start from empty
    return row


def _build_loader(config: ProfileConfig, *, shards_dir: str | os.PathLike, split: str, num_classes: int) -> Any:
    from pipeline import build_loader

    options: dict[str, Any] = {}
    if config.backend == "dali-gpu" and config.hw_decoder_load is not None:
        options["hw_decoder_load"] = config.hw_decoder_load
    if config.backend == "synthetic":
        # the ceiling must train the same head as e2e; a long epoch so no epoch boundary lands in a window
        options.update(num_classes=num_classes, num_samples=config.batch_size * 10_000)
        return build_loader(None, "train", train=True, batch_size=config.batch_size, image_size=config.image_size,
                            backend="synthetic", **options)
    # the training pipeline (augmentation, shuffle) whichever split's shards it reads: that is what feeds a step
    return build_loader(shards_dir, split, train=True, batch_size=config.batch_size, image_size=config.image_size,
                        backend=config.backend, num_threads=config.threads or 1, **options)


def _build_step(config: ProfileConfig, *, arch: str, num_classes: int, device: Any) -> Callable:
    """The trainer's own TrainStep (same code as `saturate train`), on a fresh model."""
    from training.model import build_model
    from training.optim import build_optimizer
    from training.step import TrainStep

    model = build_model(arch, num_classes=num_classes, channels_last=True).to(device)
    optimizer = build_optimizer(model, lr=0.1)
    return TrainStep(model, optimizer, precision=config.precision, compile=bool(config.compile))


def _endless(loader: Any) -> Iterator:
    """Batches across epoch boundaries: a new iter() starts the next epoch (the boundary is timed too)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"the {getattr(loader, 'backend', '?')} loader yielded no batch in an epoch")


def _window_plan(*, steps: int | None, windows: int) -> list[int] | None:
    """Steps per window when bounded by steps: `steps` split as evenly as possible over at most `windows`."""
    if steps is None:
        return None
    windows = min(windows, steps)
    return [steps // windows + (1 if w < steps % windows else 0) for w in range(windows)]


def measure(
    batches: Iterator,
    step: Callable | None,
    *,
    config: ProfileConfig,
    device: Any,
    steps: int | None,
    duration: float | None,
    warmup: int,
    windows: int,
    gpu_monitor: GpuMonitor,
) -> ProfileRow:
    """Time `step` over `batches` (or the loader alone when `step` is None) in timed windows.

    Sync discipline: inside a window the loop has no host sync -- no .item(), no .cpu(), no synchronize();
    the image count comes from the labels' shape (host metadata) and the clock is the host's. A window
    ends with exactly one torch.cuda.synchronize() so all work queued in it is finished before its end
    time is read: each window's time is honest, and the GPU is never drained in the middle of one.
    """
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def feed(images: Any, labels: Any) -> None:
        if step is None:
            return
        if images.device != device:  # a CPU backend feeding a GPU model: the copy is part of its cost
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        step(images, labels)

    for _ in range(warmup):
        feed(*next(batches)[:2])
    sync()

    plan = _window_plan(steps=steps, windows=windows)
    window_seconds = None if plan else duration / windows
    rates: list[float] = []  # images/s per window
    step_times: list[float] = []  # seconds per step, per window
    utils: list[float | None] = []  # NVML GPU utilisation %, one sample per window
    wait_total = wall_total = cpu_total = 0.0  # seconds
    steps_total = 0
    for w in range(len(plan) if plan else windows):
        cpu_start = cpu_seconds_snapshot()
        start = time.perf_counter()
        window_images = window_steps = 0
        window_wait = 0.0
        while True:
            asked = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - asked  # host time blocked on the loader
            feed(batch[0], batch[1])
            window_images += int(batch[1].shape[0])  # shape is host metadata: no sync
            window_steps += 1
            if plan:
                if window_steps >= plan[w]:
                    break
            elif time.perf_counter() - start >= window_seconds:
                break
        utils.append(gpu_monitor.utilization())  # sampled while the window's work is still running
        sync()  # the one host sync of this window
        wall = time.perf_counter() - start
        cpu_total += cpu_seconds_delta(cpu_start, cpu_seconds_snapshot())
        rates.append(window_images / wall)
        step_times.append(wall / window_steps)
        wait_total += window_wait
        wall_total += wall
        steps_total += window_steps

    utils = [u for u in utils if u is not None]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return ProfileRow(
        config,
        timed_steps=steps_total,
        timed_seconds=wall_total,
        images_per_sec_per_gpu=statistics.median(rates),
        images_per_sec_min=min(rates),
        images_per_sec_max=max(rates),
        step_time_ms=statistics.median(step_times) * 1e3,
        data_wait_share=wait_total / wall_total if config.mode == "e2e" else None,
        # the kernel counts CPU time in clock ticks (10 ms): below CPU_TICKS_MEASURABLE ticks of wall time the
        # quantisation error is larger than the figure, so it is n/a rather than a misleading 0.0
        cpu_cores_busy=cpu_total / wall_total if wall_total >= CPU_TICKS_MEASURABLE * _clock_tick() else None,
        gpu_util_pct=statistics.median(utils) if utils else None,
        gpu_memory_peak_gib=peak,
        gpu_memory_used_gib=gpu_monitor.memory_used_gib(),
    )


# --- CPU and GPU counters --------------------------------------------------------------------------------
def cpu_seconds_snapshot() -> dict[int | str, float]:
    """CPU seconds (user + system) of this process, of each live descendant (DataLoader workers), and of the
    descendants already reaped. Live children must be read one by one: the kernel adds a child's time to
    the parent's `children_*` counters only once it has been waited for."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    snapshot: dict[int | str, float] = {
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


def _clock_tick() -> float:
    """Seconds per kernel clock tick, the resolution of process CPU times (0.01 s on Linux)."""
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 0.01


def cpu_seconds_delta(before: dict[int | str, float], after: dict[int | str, float]) -> float:
    """CPU seconds spent between two snapshots. A child born in between counts from zero. A child that ended
    in between moved its whole lifetime into "reaped", so its time before the first snapshot is taken back
    out (DataLoader workers end at every epoch boundary; without this they were counted twice)."""
    spent = sum(seconds - before.get(key, 0.0) for key, seconds in after.items())
    spent -= sum(seconds for key, seconds in before.items() if key not in after)
    return max(spent, 0.0)


class GpuMonitor:
    """GPU utilisation and memory in use through NVML (nvidia-ml-py); every reading is None without a GPU
    or without NVML, so the report says `n/a` instead of a made-up zero."""

    def __init__(self, device: Any) -> None:
        self._handle = None
        if getattr(device, "type", "cpu") != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else 0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:  # NVML numbers all GPUs; torch numbers the visible ones
                index = int(visible.split(",")[index])
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # no NVML library, or a MIG/UUID device list NVML cannot map: utilisation is n/a
            self._handle = None

    def utilization(self) -> float | None:
        """Percent of the last NVML sample period (1/6 s to 1 s) in which a kernel was running."""
        if self._handle is None:
            return None
        return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def memory_used_gib(self) -> float | None:
        if self._handle is None:
            return None
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30

    def close(self) -> None:
        if self._handle is not None:
            self._nvml.nvmlShutdown()
            self._handle = None


# --- corpus and machine -----------------------------------------------------------------------------------
def describe_corpus(shards_dir: str | os.PathLike, split: str, *, sample: int = RESOLUTION_SAMPLE) -> dict:
    """Images, classes, mean JPEG size (exact, from the DALI indexes) and mean resolution (JPEG headers of
    `sample` images spread evenly over the split; headers only, nothing is decoded)."""
    from PIL import Image

    from shards.schema import IMAGE_EXT, load_manifest, parse_index, shard_files

    manifest = load_manifest(shards_dir, split)
    members: list[tuple[Path, int, int]] = []  # (tar, offset, size) of every image, bytes
    for tar, idx in shard_files(shards_dir, manifest):
        for sample_members in parse_index(idx.read_text(), idx):
            members += [(tar, m.offset, m.size) for m in sample_members if m.ext == IMAGE_EXT]
    if not members:
        raise ValueError(f"{shards_dir}: the {split} indexes list no .{IMAGE_EXT} member")
    chosen = [members[i * len(members) // min(sample, len(members))] for i in range(min(sample, len(members)))]
    widths, heights = [], []
    for tar, offset, size in chosen:
        with open(tar, "rb") as f:
            f.seek(offset)
            raw = f.read(size)
        try:
            with Image.open(io.BytesIO(raw)) as image:
                widths.append(image.width)
                heights.append(image.height)
        except Exception as err:
            raise ValueError(f"{tar}: the JPEG at byte {offset} has an unreadable header ({err})") from err
    sizes = [size for _, _, size in members]
    return {
        "shards_dir": str(Path(shards_dir).resolve()),
        "split": split,
        "images": manifest.num_samples,
        "num_classes": manifest.num_classes,
        "shards": len(manifest.shards),
        "total_gb": sum(s.bytes for s in manifest.shards) / 1e9,
        "mean_jpeg_kb": statistics.fmean(sizes) / 1e3,
        "mean_width_px": statistics.fmean(widths),
        "mean_height_px": statistics.fmean(heights),
        "mean_megapixels": statistics.fmean(w * h for w, h in zip(widths, heights, strict=True)) / 1e6,
        "resolution_sample": len(chosen),
    }


def describe_machine() -> dict:
    """What makes figures from two machines comparable or not: GPU, driver, CPU, library versions."""
    import PIL
    import torch
    from PIL import features

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    gpu_name = driver = None
    if torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name()
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception:  # NVML missing: the driver stays n/a rather than failing the profile
            driver = None
    return {
        "gpu": gpu_name,
        "gpu_count": torch.cuda.device_count(),
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable_cpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali_version,
        "pillow": PIL.__version__,
        # Pillow-SIMD publishes versions like 9.0.0.post1; libjpeg-turbo is what makes plain Pillow decode fast
        "pillow_simd": ".post" in PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# --- the picture ----------------------------------------------------------------------------------------
BACKEND_COLOURS = {"dali-gpu": "tab:green", "dali-cpu": "tab:olive", "pytorch": "tab:blue", "synthetic": "tab:gray"}


def plot_report(report: Report, path: str | os.PathLike) -> None:
    """report.png: one panel per mode that reads data (loader, e2e), a bar per configuration coloured by
    backend, the model ceiling as a horizontal line per batch/image size. Model-only profiles get bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("loader", "e2e") if any(r.config.mode == m for r in report.rows)]
    if not panels:
        panels = ["model"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.6 * len(report.rows) + 3), 3.6 * len(panels)),
                             squeeze=False)
    ceilings = {}
    for r in report.rows:
        if r.ok and r.config.mode == "model":
            key = (r.config.batch_size, r.config.image_size)
            ceilings[key] = max(ceilings.get(key, 0.0), r.images_per_sec_per_gpu)
    for ax, mode in zip(axes[:, 0], panels, strict=True):
        rows = [r for r in report.rows if r.config.mode == mode]
        labels = [r.config.label() for r in rows]
        values = [r.images_per_sec_per_gpu if r.ok else 0.0 for r in rows]
        colours = [BACKEND_COLOURS.get(r.config.backend, "tab:purple") for r in rows]
        # whiskers: the slowest and fastest timed window around the median bar
        spread = [[v - r.images_per_sec_min if r.ok else 0.0 for v, r in zip(values, rows, strict=True)],
                  [r.images_per_sec_max - v if r.ok else 0.0 for v, r in zip(values, rows, strict=True)]]
        ax.bar(range(len(rows)), values, color=colours, yerr=spread, capsize=3, ecolor="0.3")
        for x, r in enumerate(rows):
            if not r.ok:
                ax.text(x, 0, "error", rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
        if mode != "model":
            for (batch_size, image_size), ceiling in ceilings.items():
                ax.axhline(ceiling, color="black", linestyle="--", linewidth=1)
                ax.text(len(rows) - 0.5, ceiling, f" ceiling bs{batch_size} {image_size}px: {ceiling:.0f}",
                        va="bottom", ha="right", fontsize=8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("images/s per GPU")
        ax.set_title({"loader": "loader alone", "e2e": "training step fed by the loader",
                      "model": "training step on synthetic data (ceiling)"}[mode])
        if ceilings or any(values):
            top = [r.images_per_sec_max for r in rows if r.ok]
            ax.set_ylim(0, max([*top, *ceilings.values(), 1.0]) * 1.15)
    machine = report.machine
    fig.suptitle(f"{report.settings.get('arch')} on {machine.get('gpu') or 'CPU'}, "
                 f"{machine.get('cpu_usable')} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
