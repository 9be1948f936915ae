"""Shared small data: an ImageNet-layout tree of tiny JPEGs and its shards, made once per test session; and the
local S3 server of the object-store tests (tests/s3_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from s3_fixtures import s3_env, s3_server  # noqa: F401  the object-store tests' fixtures, one server per session

from shards.convert import convert

TINY_CLASSES = ["n00000001", "n00000002", "n00000003", "n00000004", "n00000005"]
TINY_TRAIN_PER_CLASS = 12
TINY_VAL_PER_CLASS = 5
TINY_SAMPLES_PER_SHARD = 8


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly (and visibly) on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_image(class_index: int, n: int, rng: np.random.Generator) -> Image.Image:
    """A small textured RGB image whose colour says its class (so labels can be checked by eye)."""
    h, w = rng.integers(64, 121, size=2)
    base = np.zeros((h, w, 3), np.float32)
    base[..., class_index % 3] = 200.0
    base += np.linspace(0, 50, w, dtype=np.float32)[None, :, None]
    base += rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def write_tree(root: Path, *, train_per_class: int, val_per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(TINY_CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for n in range(count):
                tiny_image(c, n, rng).save(folder / f"{wnid}_{n}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """root/train/<wnid>/<wnid>_<n>.JPEG (5 x 12) and root/val/<wnid>/... (5 x 5 = 25 images)."""
    return write_tree(tmp_path_factory.mktemp("tiny_imagenet"),
                      train_per_class=TINY_TRAIN_PER_CLASS, val_per_class=TINY_VAL_PER_CLASS)


@pytest.fixture(scope="session")
def tiny_shards(tiny_imagenet, tmp_path_factory) -> Path:
    """train (8 shards) and val (4 shards, the last one short) converted from tiny_imagenet into one folder."""
    out = tmp_path_factory.mktemp("tiny_shards")
    for split in ("train", "val"):
        convert(tiny_imagenet / split, out, split=split, samples_per_shard=TINY_SAMPLES_PER_SHARD,
                seed=0, workers=1, progress=False)
    return out
