"""What a profile measures: one `ProfileConfig` per point of the sweep, and the sweep itself.

Each axis multiplies only the configurations it changes (`AXES`): threads and prefetch depth the data
backends, `hw_decoder_load` dali-gpu only, precision and compile the training step (model and e2e modes).
The number of configurations is the product of the axes that matter, not of all of them.

A new loader axis is one field in `ProfileConfig` and `Sweep`, one line in `AXES`, one in `label()`, one
keyword where `tools/profiler/run.py` builds the loader, and one comma-list flag in tools/profile_cmd.py; the
augmentation policy (`--augment rrc-flip,randaugment`) was added that way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from pipeline.augment import DALI_ONLY, POLICIES  # light: pulls in neither torch nor DALI
from training.config import PRECISIONS

MODES: tuple[str, ...] = ("loader", "model", "e2e")
TRAINING_MODES: tuple[str, ...] = ("model", "e2e")
#: Backends that read the corpus; `synthetic` is the model mode's source, never profiled as a loader.
DATA_BACKENDS: tuple[str, ...] = ("dali-gpu", "dali-cpu", "pytorch")


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
    prefetch: int | None = None  # batches prefetched (DALI queue depth, per-worker for pytorch); None: default
    model_threads: int | None = None  # model on the CPU only: its intra-op threads (`with_cpu_model_threads`)
    augment: str | None = None  # data backends: the augmentation policy (pipeline.augment); None: the default

    def label(self) -> str:
        """Short human label of the swept axes, e.g. `dali-gpu t8 hw0.65 bs256 224px bf16 compile`."""
        parts = [self.backend]
        if self.threads is not None:
            parts.append(f"t{self.threads}")
        if self.hw_decoder_load is not None:
            parts.append(f"hw{self.hw_decoder_load:g}")
        if self.prefetch is not None:
            parts.append(f"pf{self.prefetch}")
        if self.augment is not None:
            parts.append(self.augment)
        parts += [f"bs{self.batch_size}", f"{self.image_size}px"]
        if self.precision is not None:
            parts.append(self.precision)
        if self.compile:
            parts.append("compile")
        if self.model_threads is not None:
            parts.append(f"mt{self.model_threads}")
        return " ".join(parts)

    def ceiling_key(self) -> tuple:
        """What the model ceiling of this row depends on: batch, image size and, for training rows, the step."""
        return self.batch_size, self.image_size, self.precision, self.compile


@dataclass(frozen=True)
class Sweep:
    """Every axis of a profile, as the lists to sweep (the command line's comma lists)."""

    modes: tuple[str, ...]
    backends: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    image_sizes: tuple[int, ...]
    threads: tuple[int, ...]
    hw_decoder_loads: tuple[float, ...]
    precisions: tuple[str, ...]
    compile_modes: tuple[bool, ...]
    prefetch_depths: tuple[int | None, ...] = (None,)
    augments: tuple[str | None, ...] = (None,)


#: Sweep field -> (ProfileConfig field, does this axis change the (mode, backend) configuration?)
AXES: dict[str, tuple[str, Callable[[str, str], bool]]] = {
    "threads": ("threads", lambda mode, backend: backend in DATA_BACKENDS),
    "hw_decoder_loads": ("hw_decoder_load", lambda mode, backend: backend == "dali-gpu"),
    "prefetch_depths": ("prefetch", lambda mode, backend: backend in DATA_BACKENDS),
    "augments": ("augment", lambda mode, backend: backend in DATA_BACKENDS),
    "precisions": ("precision", lambda mode, backend: mode in TRAINING_MODES),
    "compile_modes": ("compile", lambda mode, backend: mode in TRAINING_MODES),
}


def plan_configs(sweep: Sweep) -> list[ProfileConfig]:
    """Every configuration to run, in report order: model rows first (the ceiling), then loader, then e2e."""
    configs: list[ProfileConfig] = []
    for batch_size, image_size in itertools.product(sweep.batch_sizes, sweep.image_sizes):
        for mode in ("model", "loader", "e2e"):
            if mode not in sweep.modes:
                continue
            for backend in ("synthetic",) if mode == "model" else sweep.backends:
                base = ProfileConfig(mode, backend, batch_size, image_size)
                applied = [(field, getattr(sweep, name)) for name, (field, applies) in AXES.items()
                           if applies(mode, backend)]
                for values in itertools.product(*(v for _, v in applied)):
                    configs.append(replace(base, **{field: value for (field, _), value in
                                                    zip(applied, values, strict=True)}))
    return configs


def with_cpu_model_threads(configs: list[ProfileConfig], split: Callable[[int], int]) -> list[ProfileConfig]:
    """A model on the CPU shares the cores with the loader: `split(loader_threads)` gives the model's threads
    (the trainer's rule). Each e2e row gets its count, and each model row is measured at every count its e2e
    rows use and at the whole share (`split(0)`), the most threads first; the ceiling is the fastest of them
    (more threads are not faster when other processes hold the cores)."""
    out: list[ProfileConfig] = []
    for c in configs:
        if c.mode == "e2e":
            out.append(replace(c, model_threads=split(c.threads or 0)))
        elif c.mode == "model":
            counts = {split(0)} | {split(e.threads or 0) for e in configs
                                   if e.mode == "e2e" and e.ceiling_key() == c.ceiling_key()}
            out += [replace(c, model_threads=n) for n in sorted(counts, reverse=True)]
        else:
            out.append(c)
    return out


#: Sweep field -> the flag that sets it, for messages.
FLAGS = {"modes": "--modes", "backends": "--backends", "batch_sizes": "--batch-size", "image_sizes": "--image-size",
         "threads": "--threads", "hw_decoder_loads": "--hw-decoder-load", "precisions": "--precision",
         "compile_modes": "--compile", "prefetch_depths": "--prefetch", "augments": "--augment"}


def check_sweep(sweep: Sweep, *, steps: int | None, duration: float | None, warmup: int, windows: int,
                max_warmup: float = 0.0) -> None:
    """Reject a bad sweep before anything is built; each message names the flag to fix."""
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    s = sweep
    for name, flag in FLAGS.items():  # `--threads 4,4` would measure one configuration twice as two rows
        values = list(getattr(s, name))
        need(len(set(values)) == len(values), f"{flag}: each value once, got {values}")
    need(bool(s.modes) and set(s.modes) <= set(MODES), f"--modes: choose from {', '.join(MODES)}, got {list(s.modes)}")
    need(set(s.backends) <= set(DATA_BACKENDS),
         f"--backends: choose from {', '.join(DATA_BACKENDS)} (synthetic is the model mode), got {list(s.backends)}")
    need(bool(s.backends) or set(s.modes) == {"model"}, "--backends: none given")
    need(bool(s.batch_sizes) and all(isinstance(b, int) and b >= 1 for b in s.batch_sizes),
         f"--batch-size: integers >= 1, got {list(s.batch_sizes)}")
    need(bool(s.image_sizes) and all(isinstance(p, int) and p >= 1 for p in s.image_sizes),
         f"--image-size: integers >= 1 (pixels), got {list(s.image_sizes)}")
    need(bool(s.threads) and all(isinstance(n, int) and n >= 1 for n in s.threads),
         f"--threads: integers >= 1, got {list(s.threads)}")
    need(bool(s.hw_decoder_loads) and all(0.0 <= x <= 1.0 for x in s.hw_decoder_loads),
         f"--hw-decoder-load: fractions in [0, 1], got {list(s.hw_decoder_loads)}")
    need(bool(s.prefetch_depths) and all(p is None or (isinstance(p, int) and p >= 1) for p in s.prefetch_depths),
         f"--prefetch: integers >= 1 (batches), got {list(s.prefetch_depths)}")
    need(bool(s.augments) and all(a is None or a in POLICIES for a in s.augments),
         f"--augment: choose from {', '.join(POLICIES)}, got {list(s.augments)}")
    for policy in set(s.augments) & set(DALI_ONLY):  # a sweep row must never run a stand-in policy
        need("pytorch" not in s.backends, f"--augment: {policy} runs on dali-gpu/dali-cpu only "
             f"({DALI_ONLY[policy].split(';')[0]}); profile it without pytorch in --backends")
    need(bool(s.precisions) and set(s.precisions) <= set(PRECISIONS),
         f"--precision: choose from {', '.join(PRECISIONS)}, got {list(s.precisions)}")
    need(steps is None or duration is None, "give --steps or --duration, not both")
    need(steps is None or steps >= 1, f"--steps: an integer >= 1, got {steps}")
    # finite: `--duration inf` would time one window for ever, and NaN passes every comparison
    need(duration is None or (math.isfinite(duration) and duration > 0), f"--duration: seconds > 0, got {duration}")
    need(warmup >= 0, f"--warmup: steps >= 0, got {warmup}")
    need(windows >= 1, f"--windows: an integer >= 1, got {windows}")
    need(math.isfinite(max_warmup) and max_warmup >= 0, f"--max-warmup: seconds >= 0, got {max_warmup}")


def sweep_dict(sweep: Sweep) -> dict[str, list]:
    """The sweep as plain lists, for report.json's settings."""
    return {f.name: list(getattr(sweep, f.name)) for f in fields(sweep)}
