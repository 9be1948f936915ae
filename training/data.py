"""The trainer's side of `pipeline.build_loader`: which split, which backend options, from the config."""

from __future__ import annotations

from typing import Any

from shards.cached_store import describe
from shards.request_log import request_counts
from shards.store import is_store_url
from training.config import TrainConfig
from training.dist import DistInfo


def make_loader(cfg: TrainConfig, info: DistInfo, *, train: bool, image_size: int, seed: int,
                state: dict | None = None) -> Any:
    """The train loader (`train=True`: --train-split, augmented with --augment/--random-erasing, shuffled) or
    the val loader (--val-split, centre crop, every sample once) for this rank; `state` continues a saved
    position. Batches are micro-batches: --grad-accum-steps of them make one optimizer step."""
    from pipeline import build_loader  # imports DALI; kept out of module import time

    options: dict[str, Any] = {}
    if cfg.backend == "synthetic":
        options["num_classes"] = cfg.num_classes or 1000
        options["num_samples"] = cfg.synthetic_samples if train else cfg.synthetic_val_samples
    if train:  # the augmentation policy and the data order; val is never augmented and reads every sample once
        options.update(augment=cfg.augment, randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m,
                       random_erasing=cfg.random_erasing, order=cfg.order,
                       order_chunk=cfg.order_chunk)
        if cfg.log_sample_keys and cfg.backend != "synthetic":
            options["with_keys"] = True
    return build_loader(
        cfg.data if cfg.backend != "synthetic" else None,
        cfg.train_split if train else cfg.val_split,
        train=train,
        batch_size=cfg.per_process_batch(info.world_size),
        image_size=image_size,
        backend=cfg.backend,
        rank=info.rank,
        world_size=info.world_size,
        num_threads=cfg.num_threads,
        prefetch_depth=cfg.prefetch_depth,
        hw_decoder_load=cfg.hw_decoder_load,
        seed=seed,
        device_id=info.local_rank if info.device.type == "cuda" else None,
        state=state,
        crop_area=tuple(cfg.crop_area),
        **({"cache_dir": cfg.cache_dir, "cache_limit": cfg.cache_limit} if cfg.cache_dir is not None else {}),
        **options,
    )


class StoreLog:
    """Once an epoch, for a run reading an object store: the requests this process sent since the last line
    (every attempt boto3 made, retries and throttled answers included, shards.request_log; DALI's own reader is
    not counted there) and, with --cache-dir, the cache's state."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.enabled = cfg.backend != "synthetic" and cfg.data is not None and is_store_url(cfg.data)
        self._last = request_counts()

    def line(self, loader: Any) -> str | None:
        if not self.enabled:
            return None
        now = request_counts()
        counted, self._last = now - self._last, now
        cache = describe(getattr(loader, "store", None))
        return f"store (boto3, this process): {counted.line()}" + (f"; {cache}" if cache else "")
