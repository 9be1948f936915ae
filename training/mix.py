"""Mixup and cutmix of a training batch on its device: torchvision.transforms.v2 MixUp / CutMix, seeded per batch.

One mixing weight per batch (timm's and torchvision's "batch" mode); image i is paired with image i-1 (the
batch is already shuffled). Targets become class probabilities, `lam * onehot(y_i) + (1 - lam) * onehot(y_i-1)`,
each row summing to 1; label smoothing is applied on top by the loss (nn.CrossEntropyLoss with probability
targets), which is the same as smoothing first and mixing after. Cutmix's weight is the share of pixels that
stayed, after the box was clipped to the image.

torchvision draws lambda, the box and the mixup/cutmix choice on the CPU from torch's global RNG: each batch
runs inside `pipeline.augment.seeded_cpu_rng` seeded from (seed, rank, micro-batch index), so a run is reproducible from
its seed, a resume continues the same sequence without saving any RNG state, and the caller's RNG is left as
it was. Nothing is read back from the device: no host sync.
"""

from __future__ import annotations

import random

import torch

from pipeline.augment import seeded_cpu_rng


class BatchMix:
    """`(images, labels, index) -> (mixed images, soft targets (N, num_classes) float32)`; at least one of
    `mixup_alpha`/`cutmix_alpha` is > 0, and with both a batch gets cutmix with probability `switch_prob`."""

    def __init__(self, *, num_classes: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                 seed: int, rank: int) -> None:
        from torchvision.transforms import v2

        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("--mixup / --cutmix: BatchMix needs an alpha > 0 (leave it out to train without)")
        mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
        if mixup is not None and cutmix is not None:
            self.transform = v2.RandomChoice([mixup, cutmix], p=[1 - switch_prob, switch_prob])
        else:
            self.transform = mixup or cutmix
        self.seed, self.rank = seed, rank

    def batch_seed(self, index: int) -> int:
        """Seed of micro-batch `index` on this rank: distinct per rank and per batch, fixed by the run's seed."""
        return random.Random(f"mix:{self.seed}:{self.rank}:{index}").getrandbits(63)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with seeded_cpu_rng(self.batch_seed(index)):  # torchvision samples on the CPU
            return self.transform(images, labels)
