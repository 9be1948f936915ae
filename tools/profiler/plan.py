"""What a profile measures: one `ProfileConfig` per point of the sweep, and the sweep itself.

Each swept field of `ProfileConfig` declares its own axis in its field metadata (`axis(...)`, an `Axis`): the
comma-list flag that sets it and its help, how one value is parsed and range-checked, the values swept by
default, which configurations it changes (its scope), its label, and the keyword it is passed as. The rest
is derived from those fields: `Sweep` (the values of every axis), `plan_configs`, `check_sweep`'s checks,
`label()`, report.json's settings and rows, the table's columns (report.py), which pytorch row a row is
compared with (row.py), the loader's and the training step's keywords (measure.py), `run_profile`'s keywords
(sweep.py) and the command line's comma-list flags (tools/profile_cmd.py).

Each axis multiplies only the configurations it changes: threads, prefetch depth and the augmentation policy
the data backends (scope DATA), `hw_decoder_load` dali-gpu only (DALI_GPU), precision and compile the training
step of the model and e2e modes (TRAINING_STEP). The number of configurations is the product of the axes that
matter, not of all of them. A configuration reads loader first, then step: labels, table columns, flags and
the plan's loops take the loader's axes (in field order), then batch and image size, then the step's axes.

A new axis is one edit: a field appended to `ProfileConfig` (positional construction keeps working), declared
with `axis(...)`, whose arguments hold everything about it, its range check included (`valid=`/`expects=`, or
`**one_of(NAMES)`). A loader axis (scope DATA or DALI_GPU) names its `pipeline.build_loader` keyword and is
passed straight through; a step axis names its `training.step.TrainStep` keyword the same way. Two cases take
a second edit: a rule across axes (a policy pytorch cannot run) is a check in `check_sweep`, and a step axis
that is not a TrainStep keyword is used in measure.build_step. The data-order axis (`--order sample,shard`)
was added that way, as this one field:

    order: str | None = axis(
        "--order", "orders", str, "ORDER[,...]", "data backends: data orders to sweep, ...",
        default=(None,), **one_of(ORDERS, none=True), scope=DATA, label="{}", keyword="order")

Default `(None,)` means the loader's own default: no label, no value passed, and no table column unless a
row sets one. `saturate profile --tune` searches threads, prefetch and hw_decoder_load only (tune.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, make_dataclass, replace
from typing import Any

from pipeline.augment import DALI_ONLY, POLICIES  # light: pulls in neither torch nor DALI
from pipeline.constants import HW_DECODER_LOAD
from pipeline.order import DEFAULT_ORDER, ORDERS
from training.config import PRECISIONS

MODES: tuple[str, ...] = ("loader", "model", "e2e")
TRAINING_MODES: tuple[str, ...] = ("model", "e2e")
#: Backends that read the corpus; `synthetic` is the model mode's source, never profiled as a loader.
DATA_BACKENDS: tuple[str, ...] = ("dali-gpu", "dali-cpu", "pytorch")

#: An axis's scope: the (mode, backend) configurations it changes. Scopes DATA and DALI_GPU are the loader's
#: axes, TRAINING_STEP the training step's; an axis without a scope is the plan's frame, set in every configuration.
DATA, DALI_GPU, TRAINING_STEP = "data backends", "dali-gpu", "training step"
SCOPES: dict[str, Callable[[str, str], bool]] = {
    DATA: lambda mode, backend: backend in DATA_BACKENDS,
    DALI_GPU: lambda mode, backend: backend == "dali-gpu",
    TRAINING_STEP: lambda mode, backend: mode in TRAINING_MODES,
}


@dataclass(frozen=True)
class Axis:
    """How one `ProfileConfig` field is swept: its field metadata (see the module docstring)."""

    flag: str  # the comma-list flag that sets it
    sweep: str  # its `Sweep` field: report.json's settings key, run_profile's keyword
    parse: Callable[[str], Any]  # one item of the comma list; a ValueError names the flag (its __name__ says what)
    metavar: str
    help: str
    default: tuple | None  # values swept when not given; None: tools/profiler/sweep.py picks this machine's
    valid: Callable[[Any], bool]  # one value's range check ...
    expects: str  # ... in words: `--threads: integers >= 1, got [0]`
    scope: str | None = None  # a key of SCOPES; None: the frame (mode, backend, batch size, image size)
    label: str = ""  # label() format of a value; None and False are not labelled
    keyword: str | None = None  # the build_loader (loader axes) or TrainStep (step axes) keyword
    column: str | None = None  # the report table's column; None: the field's name

    @property
    def optional(self) -> bool:
        """Not swept unless asked: the loader's own default, and the table shows no column for it then."""
        return self.default == (None,)


