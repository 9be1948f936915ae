"""What the figures were measured on: the corpus (images, JPEG size, resolution) and the machine (GPU,
driver, CPU, library versions). Absolute images/s only compare between equal corpora and machines."""

from __future__ import annotations

import io
import os
import platform
import statistics

RESOLUTION_SAMPLE = 256  # images whose JPEG header is read to describe the corpus resolution


def describe_corpus(shards_dir: str | os.PathLike, split: str, *, sample: int = RESOLUTION_SAMPLE) -> dict:
    """Images, classes, mean JPEG size (exact, from the DALI indexes) and mean resolution (JPEG headers of
    `sample` images spread evenly over the split; headers only, nothing is decoded)."""
    from PIL import Image

    from shards.schema import IMAGE_EXT, load_manifest, parse_index, shard_files
    from shards.store import open_store

    store = open_store(shards_dir)  # a folder or an s3:// URL: indexes and JPEG headers are read through it
    manifest = load_manifest(store, split)
    shard_files(store, manifest)  # every tar and index present and matching its record (errors name the file)
    members: list[tuple[str, int, int]] = []  # (tar name, offset, size) of every image, bytes
    for record in manifest.shards:
        for sample_members in parse_index(store.read_text(record.index), store.url(record.index)):
            members += [(record.name, m.offset, m.size) for m in sample_members if m.ext == IMAGE_EXT]
    if not members:
        raise ValueError(f"{shards_dir}: the {split} indexes list no .{IMAGE_EXT} member")
    chosen = [members[i * len(members) // min(sample, len(members))] for i in range(min(sample, len(members)))]
    widths, heights = [], []
    for tar, offset, size in chosen:
        raw = store.read_bytes(tar, offset=offset, length=size)
        try:
            with Image.open(io.BytesIO(raw)) as image:
                widths.append(image.width)
                heights.append(image.height)
        except Exception as err:
            raise ValueError(f"{store.url(tar)}: the JPEG at byte {offset} has an unreadable header ({err})") from err
    sizes = [size for _, _, size in members]
    return {
        "shards_dir": store.resolved(),
        "split": split,
        "images": manifest.num_samples,
        "num_classes": manifest.num_classes,
        "shards": len(manifest.shards),
        "total_gb": sum(s.bytes for s in manifest.shards) / 1e9,
        "mean_jpeg_kb": statistics.fmean(sizes) / 1e3,
        "mean_width_px": statistics.fmean(widths),
        "mean_height_px": statistics.fmean(heights),
        "mean_megapixels": statistics.fmean(w * h for w, h in zip(widths, heights, strict=True)) / 1e6,
        "resolution_sample": len(chosen),
    }


def describe_machine() -> dict:
    """What makes figures from two machines comparable or not: GPU, driver, CPU, library versions."""
    import PIL
    import torch
    from PIL import features

    from training.tuning import machine_key

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    driver = None
    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception:  # NVML missing: the driver stays n/a rather than failing the profile
            driver = None
    key = machine_key()
    return {
        "gpu": key["gpu"],
        "gpu_count": key["gpu_count"],
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu": key["cpu"],
        "cpu_count": os.cpu_count(),
        "cpu_usable": key["cpu_usable"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": dali_version,
        "pillow": PIL.__version__,
        # Pillow-SIMD publishes versions like 9.0.0.post1; libjpeg-turbo is what makes plain Pillow decode fast
        "pillow_simd": ".post" in PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
    }
