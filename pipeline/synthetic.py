"""`synthetic` backend: random device tensors with the exact shape, dtype and layout of a real batch,
generated once and yielded again and again, to measure the model's ceiling with no input pipeline at all.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.augment import AugmentPolicy
from pipeline.base import Loader, batches_per_epoch, local_cuda_device, rank_range, rank_seed, resolve_options

#: Backend options the `synthetic` backend accepts, with their defaults.
SYNTHETIC_OPTIONS: dict[str, Any] = {
    "num_classes": 1000,
    "num_samples": {"train": 1_281_167, "val": 50_000},  # global samples per epoch (ImageNet-1k sizes)
}


class SyntheticLoader(Loader):
    """One random batch on the device, yielded `len()` times per epoch; shards_dir is ignored."""

    def __init__(
        self,
        shards_dir: str | os.PathLike | None,
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
        **backend_options: Any,
    ) -> None:
        super().__init__()
        options = resolve_options(backend, backend_options, SYNTHETIC_OPTIONS)
        import torch

        num_classes = int(options["num_classes"])
        total = options["num_samples"]
        total = int(total[split] if isinstance(total, dict) else total)
        if num_classes < 1:
            raise ValueError(f"synthetic backend option num_classes must be >= 1, got {num_classes}")
        self.backend, self.split, self.batch_size, self.image_size = backend, split, batch_size, image_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_classes = num_classes
        self.train = train
        self.augment = policy.spec  # always rrc-flip: build_loader refuses a policy for synthetic
        self.order, self.order_chunk = order, order_chunk  # recorded only: one random batch has no order
        self.batches_per_epoch = batches_per_epoch(
            train=train, num_samples=total, batch_size=batch_size, world_size=world_size, rank=rank
        )
        start, end = rank_range(total, rank, world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"synthetic backend option num_samples={total} is too few for world_size={world_size} x "
                f"batch_size={batch_size}"
            )
        self.num_samples = self.batches_per_epoch * batch_size if train else end - start
        self._last_batch = (end - start) % batch_size if not train else 0  # val: the partial last batch
        self.device = (
            torch.device("cuda", local_cuda_device(device_id)) if torch.cuda.is_available() else torch.device("cpu")
        )
        generator = torch.Generator().manual_seed(rank_seed(seed, rank))
        images = torch.randn(batch_size, image_size, image_size, 3, generator=generator, dtype=torch.float32)
        # NHWC buffer viewed as (N, 3, H, W): channels_last like the real backends.
        self._images = images.to(device=self.device, dtype=torch.float16).permute(0, 3, 1, 2)
        self._labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(self.device)
        self._restore(state)

    def _next_batch(self) -> tuple:
        if self._last_batch and self.batch_in_epoch + 1 == self.batches_per_epoch:
            return self._images[: self._last_batch], self._labels[: self._last_batch]
        return self._images, self._labels
