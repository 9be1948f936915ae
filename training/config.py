"""The one training configuration: a frozen dataclass with defaults in code, overrides from a YAML/TOML file
and the command line, validated at start, printed, saved in the run directory and inside every checkpoint.

It is flat on purpose: every field is also a command-line flag of the same name (`base_lr` <-> `--base-lr`),
so a validation error can name the flag a person types, and a config file is a plain `key: value` list.

The defaults are the ResNet-50 / 90-epoch ImageNet recipe described in `training/RECIPE.md`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.augment import (  # light: the pipeline imports DALI only when a loader is built
    DEFAULT_POLICY,
    POLICIES,
    RANDAUGMENT_M,
    RANDAUGMENT_N,
    AugmentPolicy,
    PolicyError,
    check_policy_use,
    make_policy,
)
from pipeline.base import BACKENDS, LoaderOptionError, check_loader_knobs
from pipeline.cache_use import check_cache_options
from pipeline.constants import CROP_AREA, HW_DECODER_LOAD
from pipeline.order import DEFAULT_ORDER, ORDER_CHUNK, check_order
from shards.schema import SPLIT_PATTERN
from shards.store import is_store_url, open_store

PRECISIONS = ("bf16", "fp16", "fp32")
MAX_IMAGE_SIZE = 8192  # pixels: a larger crop side is a typo, and would ask for terabytes of activations
MAX_THREADS = 1024  # loader threads per process
#: The value of a loader option (--num-threads, --hw-decoder-load) that a tune result decides.
AUTO = "auto"
LR_SCHEDULES = ("cosine", "linear", "step")
OPTIMIZERS = ("sgd", "adamw")


class ConfigError(ValueError):
    """A configuration value a person has to fix; the message starts with the flag that sets it."""


def _opt(default, help: str, **extra):  # noqa: A002 - `help` mirrors argparse
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    # --- data -------------------------------------------------------------------------------------------
    data: str | None = _opt(None, "directory or s3://BUCKET/PREFIX holding train and val shards "
                                  "(not needed with --backend synthetic)")
    train_split: str = _opt("train", "split to train on (read with augmentation and shuffling)")
    val_split: str = _opt("val", "split to evaluate on (centre crop, every sample exactly once)")
    backend: str = _opt("dali-gpu", f"data backend, one of {', '.join(BACKENDS)}")
    image_size: int = _opt(224, "training crop side in pixels (the final size when progressive resizing)")
    val_image_size: int | None = _opt(None, "validation crop side in pixels (default: --image-size)")
    crop_area: tuple[float, float] = _opt(CROP_AREA, "random-resized-crop area range, fraction of the image")
    order: str = _opt(DEFAULT_ORDER, "train data order: sample (a fresh sample-level order every epoch; a resume "
                      "continues mid-epoch on any process count with the same global batch) or shard (the shard "
                      "order reshuffled every epoch plus a shuffle buffer per rank: the cheapest reads; resumes "
                      "mid-epoch only on the same processes, backend and threads)")
    order_chunk: int | None = _opt(None, f"--order sample: samples read together from one shard (default "
                                   f"{ORDER_CHUNK}; smaller mixes small per-GPU batches better, larger writes fewer "
                                   "index files; see the README's Data order)")
    num_threads: int | str = _opt(4, "loader threads per process (DALI CPU threads / PyTorch workers), or 'auto': "
                                  "from a matching tune.json (`saturate profile --tune`), else a short tune first",
                                  auto=True)
    hw_decoder_load: float | str | None = _opt(None, "dali-gpu only: share of JPEG decoding on the hardware decoder "
                                               f"(0-1; default {HW_DECODER_LOAD}), or 'auto' (as --num-threads)",
                                               auto=True)
    prefetch_depth: int | None = _opt(None, "batches the loader prefetches (DALI queue depth; per worker for "
                                      "pytorch); default: the backend's, or the tuned one with --num-threads auto")
    tune_file: str | None = _opt(None, "tune.json that 'auto' reads (default: DATA/tune.json)")
    cache_dir: str | None = _opt(None, "s3:// --data: a node-local folder, shared by the node's processes, where "
                                 "whole shards are cached (downloaded ahead, verified, then read locally)")
    cache_limit: str | None = _opt(None, "bytes --cache-dir may hold, e.g. 200GB (default: its disk's free "
                                   "space); size it for train and val, see the README's 'Object storage'")
    synthetic_samples: int = _opt(1_281_167, "training samples per epoch with --backend synthetic")
    synthetic_val_samples: int = _opt(50_000, "validation samples with --backend synthetic")
    num_classes: int | None = _opt(None, "classes (default: from the train manifest; synthetic: 1000)")
    # progressive resizing (FFCV): the crop side ramps min_res -> image_size between two epochs
    min_res: int | None = _opt(None, "progressive resizing: crop side at the start (off when unset)")
    start_ramp: int = _opt(0, "progressive resizing: last epoch at --min-res")
    end_ramp: int = _opt(0, "progressive resizing: first epoch at --image-size")
    # --- augmentation and regularisation (training only; evaluation never sees them) --------------------
    augment: str = _opt(DEFAULT_POLICY, f"train augmentation policy after crop+flip, one of {', '.join(POLICIES)}")
    randaugment_n: int = _opt(RANDAUGMENT_N, "--augment randaugment: ops per image")
    randaugment_m: int = _opt(RANDAUGMENT_M, "--augment randaugment: magnitude bin, 0-30")
    random_erasing: float = _opt(0.0, "probability of erasing one random box per training image (0: off)")
    mixup: float = _opt(0.0, "mixup alpha: batches mixed with a Beta(alpha, alpha) weight (0: off)")
    cutmix: float = _opt(0.0, "cutmix alpha: a box pasted from the paired image, Beta(alpha, alpha) area (0: off)")
    mixup_switch_prob: float = _opt(0.5, "with --mixup and --cutmix: probability that a batch gets cutmix")
    ema_decay: float | None = _opt(None, "keep an EMA of the weights with this decay per update, e.g. 0.9999 "
                                   "(evaluated next to the model; off when unset)")
    ema_every: int = _opt(1, "optimizer steps between EMA updates")
    # --- model ------------------------------------------------------------------------------------------
    arch: str = _opt("resnet50", "any torchvision classification model by name")
    pretrained: str | None = _opt(None, "local torchvision state dict to start from (fine-tuning)")
    channels_last: bool = _opt(True, "keep weights and activations in NHWC memory layout")
    compile: bool = _opt(False, "wrap the model in torch.compile")
    precision: str = _opt("bf16", f"autocast precision, one of {', '.join(PRECISIONS)}")
    zero_init_residual: bool = _opt(True, "ResNets: start each residual branch's last BN at zero (Goyal et al. "
                                    "2017; DLE's and FFCV's recipes do not)")
    # --- optimisation (per-256 values; scaled with the global batch) --------------------------------------
    batch_size: int = _opt(256, "batch per process (per GPU) and micro-batch")
    global_batch_size: int | None = _opt(None, "images per optimizer step over all processes and accumulation "
                                         "steps; overrides --batch-size")
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step (DDP all-reduces on the last one only)")
    base_lr: float = _opt(0.256, "learning rate per 256 images; lr = base_lr * global_batch / 256")
    optimizer: str = _opt("sgd", f"optimizer, one of {', '.join(OPTIMIZERS)}")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "Nesterov momentum")
    adam_betas: tuple[float, ...] = _opt((0.9, 0.999), "AdamW betas")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    weight_decay: float = _opt(5e-5, "weight decay (L2 for SGD, decoupled for AdamW; not on BN/LN parameters, "
                               "biases and ConvNeXt's layer scale)")
    clip_grad_norm: float | None = _opt(None, "clip the global L2 norm of the gradients to this (off when unset)")
    label_smoothing: float = _opt(0.1, "label smoothing of the cross-entropy loss")
    epochs: int = _opt(90, "epochs; the LR schedule spans this many epochs")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (the schedule still spans --epochs)")
    warmup_epochs: float = _opt(5.0, "linear LR warm-up length in epochs")
    lr_schedule: str = _opt("cosine", f"LR decay after warm-up, one of {', '.join(LR_SCHEDULES)}")
    lr_milestones: tuple[int, ...] = _opt((30, 60, 80), "step schedule: epochs where the LR is multiplied")
    lr_gamma: float = _opt(0.1, "step schedule: factor applied at each milestone")
    # --- run ----------------------------------------------------------------------------------------------
    run_dir: str = _opt("runs/train", "directory for config, metrics, summary, curves and checkpoints")
    seed: int = _opt(0, "seed for model init and data order")
    deterministic: bool = _opt(False, "deterministic kernels (bit-exact resume on CPU; slower on GPU)")
    log_every: int = _opt(50, "optimizer steps between log lines (each one is a host sync)")
    throughput_warmup_steps: int = _opt(50, "steps after start/resize left out of the throughput averages")
    eval_every: int = _opt(1, "epochs between full validation passes (the last epoch is always evaluated)")
    checkpoint_minutes: float = _opt(30.0, "also checkpoint mid-epoch every this many minutes (0: off)")
    keep_last: int = _opt(3, "epoch/step checkpoints kept besides best.pt")
    resume: str | None = _opt(None, "'auto' (latest in RUN_DIR/checkpoints, if any) or a checkpoint path")
    evaluate_only: bool = _opt(False, "evaluate --resume or --pretrained weights on val and exit")
    progress: bool = _opt(True, "tqdm bar per epoch on rank 0")
    log_sample_keys: bool = _opt(False, "write the sample keys of every micro-batch to RUN_DIR/sample_keys/"
                                 "rank-NNN.jsonl (an audit of the data order; copies the keys to the host each step)")

    # --- derived values ---------------------------------------------------------------------------------
    def per_process_batch(self, world_size: int) -> int:
        """Images per process per micro-batch (the loader's batch): --global-batch-size split evenly over the
        processes and the accumulation steps, else --batch-size."""
        if self.global_batch_size is not None:
            return self.global_batch_size // (world_size * self.grad_accum_steps)
        return self.batch_size

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all processes and accumulation steps."""
        return self.per_process_batch(world_size) * world_size * self.grad_accum_steps

    def peak_lr(self, world_size: int) -> float:
        """Linear scaling rule (Goyal et al. 2017): lr = base_lr * global_batch / 256."""
        return self.base_lr * self.global_batch(world_size) / 256

    def image_size_at(self, epoch: int) -> int:
        """Training crop side for `epoch` (pixels): FFCV's linear ramp from --min-res at --start-ramp to
        --image-size at --end-ramp, rounded to the nearest multiple of 32 (as FFCV's `get_resolution`)."""
        if self.min_res is None or epoch >= self.end_ramp:
            return self.image_size
        if epoch <= self.start_ramp:
            return self.min_res
        frac = (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        size = self.min_res + frac * (self.image_size - self.min_res)
        return max(32, round(size / 32) * 32)

    def augment_policy(self) -> AugmentPolicy:
        """The train loader's augmentation policy (pipeline.augment), from --augment and its knobs."""
        return make_policy(augment=self.augment, randaugment_n=self.randaugment_n, randaugment_m=self.randaugment_m,
                           random_erasing=self.random_erasing)

    @property
    def eval_image_size(self) -> int:
        return self.val_image_size or self.image_size

    def to_dict(self) -> dict:
        """Plain Python types only (tuples become lists) so `torch.load(weights_only=True)` can read it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, object] = typing.get_type_hints(TrainConfig)


def flag(name: str) -> str:
    """The command-line flag that sets field `name`."""
    return "--" + name.replace("_", "-")


def _coerce(name: str, value: object, source: str) -> object:
    """Turn a file/CLI value into the field's type; errors name the flag and where the value came from."""
    hint = FIELD_TYPES[name]
    args = typing.get_args(hint)
    if FIELDS[name].metadata.get("auto") and value == AUTO:
        return AUTO  # resolved at start from a tune result (training/tuning.py)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag(name)}: may not be empty ({source})")
    union = optional or FIELDS[name].metadata.get("auto", False)  # `int | None`, `int | str`: the first type
    base = next((a for a in args if a is not type(None)), hint) if union else hint
    try:
        if typing.get_origin(base) is tuple:
            inner = typing.get_args(base)[0]
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(inner(x) for x in items)
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{flag(name)}: cannot read {value!r} as {base} ({source})") from err


def load_file(path: str | os.PathLike) -> dict:
    """Overrides from a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file of `field: value` pairs. A file that
    cannot be read or parsed is one ConfigError naming it and the problem (line and column where the parser
    gives them), never the parser's traceback."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config: {path} is a folder; give a .yaml, .toml or .json file")
    if not path.is_file():
        raise ConfigError(f"--config: file {path} does not exist")
    kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}.get(path.suffix)
    if kind is None:
        raise ConfigError(f"--config: {path} must end in .yaml, .yml, .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config: {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"--config: {path}: cannot be read ({err.strerror or err})") from None
    try:
        body = _parse(kind, text)
    except ValueError as err:  # tomllib's and json's errors are ValueErrors; _parse turns YAML's into one
        raise ConfigError(f"--config: {path}: not valid {kind} ({err})") from None
    if not isinstance(body, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option: value")
    return body


def _parse(kind: str, text: str) -> object:
    if kind == "TOML":
        import tomllib

        return tomllib.loads(text)
    if kind == "JSON":
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:  # its text spans several lines (context, a caret); keep where and what
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(where + (getattr(err, "problem", None) or str(err).splitlines()[0])) from None


def build_config(*, file: str | os.PathLike | None = None, overrides: dict | None = None,
                 check_paths: bool = True) -> TrainConfig:
    """Defaults <- file <- overrides (the CLI), each key checked against the fields, then validated.
    check_paths=False leaves out the checks of what a run reads only when it starts (--data, --resume,
    --pretrained): `--print-config` shows a recipe on a machine without the data."""
    values: dict = {}
    layers = [(load_file(file), f"from {file}")] if file else []
    layers.append((overrides or {}, "from the command line"))
    for layer, source in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"unknown option {key!r} ({source}); see `saturate train --help`")
            values[name] = _coerce(name, value, source)
    config = TrainConfig(**values)
    validate(config, check_paths=check_paths)
    return config


def from_dict(body: dict) -> TrainConfig:
    """Rebuild a config saved by `to_dict` (in a checkpoint or config.json); unknown keys are an error."""
    return build_config(overrides=body)


def validate(config: TrainConfig, *, check_paths: bool = True) -> None:
    """Checks that need no hardware: each failure is one line that starts with the flag to fix. check_paths:
    also that --data is given and exists and that --resume/--pretrained files exist (off for printing)."""
    c = config

    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{flag(name)}: {why}, got {getattr(c, name)!r}")

    for f in dataclasses.fields(c):  # every number finite and of a size a machine can hold
        values = getattr(c, f.name) if isinstance(getattr(c, f.name), tuple) else (getattr(c, f.name),)
        for value in values:
            if isinstance(value, float):
                need(math.isfinite(value), f.name, "must be a finite number")
            elif isinstance(value, int) and not isinstance(value, bool):
                need(abs(value) < 2**62, f.name, "is out of range")
    need(c.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}")
    try:  # the loader's own rule, reported with the flag
        check_order(c.order, train=True, chunk=c.order_chunk)
    except LoaderOptionError as err:
        raise ConfigError(f"{flag(err.keyword)}: {err.reason}, got {err.value!r}") from None
    need(0 <= c.seed < 2**32, "seed", "must be in [0, 2**32)")
    need(c.image_size <= MAX_IMAGE_SIZE, "image_size", f"must be <= {MAX_IMAGE_SIZE} pixels")
    need(c.val_image_size is None or c.val_image_size <= MAX_IMAGE_SIZE, "val_image_size",
         f"must be <= {MAX_IMAGE_SIZE} pixels")
    need(c.num_threads == AUTO or c.num_threads <= MAX_THREADS, "num_threads", f"must be <= {MAX_THREADS}")
    need(c.start_ramp >= 0, "start_ramp", "must be >= 0")
    need(c.end_ramp >= 0, "end_ramp", "must be >= 0")
    need(all(m >= 1 for m in c.lr_milestones), "lr_milestones", "must be epochs >= 1")
    for name in ("train_split", "val_split"):
        need(SPLIT_PATTERN.match(getattr(c, name)) is not None, name, "must be letters, digits and '_'")
    need(c.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
    need(c.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
    need(c.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    need(len(c.adam_betas) == 2 and all(0 <= b < 1 for b in c.adam_betas), "adam_betas", "must be two values in [0, 1)")
    need(c.adam_eps > 0, "adam_eps", "must be > 0")
    need(c.clip_grad_norm is None or c.clip_grad_norm > 0, "clip_grad_norm", "must be > 0")
    need(c.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    try:  # the loader's own checks (pipeline.augment), reported with the flag
        check_policy_use(c.augment_policy(), train=True, backend=c.backend)
    except PolicyError as err:
        raise ConfigError(f"{flag(err.keyword)}: {err.reason}, got {err.value!r}") from None
    need(c.mixup >= 0, "mixup", "must be >= 0 (0: off)")
    need(c.cutmix >= 0, "cutmix", "must be >= 0 (0: off)")
    need(0 <= c.mixup_switch_prob <= 1, "mixup_switch_prob", "must be a probability in [0, 1]")
    need(c.ema_decay is None or 0 < c.ema_decay < 1, "ema_decay", "must be in (0, 1)")
    need(c.ema_every >= 1, "ema_every", "must be >= 1")
    need(c.base_lr > 0, "base_lr", "must be > 0")
    need(c.batch_size > 0, "batch_size", "must be > 0")
    need(c.global_batch_size is None or c.global_batch_size > 0, "global_batch_size", "must be > 0")
    need(c.epochs > 0, "epochs", "must be > 0")
    need(c.max_steps is None or c.max_steps > 0, "max_steps", "must be > 0")
    need(c.image_size >= 32, "image_size", "must be >= 32 pixels")
    need(c.val_image_size is None or c.val_image_size >= 32, "val_image_size", "must be >= 32 pixels")
    need(len(c.crop_area) == 2 and 0 < c.crop_area[0] <= c.crop_area[1] <= 1, "crop_area",
         "must be two fractions 0 < min <= max <= 1")
    need(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 <= c.momentum < 1, "momentum", "must be in [0, 1)")
    need(0 <= c.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    need(c.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    need(c.num_threads == AUTO or c.num_threads > 0, "num_threads", "must be > 0 or 'auto'")
    need(c.hw_decoder_load in (None, AUTO) or 0.0 <= c.hw_decoder_load <= 1.0, "hw_decoder_load",
         "must be in [0, 1] or 'auto'")
    need(c.prefetch_depth is None or c.prefetch_depth > 0, "prefetch_depth", "must be > 0")
    try:  # the loader's own rules: a knob the backend lacks is refused, not ignored; so is a cache it cannot use
        check_loader_knobs(c.backend, prefetch_depth=c.prefetch_depth,
                           hw_decoder_load=None if c.hw_decoder_load == AUTO else c.hw_decoder_load)
        check_cache_options(c.backend, c.data if c.backend != "synthetic" else None, cache_dir=c.cache_dir,
                            cache_limit=c.cache_limit)
    except LoaderOptionError as err:
        raise ConfigError(f"{flag(err.keyword)}: {err.reason}, got {err.value!r}") from None
    need(c.log_every > 0, "log_every", "must be > 0")
    need(c.eval_every > 0, "eval_every", "must be > 0")
    need(c.keep_last > 0, "keep_last", "must be > 0")
    need(c.checkpoint_minutes >= 0, "checkpoint_minutes", "must be >= 0")
    need(c.throughput_warmup_steps >= 0, "throughput_warmup_steps", "must be >= 0")
    need(c.num_classes is None or c.num_classes > 1, "num_classes", "must be > 1")
    need(c.synthetic_samples > 0, "synthetic_samples", "must be > 0")
    need(c.synthetic_val_samples > 0, "synthetic_val_samples", "must be > 0")
    if c.min_res is not None:
        need(32 <= c.min_res <= c.image_size, "min_res", "must be between 32 and --image-size")
        need(0 <= c.start_ramp < c.end_ramp, "end_ramp", "must be > --start-ramp >= 0 with --min-res")
    need(0 < c.lr_gamma <= 1, "lr_gamma", "must be in (0, 1]")
    need(list(c.lr_milestones) == sorted(c.lr_milestones), "lr_milestones", "must be increasing")
    if c.backend != "synthetic":
        if check_paths:
            need(c.data is not None, "data", f"is required with --backend {c.backend}")
        if c.data is not None and is_store_url(c.data):  # the store is reached when the loaders open it; here
            try:  # only the URL's form
                open_store(c.data)
            except ValueError as err:
                raise ConfigError(f"--data: {err}") from None
        elif check_paths and Path(c.data).is_file():
            raise ConfigError(f"--data: {c.data} is a file; give the folder that holds the shards and their "
                              "manifests")
        elif check_paths:
            need(Path(c.data).is_dir(), "data", "directory does not exist")
    if c.evaluate_only:
        need(c.resume is not None or c.pretrained is not None, "evaluate_only",
             "needs --resume PATH|auto or --pretrained PATH")
    if check_paths and c.pretrained is not None:
        need(Path(c.pretrained).is_file(), "pretrained", "file does not exist")
    if check_paths and c.resume not in (None, "auto"):
        need(Path(c.resume).is_file(), "resume", "must be 'auto' or an existing checkpoint file")


def process_counts(global_batch: int, grad_accum_steps: int, *, most: int = 12) -> str:
    """Which process counts keep a global batch (each takes global_batch / (processes x accumulation) images
    per micro-batch), in words: what a resume on another number of GPUs may use."""
    if global_batch % grad_accum_steps:
        return (f"it is not a multiple of --grad-accum-steps {grad_accum_steps} either, so no process count "
                "keeps it")
    per_step = global_batch // grad_accum_steps
    counts = [n for n in range(1, per_step + 1) if per_step % n == 0]
    shown = ", ".join(map(str, counts[:most])) + (f", ... ({len(counts)} in all)" if len(counts) > most else "")
    return f"it runs on {shown} processes"


def validate_environment(config: TrainConfig, *, world_size: int, cuda: bool) -> None:
    """Checks that depend on the machine and the process group (called once the group is up)."""
    from training.model import is_classifier

    c = config
    if not is_classifier(c.arch):
        raise ConfigError(
            f"--arch: {c.arch!r} is not a torchvision classification model "
            f"(e.g. resnet50, resnet18, efficientnet_b0, convnext_tiny, vit_b_16)"
        )
    if c.global_batch_size is not None and c.global_batch_size % (world_size * c.grad_accum_steps):
        raise ConfigError(
            f"--global-batch-size: {c.global_batch_size} is not divisible by the world size {world_size}"
            + (f" x --grad-accum-steps {c.grad_accum_steps}" if c.grad_accum_steps > 1 else "")
            + f"; {process_counts(c.global_batch_size, c.grad_accum_steps)}"
        )
    if c.precision == "fp16" and not cuda:
        raise ConfigError("--precision: fp16 needs a CUDA GPU (fp16 autocast on CPU is not supported); "
                          "use bf16 or fp32")
    if c.backend == "dali-gpu" and not cuda:
        raise ConfigError("--backend: dali-gpu needs a CUDA GPU; use dali-cpu or pytorch on this machine")
