"""What a loader tune result is, and how `--num-threads auto` / `--hw-decoder-load auto` use one.

`saturate profile SHARDS --tune` (tools/profiler/tune.py) measures which loader setting feeds a training
configuration and writes an entry to tune.json; the trainer looks for an entry that matches its own run
and takes the setting from it. One file holds several entries (one per model/batch/machine), so a shard
folder can carry the tunes of every machine it is trained on.

An entry matches when what the setting depends on is the same: architecture, batch per GPU, image size,
precision, compile, backend, the augmentation policy (RandAugment costs a CPU loader several times a plain
crop), processes per node (8 loaders share a node's cores, one does not) and the machine (GPU model and
count, CPU model, usable cores). The corpus is the folder the file sits in.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.augment import DEFAULT_POLICY
from shards.process import cpu_model, processes_per_node, usable_cpus
from shards.schema import load_manifest
from shards.store import is_store_url
from training.config import AUTO, MAX_THREADS, ConfigError, TrainConfig, flag

TUNE_FILE = "tune.json"
FORMAT = "saturate-tune/1"
#: TrainConfig fields a tune entry's "setting" may set.
TUNED_FIELDS = ("num_threads", "prefetch_depth", "hw_decoder_load")


def machine_key() -> dict[str, Any]:
    """What makes a loader setting from one machine wrong on another."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu": cpu_model(),
        "cpu_usable": usable_cpus(),
    }


def match_key(*, arch: str, batch_size: int, image_size: int, precision: str, compile: bool, backend: str,
              processes_per_node: int, machine: dict[str, Any], augment: str = DEFAULT_POLICY) -> dict[str, Any]:
    """The fields an entry must share with a run to apply to it (batch_size: per process; augment: the policy's
    `AugmentPolicy.spec`, e.g. "randaugment(n=2,m=9)+random_erasing(0.25)")."""
    return {"arch": arch, "batch_size": batch_size, "image_size": image_size, "precision": precision,
            "compile": bool(compile), "backend": backend, "augment": augment,
            "processes_per_node": processes_per_node, "machine": machine}


def run_key(cfg: TrainConfig, *, world_size: int) -> dict[str, Any]:
    return match_key(arch=cfg.arch, batch_size=cfg.per_process_batch(world_size), image_size=cfg.image_size,
                     precision=cfg.precision, compile=cfg.compile, backend=cfg.backend,
                     processes_per_node=processes_per_node(), machine=machine_key(),
                     augment=cfg.augment_policy().spec)


def tune_path(cfg: TrainConfig) -> Path:
    """Where 'auto' looks: --tune-file, else tune.json next to the shards (in RUN_DIR when the shards are in an
    object store: the tune file is a local file, the store holds shards only)."""
    if cfg.tune_file:
        return Path(cfg.tune_file)
    return (Path(cfg.run_dir) if is_store_url(cfg.data or "") else Path(cfg.data or ".")) / TUNE_FILE


class TuneFileError(ConfigError):
    """A tune file that cannot be read as one; `path` and `reason` let the profiler say it in its own words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"--tune-file: {path} is not a tune result ({reason}); delete it or pass another")
        self.path, self.reason = path, reason


def read_entries(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a tune file; [] when it does not exist; a damaged file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT or not isinstance(body.get("entries"), list):
            raise ValueError(f"not a {FORMAT} file")
        for number, entry in enumerate(body["entries"]):  # a hand edit must not end in a traceback later
            if not (isinstance(entry, dict) and isinstance(entry.get("match"), dict)
                    and isinstance(entry.get("setting"), dict)):
                raise ValueError(f"entry {number} has no 'match' and 'setting' objects")
    except (ValueError, AttributeError) as err:
        raise TuneFileError(path, str(err)) from err
    return body["entries"]


def find_entry(path: str | os.PathLike, key: dict[str, Any]) -> dict[str, Any] | None:
    """The newest entry whose match is `key`. Entries written before the augmentation policy was part of the
    match were tuned with the default policy, and still match runs that use it."""
    def match(entry: dict[str, Any]) -> dict[str, Any]:
        return {"augment": DEFAULT_POLICY, **entry.get("match", {})}

    return next((e for e in reversed(read_entries(path)) if match(e) == key), None)


def add_entry(path: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """Write `entry` into the tune file at `path` (atomically), replacing an entry with the same match."""
    from shards.process import atomic_write

    entries = [e for e in read_entries(path) if e.get("match") != entry["match"]] + [entry]
    return atomic_write(path, json.dumps({"format": FORMAT, "entries": entries}, indent=1) + "\n")


def setting_flags(setting: dict[str, Any], *, backend: str) -> str:
    """The `saturate train` flags of an entry's setting."""
    text = f"--backend {backend} --num-threads {setting['num_threads']}"
    if setting.get("prefetch_depth") is not None:
        text += f" --prefetch-depth {setting['prefetch_depth']}"
    if setting.get("hw_decoder_load") is not None:
        text += f" --hw-decoder-load {setting['hw_decoder_load']:g}"
    return text