def axis(flag: str, sweep: str, parse: Callable[[str], Any], metavar: str, help: str,  # noqa: A002 - argparse's
         **options: Any) -> Any:
    """A `ProfileConfig` field swept by `flag`. Frame fields are given for every configuration; the other
    axes are None where they do not apply."""
    spec = Axis(flag, sweep, parse, metavar, help, **options)
    return field(metadata={"axis": spec}) if spec.scope is None else field(default=None, metadata={"axis": spec})


def one_of(names: Sequence[str], *, none: bool = False, also: str = "") -> dict[str, Any]:
    """`valid` and `expects` of an axis whose values are names (None too when `none`: the loader's default)."""
    return {"valid": lambda value: (none and value is None) or value in names,
            "expects": f"choose from {', '.join(names)}{also}"}


def on_off(text: str) -> bool:
    """`--compile off,on`: on/off, true/false, 1/0."""
    value = text.lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ValueError(text)


on_off.__name__ = "on/off"  # argparse's message: "'maybe' is not a comma list of on/off"


def whole(unit: str = "", *, none: bool = False) -> dict[str, Any]:
    """`valid` and `expects` of an axis whose values are counts, integers >= 1 (None too when `none`)."""
    return {"valid": lambda n: (none and n is None) or (isinstance(n, int) and n >= 1),
            "expects": f"integers >= 1{unit}"}


@dataclass(frozen=True)
class ProfileConfig:
    """One point of the sweep. Axes that do not apply to the mode/backend are None (printed `-`)."""

    mode: str = axis(
        "--modes", "modes", str, "MODE[,MODE]", "any of loader,model,e2e (default: all three)",
        default=MODES, **one_of(MODES))
    backend: str = axis(  # a data backend, or synthetic (the model mode)
        "--backends", "backends", str, "BACKEND[,...]",
        "data backends: dali-gpu,dali-cpu,pytorch (default: dali-gpu,pytorch; dali-cpu,pytorch without a GPU)",
        default=None, **one_of(DATA_BACKENDS, also=" (synthetic is the model mode)"))
    batch_size: int = axis(  # images per step per GPU
        "--batch-size", "batch_sizes", int, "N[,N...]", "images per step per GPU (default 256)",
        default=(256,), **whole())
    image_size: int = axis(  # pixels, side of the square the model sees
        "--image-size", "image_sizes", int, "PX[,PX...]", "pixels (default 224)",
        default=(224,), **whole(" (pixels)"))
    threads: int | None = axis(  # DALI CPU threads or DataLoader worker processes
        "--threads", "threads", int, "N[,N...]",
        "DALI CPU threads / pytorch DataLoader workers (default: CPU cores per GPU)",
        default=None, **whole(), scope=DATA, label="t{}", keyword="num_threads")
    hw_decoder_load: float | None = axis(  # share of JPEGs sent to the hardware decoder
        "--hw-decoder-load", "hw_decoder_loads", float, "X[,X...]",
        f"dali-gpu only: share of JPEGs for the hardware decoder, 0-1 (default {HW_DECODER_LOAD})",
        default=(HW_DECODER_LOAD,), valid=lambda x: 0.0 <= x <= 1.0, expects="fractions in [0, 1]",
        scope=DALI_GPU, label="hw{:g}", keyword="hw_decoder_load", column="hw_load")
    precision: str | None = axis(
        "--precision", "precisions", str, "P[,P...]", "bf16,fp16,fp32 (default bf16)",
        default=("bf16",), **one_of(PRECISIONS), scope=TRAINING_STEP, label="{}", keyword="precision")
    compile: bool | None = axis(
        "--compile", "compile_modes", on_off, "off[,on]", "torch.compile off,on (default off)",
        default=(False,), valid=lambda on: on in (False, True), expects="off or on",
        scope=TRAINING_STEP, label="compile", keyword="compile")
    prefetch: int | None = axis(  # batches prefetched (DALI queue depth, per worker for pytorch)
        "--prefetch", "prefetch_depths", int, "N[,N...]",
        "batches prefetched: DALI queue depth, per worker for pytorch (default: the backend's)",
        default=(None,), **whole(" (batches)", none=True), scope=DATA, label="pf{}", keyword="prefetch_depth")
    #: model on the CPU only: its intra-op threads (`with_cpu_model_threads`); planned, not swept
    model_threads: int | None = None
    augment: str | None = axis(  # the augmentation policy (pipeline.augment)
        "--augment", "augments", str, "POLICY[,...]",
        f"data backends: augmentation policies to sweep, any of {','.join(POLICIES)} "
        "(default: the loaders' default, rrc-flip, and no augment column)",
        default=(None,), **one_of(POLICIES, none=True), scope=DATA, label="{}", keyword="augment")
    order: str | None = axis(  # the train data order (pipeline.order)
        "--order", "orders", str, "ORDER[,...]",
        f"data backends: data orders to sweep, any of {','.join(ORDERS)} (default: the loaders' default, "
        f"{DEFAULT_ORDER}, and no order column)",
        default=(None,), **one_of(ORDERS, none=True), scope=DATA, label="{}", keyword="order")

    def label(self) -> str:
        """Short human label of the swept axes, e.g. `dali-gpu t8 hw0.65 bs256 224px bf16 compile`."""
        def labels(names: tuple[str, ...]) -> list[str]:
            values = [(AXES[name], getattr(self, name)) for name in names]
            return [a.label.format(value) for a, value in values if value is not None and value is not False]

        threads = [] if self.model_threads is None else [f"mt{self.model_threads}"]
        return " ".join([self.backend, *labels(LOADER_AXES), f"bs{self.batch_size}", f"{self.image_size}px",
                         *labels(STEP_AXES), *threads])

    def ceiling_key(self) -> tuple:
        """What the model ceiling of this row depends on: batch, image size and, for training rows, the step."""
        return self.batch_size, self.image_size, *(getattr(self, name) for name in STEP_AXES)

    def loader_keywords(self) -> dict[str, Any]:
        """The `pipeline.build_loader` keywords of the loader's axes this configuration sets."""
        return {AXES[name].keyword: getattr(self, name) for name in LOADER_AXES if getattr(self, name) is not None}

    def step_keywords(self) -> dict[str, Any]:
        """The `training.step.TrainStep` keywords of the step's axes this configuration sets."""
        return {AXES[name].keyword: getattr(self, name) for name in STEP_AXES if getattr(self, name) is not None}


