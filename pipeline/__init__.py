"""Input pipelines: one `build_loader` over four backends (DeepLearningExamples-style switch).

    from pipeline import build_loader, BACKENDS
    loader = build_loader("shards/", "train", train=True, batch_size=256, backend="dali-gpu")
    for images, labels in loader:   # one pass = one epoch
        ...                         # images: float16 (N, 3, H, W) channels_last, ImageNet-normalised
                                    # labels: int64 (N,), on the same device

Backends: `dali-gpu` and `dali-cpu` (pipeline.dali), `pytorch` (pipeline.pytorch_loader: torch DataLoader +
webdataset + Pillow, the strong baseline), `synthetic` (pipeline.synthetic: the model's ceiling).
Augmentation and normalisation constants live in pipeline.constants; the augmentation policies
(`augment=`: rrc-flip, autoaugment, autoaugment-v0, randaugment, trivialaugment, plus random erasing) in
pipeline.augment;
the rank's share of a split, the epoch length and the resume-state checks in pipeline.base.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline import augment as _augment
from pipeline import constants
from pipeline.augment import POLICIES, PolicyError
from pipeline.base import (
    BACKENDS,
    Loader,
    LoaderOptionError,
    ShardReadError,
    StateMismatch,
    check_arguments,
    check_loader_knobs,
    resolve_rank,
)
from pipeline.cache_use import check_cache_options
from pipeline.order import ORDERS, check_order

__all__ = ["BACKENDS", "ORDERS", "POLICIES", "Loader", "LoaderOptionError", "PolicyError", "ShardReadError",
           "StateMismatch", "build_loader", "check_loader_knobs", "constants"]


def build_loader(
    shards_dir: str | os.PathLike | None,
    split: str,
    *,
    train: bool,
    batch_size: int,
    image_size: int = constants.DEFAULT_IMAGE_SIZE,
    backend: str = "dali-gpu",
    rank: int | None = None,
    world_size: int | None = None,
    num_threads: int = 4,
    order: str | None = None,
    order_chunk: int | None = None,
    prefetch_depth: int | None = None,
    hw_decoder_load: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | str | None = None,
    seed: int = 0,
    device_id: int | None = None,
    state: dict[str, Any] | None = None,
    crop_area: tuple[float, float] = constants.CROP_AREA,
    augment: str = _augment.DEFAULT_POLICY,
    randaugment_n: int = _augment.RANDAUGMENT_N,
    randaugment_m: int = _augment.RANDAUGMENT_M,
    random_erasing: float = 0.0,
    **backend_options: Any,
) -> Loader:
    """A loader over `<shards_dir>/<split>-*.tar` for rank `rank` of `world_size`.

    train: True augments (random-resized crop, flip), shuffles and drops each rank's last partial batch;
    False resizes and centre-crops and yields every sample of the rank's share once. Set explicitly, never
    guessed from the split's name (a `minival` or `test` split can be read either way).
    rank, world_size: default to the initialised process group, else torchrun's $RANK/$WORLD_SIZE, else 0 of
    1; values that disagree with those are refused.
    batch_size: samples per batch per rank. image_size: side of the square output (pixels).
    num_threads: DALI CPU threads, or DataLoader worker processes for `pytorch`.
    order: train only, "sample" (the default: a fresh sample-level order every epoch, the same on every backend
    and for any number of ranks, so a state continues on another process count) or "shard" (the shard order
    reshuffled every epoch plus a shuffle buffer per rank: the cheapest reads); see pipeline.order.
    order_chunk: "sample" order only, samples read together from one shard (default pipeline.order.ORDER_CHUNK,
    16): smaller mixes small per-GPU batches better, larger writes fewer index files per epoch.
    prefetch_depth: batches kept in flight (DALI's prefetch queue depth; per worker for `pytorch`); None: the
    backend's default (2). hw_decoder_load: `dali-gpu` only, the share of JPEGs sent to the GPU's hardware JPEG
    decoder (the rest go to the CUDA decoder); None: pipeline.constants.HW_DECODER_LOAD. A backend without the
    knob refuses a value (LoaderOptionError, a ValueError naming the keyword).
    cache_dir: an s3:// split is read through a node-local shard cache in this folder, shared by the node's
    processes (pipeline.cache_use, shards.cached_store): whole shards are downloaded in the background, verified
    and then read locally; what is not cached yet is read from the store. cache_limit: bytes (or "200GB") the
    cache may hold; None: the disk's free space. A limit below what the readers hold at once is refused with the
    smallest that works. Refused for `synthetic` and for a local folder (read in place).
    seed: the same on every rank (shard order is global; augmentation streams differ per rank).
    device_id: CUDA device for GPU backends; default $LOCAL_RANK, else the current device.
    state: a `loader.state_dict()` to continue from (same backend/split/batch_size/image_size/rank/
    world_size/seed); None starts at epoch 0.
    crop_area: train random-resized-crop area range, fractions of the source image.
    augment: train augmentation policy after the crop and flip, one of POLICIES: "rrc-flip" (nothing more),
    "autoaugment" (the AutoAugment paper's ImageNet table, torchvision's), "autoaugment-v0" (the TF/EfficientNet
    v0 ImageNet policy of DALI and DLE; DALI backends only), "randaugment" (`randaugment_n` ops at magnitude
    `randaugment_m` of 31), "trivialaugment" (wide). random_erasing: probability of erasing one box per image
    (0: off). One name is one policy on every real backend that runs it (pipeline.augment says where DALI's and
    torchvision's operators differ); only for train=True, never for `synthetic`. A bad value, or a policy the
    backend cannot run, raises PolicyError (a ValueError) naming the keyword.
    backend_options: per backend, see DALI_OPTIONS (pipeline.dali), PYTORCH_OPTIONS
    (pipeline.pytorch_loader), SYNTHETIC_OPTIONS (pipeline.synthetic).
    """
    rank, world_size = resolve_rank(rank, world_size)
    check_loader_knobs(backend, prefetch_depth=prefetch_depth, hw_decoder_load=hw_decoder_load)
    cache_limit = check_cache_options(backend, shards_dir, cache_dir=cache_dir, cache_limit=cache_limit)
    order, order_chunk = check_order(order, train=train, chunk=order_chunk)
    check_arguments(
        split=split, train=train, backend=backend, batch_size=batch_size, image_size=image_size, rank=rank,
        world_size=world_size, crop_area=crop_area,
    )
    policy = _augment.make_policy(augment=augment, randaugment_n=randaugment_n, randaugment_m=randaugment_m,
                                  random_erasing=random_erasing)
    _augment.check_policy_use(policy, train=train, backend=backend)
    common = dict(
        train=train, batch_size=batch_size, image_size=image_size, backend=backend, rank=rank, world_size=world_size,
        num_threads=num_threads, seed=seed, device_id=device_id, state=state, crop_area=tuple(crop_area), policy=policy,
        order=order, order_chunk=order_chunk,
    )
    knobs = dict(prefetch_depth=prefetch_depth, hw_decoder_load=hw_decoder_load)
    cache = dict(cache_dir=cache_dir, cache_limit=cache_limit)
    if backend in ("dali-gpu", "dali-cpu"):
        from pipeline.dali import DaliLoader

        return DaliLoader(shards_dir, split, **common, **knobs, **cache, **backend_options)
    if backend == "pytorch":
        from pipeline.pytorch_loader import PytorchLoader

        return PytorchLoader(shards_dir, split, **common, prefetch_depth=prefetch_depth, **cache, **backend_options)
    from pipeline.synthetic import SyntheticLoader

    return SyntheticLoader(shards_dir, split, **common, **backend_options)
