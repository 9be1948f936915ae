"""`pytorch` backend: torch DataLoader over the same shards with the webdataset library, Pillow decode and
torchvision's functional augmentations -- the strong baseline people use when they do not use DALI.

Per worker process, as webdataset stages (each a short function over an iterable of samples):

    shard list -> open each tar from the store -> webdataset's tar expander and key grouping -> keep this
    worker's sample range -> shuffle buffer (train) -> skip samples already consumed (resume)
    -> decode + augment (Pillow; the `augment=` policy through torchvision.transforms.v2,
    pipeline.augment.TorchvisionPolicy) -> batches of uint8 NHWC

Shards are opened through `shards.store`: a file in a folder, or an S3 object streamed by boto3 (a read that
breaks is resumed from the byte reached a bounded number of times, then fails naming the URL); webdataset's
own stages turn either stream into samples, so both give the same samples in the same order.

Batches cross the process boundary as uint8 (4x less than float32), are pinned, copied with
`non_blocking=True` and normalised on the device into float16 channels_last, like the DALI backends.
Random erasing travels as one box per sample and is applied on the device after normalisation.

Train in `sample` order (pipeline.order, the default): the rank's micro-batches of the epoch are the same as on
the DALI backends; batch j of a pass goes to worker j % K, which reads each of its samples by the offsets in the
shard's index (one read per sample: a file read, or one ranged GET), and the DataLoader's round-robin hands the
batches over in order. The RNG of a sample is seeded by (seed, epoch, its position in the epoch's stream), so
the augmentation too is the same on any number of processes or workers, and a resume anywhere is exact.

Val, and train in `shard` order (webdataset stages above):
rank `r` reads the same contiguous global sample range as DALI (pipeline.base); inside a rank,
DataLoader worker `w` of `K` reads the w-th contiguous slice of that range. Train reshuffles the shard order
every epoch (one global order from `seed` and the epoch, the same on every rank) and drops each worker's
last partial batch; val keeps the manifest order and yields every sample once.

Randomness is per sample: the crop, the flip and the seed of the policy's torchvision ops come from an RNG
seeded by (seed, epoch, rank, worker, position in that worker's stream), so results do not depend on process
timing, and a resume reproduces the uninterrupted run exactly. Resume works because torch's DataLoader takes
batches from its workers strictly round-robin (skipping exhausted ones): after `k` batches we know how many batches each
worker produced and which worker produces batch `k`; the restored loader skips those samples in each worker
before decoding and rotates the worker ids so that worker produces first.

Undecodable samples: fail, never skip (the converter rejects what Pillow cannot decode); the error names
the tar and the sample key.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import constants as C
from pipeline.augment import AugmentPolicy, erase_boxes_
from pipeline.base import (
    Loader,
    ShardReadError,
    local_cuda_device,
    open_split,
    rank_range,
    resolve_options,
)
from pipeline.cache_use import pass_order, start_workers_cache, stop_cache
from pipeline.order import (
    SampleReader,
    epoch_stream,
    rank_batches,
    sample_order_index,
)
from pipeline.pillow import Augment, collate
from pipeline.workers import end_pass, leave_stop_signals_to_parent, start_pass
from shards.store import Store, StoreError

#: Batches in flight per DataLoader worker when build_loader's `prefetch_depth` is None (torch's default).
PREFETCH_DEPTH = 2
#: Backend options the `pytorch` backend accepts, with their defaults.
PYTORCH_OPTIONS: dict[str, Any] = {
    "shuffle_buffer": C.SHUFFLE_BUFFER,  # samples per rank, shared out among its workers
    "with_keys": False,  # test/debug: also yield the list of sample keys of each batch
}


# --- the epoch plan: which samples each worker reads, in which order ------------------------------------
def shard_order(num_shards: int, *, train: bool, seed: int, epoch: int) -> list[int]:
    """Manifest order for val; for train a permutation that changes every epoch and is the same on all ranks."""
    order = list(range(num_shards))
    if train:
        random.Random(f"shard-order:{seed}:{epoch}").shuffle(order)
    return order


def worker_ranges(num_samples: int, *, rank: int, world_size: int, num_workers: int) -> list[tuple[int, int]]:
    """[start, end) in the epoch's global sample order for each worker of this rank (contiguous slices)."""
    start, end = rank_range(num_samples, rank, world_size)
    count = end - start
    return [(start + count * w // num_workers, start + count * (w + 1) // num_workers) for w in range(num_workers)]


def units_for_range(counts: list[int], order: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """(shard index, first sample, number of samples) covering global positions [start, end) of `order`."""
    units, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(end, offset + counts[shard])
        if lo < hi:
            units.append((shard, lo - offset, hi - lo))
        offset += counts[shard]
    return units


def worker_batches(samples: int, batch_size: int, *, train: bool) -> int:
    return samples // batch_size if train else math.ceil(samples / batch_size)


def round_robin(batches: list[int], limit: int) -> list[int]:
    """Worker of each batch, in the order torch's DataLoader yields them (round-robin over live workers)."""
    order = [w for r in range(max(batches, default=0)) for w in range(len(batches)) if batches[w] > r]
    return order[:limit]


# --- per-worker stages ----------------------------------------------------------------------------------
def keep_ranges(samples: Iterable[dict], ranges: dict[str, tuple[int, int]]) -> Iterator[dict]:
    """Keep samples `first .. first+count-1` of each tar (the worker's slice, by tar name: a cached tar's URL is
    its local path); a tar that ends early (truncated, or not the tar the manifest describes) is an error naming
    it, never a silently shorter epoch."""
    position: dict[str, int] = {}
    urls: dict[str, str] = {}
    for sample in samples:
        name = sample["__url__"].rsplit("/", 1)[-1]
        urls[name] = sample["__url__"]
        index = position.get(name, 0)
        position[name] = index + 1
        first, count = ranges[name]
        if first <= index < first + count:
            yield sample
    for name, (first, count) in ranges.items():
        if position.get(name, 0) < first + count:
            raise ShardReadError(
                f"{urls.get(name, name)}: ended after {position.get(name, 0)} samples, the manifest promises at "
                f"least {first + count}; the shard is truncated or was replaced, re-convert it"
            )


def unreadable_tar(exn: Exception) -> bool:
    """webdataset error handler: fail (never skip) with the tar's path, which webdataset appends to the args."""
    url = exn.args[-1] if exn.args else "<unknown tar>"
    if isinstance(exn, StoreError):  # the store's message names the URL and why (gone, refused, dropped)
        raise ShardReadError(f"{str(exn.args[0]).split(' @ ')[0]}; the shard could not be read from the store") from exn
    raise ShardReadError(f"{url}: not a readable tar ({exn.args[0] if exn.args else exn}); re-convert it") from exn


def open_shards(names: Iterable[str], store: Store) -> Iterator[dict]:
    """{"url", "stream"} per shard name, what webdataset's tar expander reads (webdataset's own `url_opener`
    would open S3 URLs with a command-line tool; the store streams them with boto3 and resumes broken reads)."""
    for name in names:
        url = str(store.url(name))
        try:
            stream = store.open(name)
        except Exception as exn:
            exn.args = exn.args + (url,)
            unreadable_tar(exn)
        yield {"url": url, "stream": stream}
        stream.close()  # the expander is done with it (a cached copy is held while it is open)


def skip(samples: Iterable[dict], count: int) -> Iterator[dict]:
    """Drop the first `count` samples without decoding them (resume), numbering the rest by position."""
    for position, sample in enumerate(samples):
        if position >= count:
            sample["__position__"] = position
            yield sample


class RankShare(IterableDataset):
    """This rank's samples for one epoch; each DataLoader worker reads its own slice (see module doc)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        p = self.plan
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = (physical + p["rotation"]) % p["num_workers"]  # rotated so the right worker goes first
        units = p["units"][worker]
        ranges = {p["tars"][shard]: (first, count) for shard, first, count in units}
        prefix = f"{p['seed']}:{p['epoch']}:{p['rank']}:{worker}"
        stages: list[Any] = [
            lambda: open_shards([p["tars"][shard] for shard, _, _ in units], p["store"]),
            lambda streams: tar_file_expander(streams, handler=unreadable_tar),
            lambda files: group_by_keys(files, handler=unreadable_tar),
            lambda samples: keep_ranges(samples, ranges),
        ]
        if p["train"]:
            # the rank's buffer is split across its workers: host memory matches DALI's reader buffer
            buffer = max(1, p["shuffle_buffer"] // p["num_workers"])
            stages.append(wds.shuffle(buffer, initial=buffer, rng=random.Random(f"shuffle:{prefix}")))
        augment = Augment(
            train=p["train"], image_size=p["image_size"], crop_area=p["crop_area"], seed_prefix=f"aug:{prefix}",
            policy=p["policy"],
        )
        stages += [
            lambda samples: skip(samples, p["skip"][worker] * p["batch_size"]),
            lambda samples: map(augment, samples),
            wds.batched(p["batch_size"], collation_fn=collate, partial=not p["train"]),
        ]
        return iter(wds.DataPipeline(*stages))


class SampleOrderBatches(IterableDataset):
    """This rank's micro-batches of one epoch in `sample` order (see the module docstring)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator:
        p = self.plan
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        read = SampleReader(p["store"], p["index"])
        augment = Augment(train=True, image_size=p["image_size"], crop_area=p["crop_area"],
                          seed_prefix=f"aug:{p['seed']}:{p['epoch']}", policy=p["policy"])
        width, batch_size = p["batch_size"] * p["world_size"], p["batch_size"]
        try:
            for j in range(worker, len(p["batches"]), workers):
                start = (p["first_batch"] + j) * width + p["rank"] * batch_size  # stream position of its first
                yield collate([augment(read(int(sample), start + i)) for i, sample in enumerate(p["batches"][j])])
        finally:
            read.close()


class PytorchLoader(Loader):
    """`pytorch` behind the common Loader interface (see the module docstring)."""

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        split: str,
        *,
        train: bool,
        batch_size: int,
        image_size: int,
        backend: str,
        rank: int,
        world_size: int,
        num_threads: int,
        seed: int,
        device_id: int | None,
        state: dict[str, Any] | None,
        crop_area: tuple[float, float],
        policy: AugmentPolicy,
        order: str | None = None,
        order_chunk: int | None = None,
        prefetch_depth: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        **backend_options: Any,
    ) -> None:
        super().__init__()
        import PIL.Image  # noqa: F401  imported here so forked workers inherit them instead of
        import torchvision.transforms.functional  # noqa: F401  importing them again every epoch (seconds)
        import torchvision.transforms.v2  # noqa: F401
        import webdataset  # noqa: F401

        self.options = resolve_options(backend, backend_options, PYTORCH_OPTIONS)
        self.prefetch_depth = PREFETCH_DEPTH if prefetch_depth is None else prefetch_depth
        self.store, manifest, _ = open_split(shards_dir, split, cache_dir=cache_dir, cache_limit=cache_limit)
        self.backend, self.split, self.batch_size, self.image_size = backend, split, batch_size, image_size
        self.rank, self.world_size, self.seed, self.crop_area = rank, world_size, seed, crop_area
        self.num_classes, self.wnids = manifest.num_classes, manifest.wnids
        self.tars = [record.name for record in manifest.shards]  # names in the store; open_split checked them
        self.counts = [record.num_samples for record in manifest.shards]
        self.total = manifest.num_samples
        self.train, self.order, self.split_samples = train, order, manifest.num_samples
        self.policy, self.augment = policy, policy.spec
        self.num_workers = max(int(num_threads), 0)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_cuda_device(device_id))
        else:
            self.device = torch.device("cpu")
        mean = torch.tensor(C.IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * C.PIXEL_MAX
        std = torch.tensor(C.IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * C.PIXEL_MAX
        self._mean, self._inv_std = mean, 1.0 / std
        self._batches = None  # the DataLoader iterator of the pass in progress
        if order == "sample":
            self.order_chunk, self._index = order_chunk, sample_order_index(self.store, manifest, backend_options)
            self.split_digest = manifest.content_digest
            self._sample_order_length(manifest.num_samples)
            self._restore(state)  # the position is all there is to restore: randomness is per stream position
            start_workers_cache(self)
            return

        # Batches per worker do not depend on the shard order, so the epoch length is fixed: train takes the
        # smallest rank's count so every rank yields the same number of batches.
        workers = max(self.num_workers, 1)
        per_rank = [
            [
                worker_batches(end - start, batch_size, train=self.train)
                for start, end in worker_ranges(self.total, rank=r, world_size=world_size, num_workers=workers)
            ]
            for r in range(world_size)
        ]
        self.worker_batch_counts = per_rank[rank]
        self.batches_per_epoch = min(map(sum, per_rank)) if self.train else sum(per_rank[rank])
        start, end = rank_range(self.total, rank, world_size)
        if self.batches_per_epoch == 0 or end == start:
            raise ValueError(
                f"{self.store}: the {split} split has {self.total} samples, too few for world_size="
                f"{world_size} x batch_size={batch_size} x num_threads={num_threads} (train drops each worker's "
                "last partial batch)"
            )
        self.num_samples = self.batches_per_epoch * batch_size if self.train else end - start
        self._restore(state)
        start_workers_cache(self)

    def identity(self) -> dict[str, Any]:
        # In `shard` order the worker count shapes each worker's slice, the skip counts on resume and the epoch
        # length, so a state taken with another count cannot continue there.
        return {**super().identity(), "num_threads": self.num_workers}

    def _sample_plan(self) -> dict[str, Any]:
        """What the workers of a `sample`-order pass need: the rank's batches from `batch_in_epoch` on."""
        stream = epoch_stream(self._index.counts, seed=self.seed, epoch=self.epoch, chunk=self.order_chunk)
        batches = rank_batches(stream, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size)
        return {"store": self.store, "index": self._index, "batches": batches[self.batch_in_epoch:],
                "first_batch": self.batch_in_epoch, "batch_size": self.batch_size, "world_size": self.world_size,
                "rank": self.rank, "seed": self.seed, "epoch": self.epoch, "image_size": self.image_size,
                "crop_area": tuple(self.crop_area), "policy": self.policy}

    def _plan(self) -> dict[str, Any]:
        """Everything a worker needs for the current epoch, resuming after `batch_in_epoch` batches."""
        workers = max(self.num_workers, 1)
        order = shard_order(len(self.tars), train=self.train, seed=self.seed, epoch=self.epoch)
        ranges = worker_ranges(self.total, rank=self.rank, world_size=self.world_size, num_workers=workers)
        consumed = round_robin(self.worker_batch_counts, self.batches_per_epoch)
        done = consumed[: self.batch_in_epoch]
        rotation = consumed[self.batch_in_epoch] if self.batch_in_epoch < len(consumed) else 0
        return {
            "store": self.store,
            "tars": self.tars,
            "units": [units_for_range(self.counts, order, start, end) for start, end in ranges],
            "num_workers": workers,
            "rotation": rotation,
            "skip": [done.count(w) for w in range(workers)],
            "train": self.train,
            "image_size": self.image_size,
            "crop_area": tuple(self.crop_area),
            "policy": self.policy,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.options["shuffle_buffer"],
            "seed": self.seed,
            "epoch": self.epoch,
            "rank": self.rank,
        }

    def _complete_epoch(self) -> None:
        self._drop_batches()
        self._end_epoch()

    def _start_pass(self) -> None:
        plan = self._sample_plan() if self.order == "sample" else self._plan()
        self.store.want(pass_order(self, plan))  # a shard cache fetches first what is read first
        dataset = SampleOrderBatches(plan) if self.order == "sample" else RankShare(plan)
        pin = self.device.type == "cuda"
        # Collect garbage before the DataLoader forks its workers: a DALI pipeline left for the collector (the
        # profiler runs DALI and pytorch configurations in one process) would otherwise be finalised inside a
        # worker, where its shutdown waits forever for DALI threads that were not forked (seen as a hung epoch).
        gc.collect()
        self._batches = start_pass(
            DataLoader(
                dataset,
                batch_size=None,  # workers batch themselves
                num_workers=self.num_workers,
                pin_memory=pin,
                prefetch_factor=self.prefetch_depth if self.num_workers else None,
                worker_init_fn=leave_stop_signals_to_parent,
            )
        )

    def _next_batch(self) -> tuple:
        images, labels, keys, boxes = self._from_workers()
        # uint8 NHWC over the wire; normalise on the device into a float16 channels_last view.
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        images = images.float().sub_(self._mean).mul_(self._inv_std).half()
        if self.policy.random_erasing > 0:
            erase_boxes_(images, boxes)  # after normalisation: erased pixels are 0, the mean
        labels = labels.to(self.device, non_blocking=True)
        return (images, labels, keys) if self.options["with_keys"] else (images, labels)

    def _from_workers(self) -> tuple[Any, Any, list[str]]:
        failure = None
        try:
            return next(self._batches)
        except StopIteration:
            failure = (ShardReadError, f"the DataLoader ended the {self.split} epoch after {self.batch_in_epoch} "
                       f"batches, expected {self.batches_per_epoch} (rank {self.rank} of {self.world_size})")
        except Exception as err:  # a worker's error, re-raised here by the DataLoader with its traceback text
            failure = (type(err), str(err))
            # torch's re-raised error sits in a reference cycle with its traceback, whose frames hold the
            # DataLoader iterator; cut it so dropping the iterator shuts the workers down now (left to the
            # garbage collector, shutdown waits out a 5 s join timeout).
            err.__traceback__ = None
        self._drop_batches()
        kind, message = failure
        marker = f"{kind.__name__}: "  # torch prefixes the worker's traceback; the message is its last line
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        try:
            error = kind(message)
        except Exception:
            error = RuntimeError(f"{kind.__name__}: {message}")
        raise error

    def _drop_batches(self) -> None:
        """Drop the pass in progress and end its workers now (pipeline.workers)."""
        batches, self._batches = self._batches, None
        if batches is not None:
            end_pass(batches)

    def close(self) -> None:
        self._drop_batches()
        stop_cache(getattr(self, "store", None))

    def __del__(self) -> None:
        # A loader in a reference cycle is finalised by the garbage collector, where torch's own shutdown of the
        # iterator can fail to reach the workers (pipeline.workers): end them here, first.
        with contextlib.suppress(Exception):
            self._drop_batches()