#: Field name -> its Axis, in field order.
AXES: dict[str, Axis] = {f.name: f.metadata["axis"] for f in fields(ProfileConfig) if "axis" in f.metadata}
#: The loader's axes and the training step's, each in field order: the order of labels, columns and flags.
LOADER_AXES: tuple[str, ...] = tuple(name for name, a in AXES.items() if a.scope in (DATA, DALI_GPU))
STEP_AXES: tuple[str, ...] = tuple(name for name, a in AXES.items() if a.scope == TRAINING_STEP)

#: Every axis of a profile as the values to sweep (the command line's comma lists): one tuple per axis, named
#: by its `Axis.sweep`, in ProfileConfig's field order; keyword-only, defaults from the axes.
Sweep = make_dataclass(
    "Sweep", [(a.sweep, tuple, field() if a.default is None else field(default=a.default)) for a in AXES.values()],
    frozen=True, kw_only=True, namespace={"__module__": __name__, "__doc__": "The values of every axis to sweep."})


def plan_configs(sweep: Sweep) -> list[ProfileConfig]:
    """Every configuration to run, in report order: model rows first (the ceiling), then loader, then e2e."""
    configs: list[ProfileConfig] = []
    for batch_size, image_size in itertools.product(sweep.batch_sizes, sweep.image_sizes):
        for mode in ("model", "loader", "e2e"):
            if mode not in sweep.modes:
                continue
            for backend in ("synthetic",) if mode == "model" else sweep.backends:
                applied = [name for name in LOADER_AXES + STEP_AXES if SCOPES[AXES[name].scope](mode, backend)]
                for values in itertools.product(*(getattr(sweep, AXES[name].sweep) for name in applied)):
                    configs.append(ProfileConfig(mode, backend, batch_size, image_size,
                                                 **dict(zip(applied, values, strict=True))))
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


def check_sweep(sweep: Sweep, *, steps: int | None, duration: float | None, warmup: int, windows: int,
                max_warmup: float = 0.0) -> None:
    """Reject a bad sweep before anything is built; each message names the flag to fix."""
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    swept = [(a, list(getattr(sweep, a.sweep))) for a in AXES.values()]
    for a, values in swept:  # `--threads 4,4` would measure one configuration twice as two rows
        need(len(set(values)) == len(values), f"{a.flag}: each value once, got {values}")
    for a, values in swept:
        if a.sweep == "backends" and not values:  # the model mode alone reads no corpus
            need(set(sweep.modes) == {"model"}, "--backends: none given")
        else:
            need(bool(values) and all(a.valid(v) for v in values), f"{a.flag}: {a.expects}, got {values}")
    for policy in set(sweep.augments) & set(DALI_ONLY):  # a sweep row must never run a stand-in policy
        need("pytorch" not in sweep.backends, f"--augment: {policy} runs on dali-gpu/dali-cpu only "
             f"({DALI_ONLY[policy].split(';')[0]}); profile it without pytorch in --backends")
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
