"""The `pytorch` backend's work on one sample: decode with Pillow (or Pillow-SIMD: same API), then torchvision's
augmentation (train: random-resized crop, flip, the policy; val: resize the shorter side, centre crop), drawn
from an RNG seeded per sample; and the collation of a batch into uint8 NHWC. Both orders (pipeline.order) read
samples their own way and hand them here as webdataset-style dicts (`__url__`, `__key__`, `__position__` and the
members' bytes by extension).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch

from pipeline import constants as C
from pipeline.augment import NO_BOX, AugmentPolicy, TorchvisionPolicy
from pipeline.base import ShardReadError
from shards.schema import IMAGE_EXT, LABEL_EXT, decode_label


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, area: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop: torchvision's algorithm, drawn from `rng`."""
    image_area = width * height
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(C.CROP_ATTEMPTS):
        target_area = image_area * rng.uniform(*area)
        ratio = math.exp(rng.uniform(*log_aspect))
        w = int(round(math.sqrt(target_area * ratio)))
        h = int(round(math.sqrt(target_area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: centre crop at the nearest allowed aspect ratio (as torchvision)
    ratio = width / height
    if ratio < aspect[0]:
        w, h = width, int(round(width / aspect[0]))
    elif ratio > aspect[1]:
        h, w = height, int(round(height * aspect[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Augment:
    """Decode + augment one sample into (uint8 HWC array, label, key, erase box); train/val fixed at
    construction. The box is (top, left, height, width) in pixels, NO_BOX unless random erasing drew one."""

    def __init__(self, *, train: bool, image_size: int, crop_area: tuple[float, float], seed_prefix: str,
                 policy: AugmentPolicy):
        self.train, self.image_size, self.crop_area, self.seed_prefix = train, image_size, crop_area, seed_prefix
        self.policy = TorchvisionPolicy(policy) if train and not policy.is_default else None

    def __call__(self, sample: dict) -> tuple[np.ndarray, int, str, tuple[int, int, int, int]]:
        import torchvision.transforms.functional as F
        from PIL import Image
        from torchvision.transforms import InterpolationMode

        where = f"{sample['__url__']}: sample {sample['__key__']}"
        try:
            label = decode_label(sample[LABEL_EXT])
            image = Image.open(io.BytesIO(sample[IMAGE_EXT]))
            image = image.convert("RGB")
        except KeyError as err:
            raise ShardReadError(f"{where}: member .{err.args[0]} is missing") from None
        except Exception as err:  # OSError, DecompressionBombError, a bad label: all name the shard and sample
            raise ShardReadError(f"{where}: cannot decode ({type(err).__name__}: {err})") from err
        size, box = self.image_size, NO_BOX
        if self.train:
            rng = random.Random(f"{self.seed_prefix}:{sample['__position__']}")
            top, left, h, w = random_resized_crop_box(image.width, image.height, rng, self.crop_area, C.CROP_ASPECT)
            image = F.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
            if rng.random() < C.FLIP_PROBABILITY:
                image = F.hflip(image)
            if self.policy is not None:
                image, box = self.policy(image, seed=rng.getrandbits(63))
        else:
            width, height = C.val_resized_shape(image.width, image.height, size)
            image = F.resize(image, [height, width], InterpolationMode.BILINEAR, antialias=True)
            top, left = C.centre_crop_offset(height, size), C.centre_crop_offset(width, size)
            image = F.crop(image, top, left, size, size)
        return np.asarray(image, dtype=np.uint8), label, sample["__key__"], box


def collate(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))  # (N, H, W, 3) uint8
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    boxes = torch.tensor([s[3] for s in samples], dtype=torch.int64)  # (N, 4) erase boxes, pixels
    return images, labels, [s[2] for s in samples], boxes
