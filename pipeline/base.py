"""What every backend shares: argument checks, the rank's slice of a split, epoch length and resume state.

Train in `sample` order (pipeline.order, the default): every epoch is a fresh order of the whole split, and
global micro-batch m (batch_size x world_size consecutive samples of it) is split among the ranks, so every
rank yields len(split) // (batch_size x world_size) batches and a position is the number of samples the whole
job has consumed in the epoch. A state saved at a position continues there on any backend, process count or
thread count, as long as the position is a whole number of the new loader's global micro-batches; it continues
bit for bit (augmentation included) when the loader is the same.

Val, and train in `shard` order, follow DALI's sharding rule on every backend (so they agree sample for sample):
the split is the concatenation of the manifest's shards in manifest order, and rank `r` of `W` owns the
contiguous global sample range `[n*r//W, n*(r+1)//W)` (`shard_id`/`num_shards`). Shares differ by at most one
sample and sum to `n`, so val sees every sample exactly once. Train drops each rank's last partial batch and
every rank yields the same number of batches (the smallest share's), so DDP never waits on a rank that has one
batch fewer; a `shard`-order state continues only on the loader that saved it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards.cached_store import CachedStore
from shards.process import environment_place, job_place, under_torchrun
from shards.schema import Manifest, ShardFormatError, check_split_name, load_manifest, shard_files
from shards.store import Store, open_store

BACKENDS: tuple[str, ...] = ("dali-gpu", "dali-cpu", "pytorch", "synthetic")
#: Keys of `state_dict()` that must match the loader it is restored into; the rest is position and RNG.
#: `augment` is the policy's spec (pipeline.augment.AugmentPolicy.spec).
STATE_IDENTITY = ("backend", "split", "train", "batch_size", "image_size", "rank", "world_size", "seed", "augment",
                  "order")
#: Identity values of states saved before the key existed (states from before `order` were `shard` order).
STATE_DEFAULTS = {"augment": "rrc-flip", "order": "shard"}
#: Keys of a `sample`-order state that its position depends on: a state sharing them continues at its position
#: whatever the backend, process count, micro-batch or thread count.
ORDER_IDENTITY = ("split", "train", "seed", "order", "split_samples", "split_digest", "order_chunk")


def check_arguments(
    *, split: str, train: bool, backend: str, batch_size: int, image_size: int, rank: int, world_size: int,
    crop_area: tuple[float, float],
) -> None:
    """Reject bad flags before anything is opened, naming the flag."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    check_split_name(split, "split")
    if not isinstance(train, bool):
        raise TypeError(f"train must be True (augment, shuffle, drop the last partial batch) or False (centre "
                        f"crop, every sample once), got {train!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1 (pixels), got {image_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    low, high = crop_area
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop_area must satisfy 0 < min <= max <= 1 (fractions of image area), got {crop_area}")


class LoaderOptionError(ValueError):
    """A loader knob a person has to fix (like pipeline.augment.PolicyError); `keyword` is the build_loader
    argument that sets it."""

    def __init__(self, keyword: str, value: object, reason: str) -> None:
        super().__init__(f"{keyword}={value!r}: {reason}")
        self.keyword, self.value, self.reason = keyword, value, reason


#: build_loader's speed knobs and the backends that have them; the others refuse a value (None: the default).
KNOB_BACKENDS: dict[str, tuple[str, ...]] = {
    "prefetch_depth": ("dali-gpu", "dali-cpu", "pytorch"),  # batches in flight (per worker for pytorch)
    "hw_decoder_load": ("dali-gpu",),  # share of JPEGs for the GPU's hardware decoder
}


def check_loader_knobs(backend: str, *, prefetch_depth: int | None = None,
                       hw_decoder_load: float | None = None) -> None:
    """The one check of the speed knobs: in range, and only for a backend that has the knob (a value the
    backend would ignore is refused, as a policy is). Raises LoaderOptionError naming the keyword."""
    given = {"prefetch_depth": prefetch_depth, "hw_decoder_load": hw_decoder_load}
    for keyword, value in given.items():
        if value is not None and backend not in KNOB_BACKENDS[keyword]:
            raise LoaderOptionError(keyword, value, f"backend {backend!r} has no such knob; it applies to "
                                    f"{', '.join(KNOB_BACKENDS[keyword])} (leave it unset)")
    if prefetch_depth is not None and (isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int)
                                       or prefetch_depth < 1):
        raise LoaderOptionError("prefetch_depth", prefetch_depth, "must be an integer >= 1 (batches)")
    if hw_decoder_load is not None and (isinstance(hw_decoder_load, bool)
                                        or not isinstance(hw_decoder_load, (int, float))
                                        or not 0.0 <= hw_decoder_load <= 1.0):
        raise LoaderOptionError("hw_decoder_load", hw_decoder_load, "must be a fraction in [0, 1]")


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) of this process. Unset, they come from shards.process.job_place (the initialised
    process group, else torchrun's environment, else 0 of 1). Values given that disagree with the group or the
    environment are refused: under torchrun, a loader that silently read the whole split on every rank would
    train on each sample W times per epoch."""
    place, source = job_place()
    actual = (place.rank, place.world_size)
    if rank is None and world_size is None:
        return actual
    if rank is None or world_size is None:
        raise ValueError(f"pass both rank and world_size or neither (got rank={rank!r}, world_size={world_size!r})")
    if source is not None and (rank, world_size) != actual:
        raise ValueError(
            f"rank={rank}, world_size={world_size} disagree with {source} (rank {actual[0]} of {actual[1]}); "
            "pass neither to read this process's share"
        )
    return rank, world_size


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's augmentation stream: distinct per rank, same for a seed (the shard order uses `seed`)."""
    return (seed * 1_000_003 + rank) % 2**31


def resolve_options(backend: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The backend's options with its defaults filled in; an unknown option is a TypeError naming it."""
    unknown = set(given) - set(defaults)
    if unknown:
        raise TypeError(f"backend {backend!r} has no option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **given}


def open_split(
    shards_dir: str | os.PathLike | None, split: str, *, cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
) -> tuple[Store, Manifest, list[tuple[Path | str, Path | str]]]:
    """The store (opened once: on S3 each opening builds boto3 clients), the split's manifest and its (tar, idx)
    paths or URLs (`shards_dir` is a folder or a store URL such as s3://bucket/prefix), every shard checked
    cheaply against its record (exists, size, sample count: `shards.schema.shard_files`). A shard that does
    not match is a ShardReadError naming it: training must never start on shards that are not the ones the
    manifest describes. With `cache_dir`, the store is read through a node-local shard cache of at most
    `cache_limit` bytes (shards.cached_store; its downloader starts with pipeline.cache_use.start_cache)."""
    if shards_dir is None:
        raise ValueError("shards_dir is required for every backend but 'synthetic'")
    store = open_store(shards_dir)
    manifest = load_manifest(store, split)
    if cache_dir is not None:
        store = CachedStore(store, cache_dir, manifest, limit=cache_limit)
    try:
        pairs = shard_files(store, manifest)
    except ShardFormatError as err:
        raise ShardReadError(str(err)) from err
    if manifest.num_samples < 1:
        raise ValueError(f"{store}: the {split} manifest lists no samples")
    return store, manifest, pairs


class ShardReadError(RuntimeError):
    """A shard could not be read or one of its samples could not be decoded; the message names them."""


#: Seconds a failed read may spend looking for the damaged shard before it gives up and says where to look.
DIAGNOSE_BUDGET = 30.0  # seconds


def diagnose_shards(shards_dir: str | os.PathLike, manifest: Manifest, *, budget: float = DIAGNOSE_BUDGET) -> str:
    """After a read failure whose message does not name the sample (DALI's decoder reports only the sample's
    position in the batch): check the split's shards with `shards.verify.check_shard` (sizes, sha256,
    index, structure, a Pillow decode of every image) until one has a problem or `budget` seconds pass. The
    text ends with what to do: re-convert a damaged shard; when every shard is sound, look at the read itself."""
    from shards.store import StoreError
    from shards.verify import check_shard

    started = time.perf_counter()
    for checked, record in enumerate(manifest.shards):
        if time.perf_counter() - started > budget:
            return (
                f"no damaged shard among the first {checked} of {len(manifest.shards)} within {budget:.0f} s; "
                f"run `saturate shards verify {shards_dir} --decode` to check them all"
            )
        try:
            problems = check_shard(shards_dir, record, manifest.num_classes, True,
                                   max_pixels=manifest.max_pixels).problems
        except StoreError as err:  # the store itself failed (gone, refusing): that is the diagnosis
            return f"the shards could not be checked: {err}"
        if problems:
            return "damaged: " + "; ".join(problems[:5]) + "; re-convert the damaged shard"
    return (f"all {len(manifest.shards)} shards of the {manifest.split} split pass `shards verify --decode`, so "
            "the shards are sound and the read itself failed (for a store: the endpoint or the object URL DALI "
            "used; see DALI's message)")


def local_cuda_device(device_id: int | None) -> int:
    """CUDA device index for this process: `device_id`, else $LOCAL_RANK (torchrun), else the current device."""
    import torch

    if device_id is not None:
        return device_id
    return environment_place().local_rank if under_torchrun() else torch.cuda.current_device()


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Global sample range [start, end) rank `rank` reads each epoch (DALI's shard_id/num_shards rule)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def batches_per_epoch(*, train: bool, num_samples: int, batch_size: int, world_size: int, rank: int) -> int:
    """Batches rank `rank` yields per epoch: train, the smallest rank's full batches; val, all its samples."""
    if train:
        return (num_samples // world_size) // batch_size
    start, end = rank_range(num_samples, rank, world_size)
    return -(-(end - start) // batch_size)


class StateMismatch(ValueError):
    """A saved loader state that this loader cannot continue (another split, seed, order, ...); `key` names
    what differs. The trainer then starts the epoch's order afresh and says so."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def check_state(state: dict[str, Any] | None, expected: dict[str, Any]) -> dict[str, Any] | None:
    """Validate a `state_dict()` against the loader being built; errors (StateMismatch) name the mismatching
    flag."""
    if state is None:
        return None
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict from loader.state_dict(), got {type(state).__name__}")
    defaults = {**STATE_DEFAULTS, "order": STATE_DEFAULTS["order"] if state.get("train") else None}
    for key in expected:
        if key == "split_digest" and key not in state:  # a state saved before the digest: unknown, not changed
            continue
        saved = state.get(key, defaults.get(key))
        if saved != expected[key]:
            what = "the split's shards changed since (re-converted?)" if key == "split_digest" else (
                f"the saved loader state has {key}={saved!r}, this loader has {key}={expected[key]!r}")
            raise StateMismatch(f"cannot resume: {what}; rebuild with the same {key} or pass state=None", key)
    return state


class Loader:
    """The one interface every backend implements.

    Iterating is one epoch of `(images, labels)`; the next `iter()` starts the next epoch (an epoch left
    unfinished is finished first, without yielding). `len()` is the number of batches one pass yields for
    this rank: the full epoch, or after a resume mid-epoch only the batches still to come in that epoch.
    """

    backend: str
    split: str
    train: bool  # augment, shuffle and drop each rank's last partial batch; else centre crop, every sample once
    augment: str  # the augmentation policy's spec (pipeline.augment); "rrc-flip" for val and synthetic
    order: str | None = None  # train: "sample" or "shard" (pipeline.order); None for val
    order_chunk: int | None = None  # `sample` order: samples read together from one shard
    split_samples: int = 0  # samples in the split (the manifest's count)
    split_digest: str | None = None  # `sample` order: the manifest's content_digest (the shards it counts on)
    batch_size: int
    num_samples: int  # samples this rank yields per full epoch
    num_classes: int
    wnids: list[str] | None = None  # the manifest's classes in index order (None: synthetic data)
    store: Store | None = None  # where the shards are read from (None: synthetic data)
    device: Any  # torch.device

    def __init__(self) -> None:
        self.epoch = 0  # epochs fully consumed
        self.batch_in_epoch = 0  # batches of the current epoch already yielded
        self.batches_per_epoch = 0
        self.resumed_at = 0  # batch the current epoch started from: 0, or k after a resume mid-epoch
        self._pass_started = False  # a pass over the current epoch began in this process

    def __len__(self) -> int:
        return self.batches_per_epoch - self.resumed_at

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self.resumed_at = 0
        self._pass_started = False

    def _sample_order_length(self, split_samples: int) -> None:
        """Epoch length in `sample` order: every rank yields split // (batch_size x world_size) batches (a
        ValueError when the split holds no global micro-batch)."""
        self.batches_per_epoch = split_samples // (self.batch_size * self.world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.store}: the {self.split} split has {split_samples} samples, too few for "
                             f"world_size={self.world_size} x batch_size={self.batch_size}")
        self.num_samples = self.batches_per_epoch * self.batch_size

    def _restore(self, state: dict[str, Any] | None) -> dict[str, Any] | None:
        """Check a saved state against this loader (errors name the flag) and continue from its position. Returns
        the state when the backend may also restore its own part (random state): always in `shard` order, in
        `sample` order only when the state comes from a loader like this one (else the position alone is kept and
        augmentation draws afresh)."""
        if state is not None and self.order == "sample" and state.get("order") == "sample":
            check_state(state, {key: getattr(self, key) for key in ORDER_IDENTITY})
            width = self.batch_size * self.world_size  # the global micro-batch, samples
            position = int(state["position"])
            if position % width:
                raise ValueError(f"cannot resume: the saved loader state is {position} samples into epoch "
                                 f"{state['epoch']}, not a whole number of this loader's global micro-batches of "
                                 f"{width} (batch_size {self.batch_size} x world_size {self.world_size}); keep the "
                                 "global batch of the run that saved it")
            self.epoch, self.batch_in_epoch = int(state["epoch"]), position // width
            self.resumed_at = self.batch_in_epoch
            same = all(state.get(key, STATE_DEFAULTS.get(key)) == value for key, value in self.identity().items())
            return state if same else None
        state = check_state(state, self.identity())
        if state is not None:
            self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.resumed_at = self.batch_in_epoch
        return state

    # --- what a backend supplies: the next batch, and how to start and finish a pass ----------------------
    def _next_batch(self) -> tuple:
        """The next batch of the current epoch, `(images, labels)` (plus keys when asked for)."""
        raise NotImplementedError

    def _start_pass(self) -> None:
        """Prepare reading the current epoch from `batch_in_epoch` on (e.g. start DataLoader workers)."""

    def _complete_epoch(self) -> None:
        """Finish the current epoch without yielding the rest (a backend drains or stops what is in flight)."""
        self._end_epoch()

    def _epoch(self, epoch: int) -> Iterator:
        """The rest of epoch `epoch`; the epoch is completed when its last batch was taken."""
        while self.epoch == epoch and self.batch_in_epoch < self.batches_per_epoch:
            if isinstance(self.store, CachedStore):
                self.store.raise_failure()  # a cache that cannot go on (a full disk) stops the epoch, named
            batch = self._next_batch()
            self.batch_in_epoch += 1
            yield batch
        if self.epoch == epoch:  # not already completed by state_dict() or a new pass
            self._complete_epoch()

    def __iter__(self) -> Iterator:
        if self._pass_started:  # the previous pass was abandoned mid-epoch: finish that epoch first
            self._complete_epoch()
        self._pass_started = True
        self._start_pass()
        self.resumed_at = self.batch_in_epoch
        return self._epoch(self.epoch)

    def identity(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in STATE_IDENTITY}

    def state_dict(self) -> dict[str, Any]:
        """Position and RNG state as plain Python types; `build_loader(..., state=...)` continues here."""
        if self.batch_in_epoch == self.batches_per_epoch:  # all yielded: the state is the next epoch's start
            self._complete_epoch()
        state = {**self.identity(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        if self.order == "sample":  # the position any loader of this split and seed can continue from
            state.update(position=self.batch_in_epoch * self.batch_size * self.world_size,
                         split_samples=self.split_samples, split_digest=self.split_digest,
                         order_chunk=self.order_chunk)
        return state

    def close(self) -> None:
        pass

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
