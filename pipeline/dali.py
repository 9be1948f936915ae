"""DALI backends: `dali-gpu` (nvJPEG + hardware decoder, augmentation on the GPU) and `dali-cpu` (the same
graph on CPU operators; runs without a GPU or a CUDA driver, which is what the tests use).

One graph (`imagenet_graph`) serves train and val; `train` is fixed when the pipeline is built:

    read   fn.readers.webdataset. Train in `sample` order (pipeline.order): the rank's samples of the epoch as
           entries (a tar and an index listing a chunk of its samples), a few thousand per pipeline, read in
           order; an epoch is a few such pipelines (segments), the next built while the current one runs.
           Val, and train in `shard` order: the manifest's shards with their .idx files, rank `r` of `W`
           reading its contiguous share (`shard_id`/`num_shards`); `shard` train shuffles in a buffer of
           `shuffle_buffer` samples and reshuffles the shard order every epoch (same seed on every rank).
    label  the `.cls` member read as LABEL_WIDTH uint8 ASCII digits, turned into int64 by arithmetic in the
           graph (digit - '0', dot product with powers of ten): no Python callback, labels exact.
    train  decode a random-resized crop (area `crop_area`, aspect CROP_ASPECT) -> resize to
           image_size x image_size -> the augmentation policy (pipeline.augment.dali_policy: AutoAugment,
           RandAugment or TrivialAugmentWide from nvidia.dali.auto_aug, on uint8) -> flip with
           p = FLIP_PROBABILITY (in crop_mirror_normalize) -> random erasing (pipeline.augment.
           dali_random_erasing, on the normalised image)
    val    decode -> resize the shorter side to image_size / VAL_RESIZE_RATIO -> centre crop, no flip
    out    fn.crop_mirror_normalize to float16 NHWC, ImageNet mean/std; the loader returns the
           (N, 3, H, W) channels_last view of that NHWC buffer (a permute, no copy).

Epochs end exactly: the reader is named (`READER_NAME`) and pads its share to whole batches with
`pad_last_batch`; val uses LastBatchPolicy.PARTIAL, so the padding never reaches the caller and every val
sample is seen exactly once across ranks; train yields only its full batches and drains the rest.

Resume: pipelines are built with `enable_checkpointing=True`; `state_dict()` holds the iterator's DALI
checkpoint (base64 text) and `build_loader(..., state=...)` rebuilds the pipeline from it, so a resumed
epoch continues with the next sample and the same random state. In `sample` order a state from another loader
(process count, backend, threads) continues at its position with fresh random state (pipeline.base). The
policies' conditional execution
(`enable_conditionals=True`, needed by nvidia.dali.auto_aug) checkpoints like the rest (tests check it
on dali-cpu); the state names the policy, and a state from another policy is refused.

Undecodable samples: fail, never skip. The converter already rejects files Pillow cannot decode, so a
JPEG that fails here means the shard was damaged after conversion; the loader raises ShardReadError
naming the split, the shard directory and DALI's message (which names the tar and the member) instead of
silently training on fewer samples. DALI's decoder error gives only the sample's position in the batch,
so the loader then checks the split's shards (`diagnose_shards`, at most DIAGNOSE_BUDGET seconds) and names
the damaged shard and sample key. A truncated tar or an index that does not match its tar fails the same
way (DALI itself names the index and the line).
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import constants as C
from pipeline.augment import AugmentPolicy, dali_policy, dali_random_erasing
from pipeline.base import (
    Loader,
    ShardReadError,
    batches_per_epoch,
    diagnose_shards,
    local_cuda_device,
    open_split,
    rank_range,
    rank_seed,
    resolve_options,
)
from pipeline.cache_use import cached_shards, segments_minimum, shard_sizes, start_cache, stop_cache
from pipeline.dali_segments import SegmentReads
from pipeline.order import sample_order_index
from shards.cached_store import CachedStore
from shards.local_store import Hold
from shards.schema import IMAGE_EXT, LABEL_EXT, LABEL_WIDTH, split_member_name

READER_NAME = "Reader"
#: Batches DALI keeps in flight when build_loader's `prefetch_depth` is None (DALI's own default).
PREFETCH_DEPTH = 2
#: Backend options the DALI backends accept, with their defaults (the speed knobs `prefetch_depth` and
#: `hw_decoder_load` are build_loader keywords).
DALI_OPTIONS: dict[str, Any] = {
    "device_memory_padding": C.DEVICE_MEMORY_PADDING,
    "host_memory_padding": C.HOST_MEMORY_PADDING,
    "preallocate_width_hint": C.PREALLOCATE_WIDTH_HINT,
    "preallocate_height_hint": C.PREALLOCATE_HEIGHT_HINT,
    "shuffle_buffer": C.SHUFFLE_BUFFER,  # samples
    "with_keys": False,  # test/debug: also yield the list of sample keys of each batch
}


def imagenet_graph(
    *,
    reader: dict[str, Any],
    train: bool,
    image_size: int,
    crop_area: tuple[float, float],
    gpu: bool,
    policy: AugmentPolicy,
    with_keys: bool,
    hw_decoder_load: float,
    device_memory_padding: int,
    host_memory_padding: int,
    preallocate_width_hint: int,
    preallocate_height_hint: int,
) -> tuple:
    """The one DALI graph for train and val; `pipeline_def` builds a Pipeline from it (with
    `enable_conditionals=policy.needs_conditionals`). `reader`: what to read and in which order
    (`sample_order_reader` or `shard_order_reader`). Returns its outputs. pipeline_def hands each keyword to the
    graph or to the Pipeline by name, so no parameter here may share a Pipeline argument's name."""
    from nvidia.dali import fn, types

    jpegs, digits = fn.readers.webdataset(
        name=READER_NAME,
        ext=[IMAGE_EXT, LABEL_EXT],
        missing_component_behavior="error",  # a sample without its label is a broken shard, not a skip
        **reader,
    )
    # '0'..'9' -> 0..9, then sum(digit * 10**place): exact int64 labels without a Python callback.
    place_values = types.Constant(np.array([10**p for p in range(LABEL_WIDTH - 1, -1, -1)], dtype=np.int64))
    labels = fn.reductions.sum((fn.cast(digits, dtype=types.INT64) - ord("0")) * place_values, axes=0)

    decoder: dict[str, Any] = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
    if gpu:
        decoder.update(
            hw_decoder_load=hw_decoder_load,
            device_memory_padding=device_memory_padding,
            host_memory_padding=host_memory_padding,
            preallocate_width_hint=preallocate_width_hint,
            preallocate_height_hint=preallocate_height_hint,
        )
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, random_area=list(crop_area), random_aspect_ratio=list(C.CROP_ASPECT),
            num_attempts=C.CROP_ATTEMPTS, **decoder,
        )
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        images = dali_policy(images, policy, image_size=image_size)  # uint8 HWC in and out
        mirror = fn.random.coin_flip(probability=C.FLIP_PROBABILITY)
    else:
        images = fn.decoders.image(jpegs, **decoder)
        images = fn.resize(images, resize_shorter=C.val_resize_size(image_size))
        mirror = 0
    images = fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16,
        output_layout="HWC",  # the loader permutes to an (N, 3, H, W) channels_last view
        crop=(image_size, image_size),  # centre crop for val; train is already image_size square
        mean=[m * C.PIXEL_MAX for m in C.IMAGENET_MEAN],
        std=[s * C.PIXEL_MAX for s in C.IMAGENET_STD],
        mirror=mirror,
    )
    if train:
        images = dali_random_erasing(images, policy, image_size=image_size)  # erased pixels are 0 (the mean)
    outputs = [images, labels.gpu() if gpu else labels]
    if with_keys:
        # "<tar>:<offset>:<key>.jpg" as uint8, zero-padded to the batch's longest.
        outputs.append(fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0))
    return tuple(outputs)


