"""`saturate synth`: a synthetic ImageNet that looks like ImageNet to a data pipeline.

The tree it writes has ImageNet's layout (`train/<wnid>/<wnid>_<n>.JPEG`, `val/<wnid>/...` or Kaggle's flat
`val/ILSVRC2012_val_%08d.JPEG` + `LOC_val_solution.csv`, and `LOC_synset_mapping.txt`) and, at `scale=1`,
ImageNet's shape as a decoder sees it (sizes, JPEG settings, a mean file size near 110 KB: tools.synth_image
paints and encodes each image).

Each class has its own look (palette, stripe orientation and frequency, shape kind, roughness, clutter
density), so a short training run on this data shows the loss falling. With `quirks=True` a small, recorded
subset carries ImageNet's real oddities (CMYK, grayscale, PNG bytes under a .JPEG name, progressive, EXIF
orientation 6/8 with the pixels stored unrotated) so converters and loaders meet them in tests.

Every image is drawn from its own generator seeded by (seed, split, class, index), so the output is
byte-identical for the same arguments whatever the number of worker processes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.process import usable_cpus
from tools.synth_image import QUIRK_KINDS, ClassLook, class_look, class_name, encode, image_size, render, stored_box

QUIRK_FRACTION = 0.01  # of each split's images, per kind (at least one each)

SYNTH_JSON = "synth.json"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
KAGGLE_VAL_NAME = "ILSVRC2012_val_{:08d}.JPEG"
IMAGE_SUFFIX = ".JPEG"  # ImageNet's own spelling, kept even for the PNG quirk

# Independent random streams: one generator per (seed, stream, ...) so no draw depends on another's order.
_STREAM_TRAIN, _STREAM_VAL, _STREAM_LOOK, _STREAM_WNID, _STREAM_QUIRK, _STREAM_KAGGLE = range(6)
_SPLIT_STREAM = {"train": _STREAM_TRAIN, "val": _STREAM_VAL}


class OutputNotEmptyError(FileExistsError, ValueError):
    """OUT already holds files; a ValueError too so the CLI reports it as one line, not a traceback."""


def make_wnids(seed: int, classes: int) -> list[str]:
    """`classes` unique, sorted, real-looking WNIDs (`n` + 8 digits, in ImageNet-1k's numeric range)."""
    rng = np.random.default_rng([seed, _STREAM_WNID])
    numbers = 1_440_000 + rng.choice(15_100_000 - 1_440_000, size=classes, replace=False)
    return [f"n{n:08d}" for n in sorted(numbers.tolist())]


# --- planning and writing ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)  # slots: a full-size plan holds ~1.3M of these
class ImageJob:
    """One file to write: which split/class/index it is (its seed) and where it goes."""

    split: str
    label: int
    index: int  # within (split, class), from 0
    path: str  # relative to OUT, '/'-separated
    quirk: str | None


def assign_quirks(seed: int, split: str, count: int) -> list[str | None]:
    """Per image of a split (in plan order), its quirk or None: ~1% per kind, at least one of each kind
    while there are images, chosen by a seeded permutation so the subset is deterministic."""
    per_kind = max(1, round(QUIRK_FRACTION * count))
    order = np.random.default_rng([seed, _STREAM_QUIRK, _SPLIT_STREAM[split]]).permutation(count)
    quirks: list[str | None] = [None] * count
    slots = iter(order.tolist())
    for kind in QUIRK_KINDS:
        for _ in range(per_kind):
            position = next(slots, None)
            if position is None:
                return quirks
            quirks[position] = kind
    return quirks


def plan(*, seed: int, wnids: list[str], train_per_class: int, val_per_class: int, quirks: bool,
         kaggle_val: bool) -> list[ImageJob]:
    """Every file of the tree, train then val, class-major; Kaggle val names follow a seeded shuffle."""
    jobs: list[ImageJob] = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        count = per_class * len(wnids)
        split_quirks = assign_quirks(seed, split, count) if quirks else [None] * count
        kaggle_ids = None
        if split == "val" and kaggle_val:  # Kaggle's val is flat and not in class order
            kaggle_ids = np.random.default_rng([seed, _STREAM_KAGGLE]).permutation(count) + 1
        for position in range(count):
            label, index = divmod(position, per_class)
            wnid = wnids[label]
            if kaggle_ids is not None:
                path = f"{split}/{KAGGLE_VAL_NAME.format(int(kaggle_ids[position]))}"
            else:
                path = f"{split}/{wnid}/{wnid}_{index + 1}{IMAGE_SUFFIX}"
            jobs.append(ImageJob(split, label, index, path, split_quirks[position]))
    return jobs


_WORKER: dict = {}  # per-process state set by _init_worker: out, seed, scale, looks


def _init_worker(out: str, seed: int, scale: float, looks: list[ClassLook]) -> None:
    _WORKER.update(out=out, seed=seed, scale=scale, looks=looks)


def _write_image(job: ImageJob) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """Render, encode and write one file; returns (bytes, stored width, stored height, stored box)."""
    rng = np.random.default_rng([_WORKER["seed"], _SPLIT_STREAM[job.split], job.label, job.index])
    width, height = image_size(rng, _WORKER["scale"])
    image, box = render(rng, _WORKER["looks"][job.label], width, height)
    data, (stored_w, stored_h), orientation = encode(image, rng, job.quirk)
    with open(os.path.join(_WORKER["out"], job.path), "wb") as f:
        f.write(data)
    return len(data), stored_w, stored_h, stored_box(box, width, height, orientation)


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty OUT unless `overwrite`; then only remove what an earlier synth run wrote."""
    if out.exists() and not out.is_dir():
        raise OutputNotEmptyError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise OutputNotEmptyError(f"{out} is not empty; pick an empty directory or pass --overwrite")
    if not (out / SYNTH_JSON).is_file():
        raise OutputNotEmptyError(
            f"{out} is not empty and has no {SYNTH_JSON}, so it was not written by saturate synth; "
            f"--overwrite only replaces an earlier synth tree"
        )
    for name in ("train", "val"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in (VAL_SOLUTION, SYNSET_MAPPING, SYNTH_JSON):
        (out / name).unlink(missing_ok=True)


def _check_args(classes: int, train_per_class: int, val_per_class: int, seed: int, workers: int | None,
                scale: float, quirks: bool) -> None:
    checks = (
        (isinstance(classes, int) and classes >= 1, f"--classes must be a positive integer, got {classes!r}"),
        (isinstance(train_per_class, int) and train_per_class >= 1,
         f"--train-per-class must be a positive integer, got {train_per_class!r}"),
        (isinstance(val_per_class, int) and val_per_class >= 0,
         f"--val-per-class must be a non-negative integer, got {val_per_class!r}"),
        (isinstance(seed, int) and seed >= 0, f"--seed must be a non-negative integer, got {seed!r}"),
        (workers is None or (isinstance(workers, int) and workers >= 1),
         f"--workers must be a positive integer, got {workers!r}"),
        (isinstance(scale, (int, float)) and 0 < scale <= 8, f"--scale must be in (0, 8], got {scale!r}"),
        (not quirks or classes * train_per_class >= len(QUIRK_KINDS),
         f"--quirks needs at least {len(QUIRK_KINDS)} train images (one per kind), "
         f"got {classes} classes x {train_per_class}"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def generate(out: str | os.PathLike, *, classes: int, train_per_class: int, val_per_class: int,
             quirks: bool = False, kaggle_val: bool = False, seed: int = 0, workers: int | None = None,
             scale: float = 1.0, overwrite: bool = False, progress: bool = True) -> dict:
    """Write a synthetic ImageNet tree into `out` and return a summary.

    `workers` processes (default: all cores) render in parallel; the bytes do not depend on it. `scale`
    multiplies every image's width and height (0.25 gives ~100x90 px images for fast tests). The summary
    holds image counts, `mean_bytes` (bytes per file), `mean_width`/`mean_height` (px, as stored),
    per-kind quirk counts, and `seconds`/`images_per_sec` of this run.
    """
    from tqdm import tqdm

    _check_args(classes, train_per_class, val_per_class, seed, workers, scale, quirks)
    started = time.perf_counter()
    out = Path(out)
    _prepare_out(out, overwrite)
    wnids = make_wnids(seed, classes)
    looks = [class_look(np.random.default_rng([seed, _STREAM_LOOK, label])) for label in range(classes)]
    jobs = plan(seed=seed, wnids=wnids, train_per_class=train_per_class, val_per_class=val_per_class,
                quirks=quirks, kaggle_val=kaggle_val)
    for folder in sorted({os.path.dirname(job.path) for job in jobs}):
        (out / folder).mkdir(parents=True, exist_ok=True)

    workers = min(workers or usable_cpus(), len(jobs))
    bar = tqdm(total=len(jobs), unit="img", desc="synth", disable=not progress)
    if workers == 1:
        _init_worker(str(out), seed, scale, looks)
        results = []
        for job in jobs:
            results.append(_write_image(job))
            bar.update()
    else:
        import multiprocessing

        chunksize = max(1, min(32, len(jobs) // (workers * 8)))
        with multiprocessing.Pool(workers, _init_worker, (str(out), seed, scale, looks)) as pool:
            results = []
            for result in pool.imap(_write_image, jobs, chunksize=chunksize):  # in plan order
                results.append(result)
                bar.update()
    bar.close()

    names = [class_name(look) for look in looks]
    (out / SYNSET_MAPPING).write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names, strict=True)))
    if kaggle_val:
        rows = sorted(
            (Path(job.path).stem, f"{wnids[job.label]} {' '.join(str(v) for v in box)}")
            for job, (_, _, _, box) in zip(jobs, results, strict=True) if job.split == "val"
        )
        (out / VAL_SOLUTION).write_text("ImageId,PredictionString\n" + "".join(f"{i},{p}\n" for i, p in rows))

    summary = {
        "images": len(jobs),
        "train_images": classes * train_per_class,
        "val_images": classes * val_per_class,
        "classes": classes,
        "mean_bytes": sum(r[0] for r in results) / len(results),
        "mean_width": sum(r[1] for r in results) / len(results),
        "mean_height": sum(r[2] for r in results) / len(results),
        "quirks": {kind: sum(job.quirk == kind for job in jobs) for kind in QUIRK_KINDS},
    }
    # synth.json holds only what the bytes depend on (not workers, not timings), so it is reproducible too.
    record = {
        "tool": "saturate synth",
        "parameters": {"classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
                       "quirks": quirks, "kaggle_val": kaggle_val, "seed": seed, "scale": float(scale)},
        "summary": summary,
        "quirks": {kind: [job.path for job in jobs if job.quirk == kind] for kind in QUIRK_KINDS},
    }
    (out / SYNTH_JSON).write_text(json.dumps(record, indent=1) + "\n")
    seconds = time.perf_counter() - started
    return {**summary, "workers": workers, "seconds": seconds, "images_per_sec": len(jobs) / seconds}
