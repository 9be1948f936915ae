"""The trainer's side of `pipeline.build_loader`: which split, which backend options, from the config."""

from __future__ import annotations

from typing import Any

from training.config import TrainConfig
from training.dist import DistInfo

#: The backend option that holds each data backend's prefetch depth (batches in flight; per worker for pytorch).
PREFETCH_OPTION = {"dali-gpu": "prefetch_queue_depth", "dali-cpu": "prefetch_queue_depth", "pytorch": "prefetch_factor"}


def loader_options(backend: str, *, hw_decoder_load: float | None = None, prefetch_depth: int | None = None) -> dict:
    """The backend options of the tunable loader knobs (the trainer's and the profiler's one translation);
    None keeps the backend's default, and a knob the backend lacks is left out."""
    options: dict = {}
    if backend == "dali-gpu" and hw_decoder_load is not None:
        options["hw_decoder_load"] = hw_decoder_load
    if backend in PREFETCH_OPTION and prefetch_depth is not None:
        options[PREFETCH_OPTION[backend]] = prefetch_depth
    return options


def make_loader(cfg: TrainConfig, info: DistInfo, *, train: bool, image_size: int, seed: int,
                state: dict | None = None) -> Any:
    """The train loader (`train=True`: --train-split, augmented with --augment/--random-erasing, shuffled) or
    the val loader (--val-split, centre crop, every sample once) for this rank; `state` continues a saved
    position. Batches are micro-batches: --grad-accum-steps of them make one optimizer step."""
    from pipeline import build_loader  # imports DALI; kept out of module import time

    options = loader_options(cfg.backend, hw_decoder_load=cfg.hw_decoder_load, prefetch_depth=cfg.prefetch_depth)
    if cfg.backend == "synthetic":
        options["num_classes"] = cfg.num_classes or 1000
        options["num_samples"] = cfg.synthetic_samples if train else cfg.synthetic_val_samples
    if train:  # the augmentation policy; val is never augmented
        options.update(augment=cfg.augment, randaugment_n=cfg.randaugment_n, randaugment_m=cfg.randaugment_m,
                       random_erasing=cfg.random_erasing)
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
        seed=seed,
        device_id=info.local_rank if info.device.type == "cuda" else None,
        state=state,
        crop_area=tuple(cfg.crop_area),
        **options,
    )