def shard_order_reader(pairs: list[tuple[Any, Any]], *, train: bool, rank: int, world_size: int, seed: int,
                       shuffle_buffer: int) -> dict[str, Any]:
    """The reader of val and of train in `shard` order: the manifest's shards, rank `rank` of `world_size`
    reading its contiguous share; train reshuffles the shard order every epoch (`seed`, the same on every rank)
    and shuffles in a buffer of `shuffle_buffer` samples."""
    return dict(
        paths=[str(tar) for tar, _ in pairs],
        index_paths=[str(index) for _, index in pairs],
        shard_id=rank,
        num_shards=world_size,
        pad_last_batch=True,  # epochs end on this rank's share; padding is dropped by the iterator
        random_shuffle=train,
        initial_fill=shuffle_buffer,
        shuffle_after_epoch=train,  # new shard order each epoch, reads inside a shard stay sequential
        stick_to_shard=not train,  # val: each rank re-reads exactly its share every epoch
        **({"shuffle_after_epoch_seed": seed} if train else {}),  # one global shard order per epoch
    )


def _device_id(gpu: bool, device_id: int | None) -> int | None:
    if not gpu:
        return None
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            "backend 'dali-gpu' needs a CUDA GPU, but torch.cuda.is_available() is False on this machine; "
            "use backend='dali-cpu' or backend='pytorch'"
        )
    return local_cuda_device(device_id)