def make_entry(*, match: dict[str, Any], setting: dict[str, Any], backend: str, reached_target: bool, target: float,
               ceiling: tuple[float, float, float], images_per_sec_per_gpu: float, fraction_of_ceiling: float,
               stopped: str | None, notes: list[str], budget: dict[str, Any], corpus: dict[str, Any],
               machine: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One tune.json entry, the only place its fields are written (the profiler's tune calls it; `read_entries`,
    `find_entry` and `apply_entry` read it). match: `match_key(...)`. setting: TUNED_FIELDS -> value (None: the
    backend's default or no such knob). ceiling: images/s per GPU measured before and after the search, and the
    one the fractions are against. trials: every setting tried, with its figure (for people, not for matching)."""
    check_setting(setting, source="the tune")
    return {
        "match": match,
        "setting": {name: setting.get(name) for name in TUNED_FIELDS},
        "flags": setting_flags(setting, backend=backend),
        "reached_target": reached_target,
        "target": target,
        "ceiling_images_per_sec_per_gpu": ceiling[2],
        "ceiling_before_images_per_sec_per_gpu": ceiling[0],
        "ceiling_after_images_per_sec_per_gpu": ceiling[1],
        "images_per_sec_per_gpu": images_per_sec_per_gpu,
        "fraction_of_ceiling": fraction_of_ceiling,
        "stopped": stopped,
        "notes": notes,
        "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget": budget,
        "corpus": corpus,
        "machine": machine,
        "trials": trials,
    }


def needs_tune(cfg: TrainConfig) -> bool:
    return AUTO in (cfg.num_threads, cfg.hw_decoder_load)


def check_setting(setting: dict[str, Any], *, source: str | os.PathLike) -> None:
    """A tune entry's setting as the loader takes it, else a ConfigError naming `source` (the tune file) and
    the field: a hand-edited `"num_threads": 0` or `"abc"` was handed to the loader as it stood."""
    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"--tune-file: {source}: setting {name} {why}, got {setting.get(name)!r}; "
                              "delete the entry, tune again or give numbers")

    threads, depth, load = (setting.get(name) for name in TUNED_FIELDS)
    need(type(threads) is int and 1 <= threads <= MAX_THREADS, "num_threads", f"must be an integer in 1..{MAX_THREADS}")
    need(depth is None or (type(depth) is int and depth >= 1), "prefetch_depth", "must be an integer >= 1 or null")
    need(load is None or (type(load) in (int, float) and 0 <= load <= 1), "hw_decoder_load",
         "must be a number in [0, 1] or null")


def _figure(value: Any, spec: str) -> str:
    """`value` formatted with `spec` when it is a number; '?' for what a hand edit left (null, text)."""
    return format(value, spec) if type(value) in (int, float) else "?"


def apply_entry(cfg: TrainConfig, entry: dict[str, Any], *, source: str | os.PathLike = "the tune") -> tuple[
        TrainConfig, str]:
    """The config with its 'auto' loader options set from `entry`, and what was chosen, in words; `source`
    names where the entry came from in errors."""
    setting = entry["setting"]
    check_setting(setting, source=source)
    changes: dict[str, Any] = {}
    if cfg.num_threads == AUTO:
        changes["num_threads"] = setting["num_threads"]
        if cfg.prefetch_depth is None and setting.get("prefetch_depth") is not None:
            changes["prefetch_depth"] = setting["prefetch_depth"]
    if cfg.hw_decoder_load == AUTO:
        changes["hw_decoder_load"] = setting.get("hw_decoder_load")  # None: not dali-gpu, or its default
    chosen = ", ".join(f"{flag(k)} {v:g}" if isinstance(v, float) else f"{flag(k)} {v}" for k, v in changes.items()
                       if v is not None)  # a knob the backend lacks (hw_decoder_load off dali-gpu) stays unset
    why = (f"e2e {_figure(entry.get('fraction_of_ceiling'), '.2f')} of the ceiling "
           f"{_figure(entry.get('ceiling_images_per_sec_per_gpu'), '.0f')} img/s/GPU, "
           + ("the cheapest setting measured to reach " if entry.get("reached_target") else
              "the best reachable: no setting tried reached ") + _figure(entry.get("target"), ".2f"))
    return dataclasses.replace(cfg, **changes), f"{chosen} ({why})"


def resolve_auto(cfg: TrainConfig, *, world_size: int, is_main: bool, say: Callable[[str], None],
                 run_tune: Callable[[TrainConfig], dict[str, Any]] | None = None) -> TrainConfig:
    """`cfg` with 'auto' loader options replaced by a matching tune entry, or by a short tune (`run_tune`,
    supplied by the command line) when none matches; without either, a ConfigError that says what to run."""
    if not needs_tune(cfg):
        return cfg
    if cfg.backend == "synthetic":  # reads no data: nothing to tune
        auto = {"num_threads": 1, "hw_decoder_load": None}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in auto.items() if getattr(cfg, k) == AUTO})
        say(f"loader 'auto': --backend synthetic reads no data; --num-threads {cfg.num_threads}")
        return cfg
    path, key = tune_path(cfg), run_key(cfg, world_size=world_size)
    entry = find_entry(path, key)
    if entry is not None:
        cfg, chosen = apply_entry(cfg, entry, source=path)
        say(f"loader 'auto': {chosen}; from {path}, tuned {entry.get('tuned_at', '?')}")
        return cfg
    wanted = (f"{cfg.arch} batch {key['batch_size']} {cfg.image_size}px {cfg.precision} {cfg.backend} "
              f"--augment {key['augment']}, "
              f"{key['processes_per_node']} process(es) per node on this machine")
    if run_tune is None:
        raise ConfigError(f"--num-threads/--hw-decoder-load auto: no entry of {path} matches {wanted}; run "
                          f"`saturate profile {cfg.data} --tune ...` with the same settings, or give numbers")
    for split in (cfg.train_split, cfg.val_split):  # a missing split is found now, not after minutes of tuning
        load_manifest(cfg.data, split)
    say(f"loader 'auto': no entry of {path} matches {wanted}; running a short tune first")
    entry = run_tune(cfg)
    cfg, chosen = apply_entry(cfg, entry)
    saved = ""
    if is_main:
        try:
            saved = f"; saved to {add_entry(path, entry)}"
        except OSError as err:
            saved = f"; not saved ({err}): pass --tune-file to keep it"
    say(f"loader 'auto': {chosen}; from a short tune ({len(entry.get('trials', []))} trials){saved}")
    return cfg