def dali_message(err: BaseException) -> str:
    """DALI's error in one line: the operator and what it encountered, without the pipeline-definition traceback
    DALI wraps around it (the CLI prints one line per error)."""
    text = str(err)
    operator = next((line.strip().rstrip(",") for line in text.splitlines() if line.startswith("Error in ")), "")
    cause = text.split("encountered:", 1)[1] if "encountered:" in text else text
    cause = cause.split("Current pipeline object is no longer valid.", 1)[0]
    cause = " ".join(line.strip() for line in cause.splitlines() if line.strip())
    return f"{operator}: {cause}" if operator else cause


def _sample_key(source_info: np.ndarray) -> str:
    """Sample key from DALI's source info bytes "<tar>:<offset>:<key>.<ext>" (zero padded)."""
    text = bytes(source_info).rstrip(b"\0").decode()
    return split_member_name(text.rsplit(":", 1)[-1])[0]


class DaliLoader(Loader):
    """`dali-gpu` / `dali-cpu` behind the common Loader interface (see the module docstring)."""

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
        hw_decoder_load: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        **backend_options: Any,
    ) -> None:
        super().__init__()
        self._held = Hold()  # shard-order/val: the cached shards the pipeline was built with
        options = resolve_options(backend, backend_options, DALI_OPTIONS)
        import torch
        from nvidia.dali import pipeline_def

        gpu = backend == "dali-gpu"
        dali_device = _device_id(gpu, device_id)
        self.store, manifest, _ = open_split(shards_dir, split, cache_dir=cache_dir, cache_limit=cache_limit)
        self.manifest = manifest
        self.backend, self.split, self.batch_size, self.image_size = backend, split, batch_size, image_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_classes, self.wnids = manifest.num_classes, manifest.wnids
        self.split_samples = manifest.num_samples
        self.device = torch.device("cuda", dali_device) if gpu else torch.device("cpu")
        self.with_keys = bool(options["with_keys"])
        self.train, self.order = train, order
        self.augment = policy.spec
        self._graph = dict(
            train=train, image_size=image_size, crop_area=tuple(crop_area), gpu=gpu, policy=policy,
            with_keys=self.with_keys, hw_decoder_load=C.HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load,
            **{k: options[k] for k in DALI_OPTIONS if k.endswith(("_padding", "_hint"))},
            # the Pipeline's own arguments
            batch_size=batch_size, num_threads=num_threads, device_id=dali_device,
            prefetch_queue_depth=PREFETCH_DEPTH if prefetch_depth is None else prefetch_depth,
            enable_checkpointing=True,
        )
        self._build = pipeline_def(imagenet_graph, enable_conditionals=policy.needs_conditionals)
        if order == "sample":
            self.order_chunk, self._index = order_chunk, sample_order_index(self.store, manifest, backend_options)
            self.split_digest = manifest.content_digest
            self._sample_order_length(manifest.num_samples)
            self._reads = SegmentReads(self, self._restore(state))
            self._dali = None
            sizes = shard_sizes(self.store)
            if sizes is not None:
                start_cache(self.store, minimum=segments_minimum(
                    self._index, sizes, seed=seed, epoch=self.epoch, rank=rank, world_size=world_size,
                    batch_size=batch_size, chunk=self.order_chunk))
            return
        start, end = rank_range(manifest.num_samples, rank, world_size)
        if end == start or (train and manifest.num_samples // world_size < batch_size):
            raise ValueError(
                f"{self.store}: the {split} split has {manifest.num_samples} samples, too few for "
                f"world_size={world_size} x batch_size={batch_size}"
            )
        self.batches_per_epoch = batches_per_epoch(
            train=train, num_samples=manifest.num_samples, batch_size=batch_size, world_size=world_size, rank=rank
        )
        self.num_samples = self.batches_per_epoch * batch_size if train else end - start
        state = self._restore(state)
        checkpoint = base64.b64decode(state["dali_checkpoint"]) if state is not None else None
        self._shuffle_buffer, self._reads = options["shuffle_buffer"], None
        self._dali = self.iterator(self._shard_reader(), seed=rank_seed(seed, rank), checkpoint=checkpoint,
                                   prefetch=False)
        # the rank's share first; DALI reads the other shards' names only to count them
        share = [r.name for r in manifest.shards if r.name in self._rank_shards()]
        start_cache(self.store, minimum=None, want=share)

    def _rank_shards(self) -> set[str]:
        """The shards holding samples of this rank's contiguous share (val; `shard` order's first epoch)."""
        start, end = rank_range(self.manifest.num_samples, self.rank, self.world_size)
        first, found = 0, set()
        for record in self.manifest.shards:
            if first < end and first + record.num_samples > start:
                found.add(record.name)
            first += record.num_samples
        return found

    def _shard_reader(self) -> dict[str, Any]:
        """The `shard`-order/val reader. With a shard cache it names the local copy of every shard cached by now
        (held for the pipeline's life: DALI opens them when it is built) and the store's URL of the others."""
        shards = self.manifest.shards
        hold = self.store.hold([r.name for r in shards])  # while deciding: nothing is evicted under our feet
        pairs = [(self.store.url(r.name), self.store.url(r.index)) for r in shards]
        self._held.release()
        self._held = self.store.hold([r.name for r, (tar, _) in zip(shards, pairs, strict=True)
                                      if isinstance(tar, Path)])
        hold.release()
        self._local = sum(isinstance(tar, Path) for tar, _ in pairs)
        return shard_order_reader(pairs, train=self.train, rank=self.rank, world_size=self.world_size,
                                  seed=self.seed, shuffle_buffer=self._shuffle_buffer)

    def iterator(self, reader: dict[str, Any], *, seed: int, checkpoint: bytes | None, prefetch: bool) -> Any:
        """A DALI iterator over the graph with `reader` (the pipeline is built and its indexes parsed here);
        `prefetch` starts reading at once (a segment built ahead), else at the first batch."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if isinstance(self.store, CachedStore) and self.store.cache.limit is not None:
            # DALI 2.4 maps local tars into memory by default; reading a shard cache whose files are evicted and
            # fetched again under the same names while pipelines run, its webdataset reader died of SIGFPE in
            # WebdatasetLoader::ReadSample (reproduced with tests/test_cache.py's eviction test; DALI appears to
            # reuse a mapping by path); plain reads do not. Without --cache-limit nothing is evicted, and mapped
            # reads (DALI's default, ~3% faster here) are kept.
            reader = {**reader, "dont_use_mmap": True}
        pipe = self._build(reader=reader, seed=seed, checkpoint=checkpoint, **self._graph)
        output_map = ["images", "labels"] + (["source_info"] if self.with_keys else [])
        with self._dali_errors("building the pipeline"):
            return DALIGenericIterator(
                pipe,
                output_map,
                reader_name=READER_NAME,
                # PARTIAL for train too: with DROP, the batch DALI pads a shorter share with (copies of its last
                # sample) is never read and leaks into the next epoch as duplicates. The loader itself yields
                # only `batches_per_epoch` full train batches and drains the rest of the epoch.
                last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=False,
                prepare_first_batch=prefetch,
            )

    @contextlib.contextmanager
    def _dali_errors(self, doing: str) -> Iterator[None]:
        """Re-raise DALI's errors as ShardReadError naming the split, the shard directory and the rank."""
        try:
            yield
        except ShardReadError:
            raise
        except RuntimeError as err:
            if "fn.readers" not in str(err) and "fn.decoders" not in str(err):
                raise  # not about the data (CUDA out of memory, a bad argument): DALI's message is the clearest
            diagnosis = diagnose_shards(self.store, self.manifest)
            raise ShardReadError(
                f"{self.backend}: {doing} the {self.split} shards in {self.store} "
                f"(rank {self.rank} of {self.world_size}) failed: {diagnosis}. Undecodable samples are never "
                f"skipped. DALI said: {dali_message(err)}"
            ) from err

    def _next_dali(self) -> dict:
        if self._reads is not None:
            return self._reads.next()
        with self._dali_errors("reading"):
            try:
                return next(self._dali)[0]
            except StopIteration:
                raise ShardReadError(
                    f"{self.backend}: DALI ended the {self.split} epoch after {self.batch_in_epoch} batches, "
                    f"expected {self.batches_per_epoch} (rank {self.rank} of {self.world_size})"
                ) from None

    def _start_pass(self) -> None:
        if self._reads is not None:
            self._reads.start(self.epoch, self.batch_in_epoch)

    def _complete_epoch(self) -> None:
        """Run DALI to the end of this rank's epoch (a rank with a bigger share has one batch more than the
        batches yielded), reset it for the next epoch and advance the epoch counter. In `sample` order the
        segment in progress is dropped: each segment's reader ends exactly where its batches do."""
        if self._reads is not None:
            self._reads.stop()
            self._end_epoch()
            return
        with self._dali_errors("reading"):
            # next() rather than `for`: the DALI iterator's __iter__ would try a reset mid-epoch.
            while True:
                try:
                    next(self._dali)
                except StopIteration:
                    break
            if not self.train and cached_shards(self.store) > self._local:
                # val reads the same samples in the same order every pass: a new pipeline reads the shards cached
                # since from local files (a reset would start the old one prefetching from the store)
                self._dali = None
                self._dali = self.iterator(self._shard_reader(), seed=rank_seed(self.seed, self.rank),
                                           checkpoint=None, prefetch=False)
            else:
                self._dali.reset()
        self._end_epoch()

    def _next_batch(self) -> tuple:
        out = self._next_dali()
        images = out["images"].permute(0, 3, 1, 2)  # NHWC buffer -> (N, 3, H, W) channels_last view
        if self.with_keys:
            return images, out["labels"], [_sample_key(row) for row in out["source_info"].cpu().numpy()]
        return images, out["labels"]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._reads is not None:
            state.update(self._reads.checkpoint(self.batch_in_epoch))
        else:
            state["dali_checkpoint"] = base64.b64encode(self._dali.checkpoints()[0]).decode("ascii")
        return state

    def close(self) -> None:
        if getattr(self, "_reads", None) is not None:
            self._reads.close()
        if getattr(self, "_dali", None) is not None:
            del self._dali
            self._dali = None
        self._held.release()
        stop_cache(getattr(self, "store", None))
