"""`saturate shards verify`: re-check what the manifest promises, shard by shard, in a folder or an object store.

Counts, sizes, sha256, the `.idx` against an index rebuilt from the tar (what DALI's `wds2idx` would write),
sample structure (exactly the schema's members per key), labels in range and equal in `.cls` and `.json`,
keys unique across the split; with `decode=True` every image is decoded with Pillow(-SIMD).
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from shards.images import DEFAULT_MAX_PIXELS, plain_rgb_jpeg_size, strict_decode_problem
from shards.process import check_workers, usable_cpus
from shards.schema import (
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    SAMPLE_EXTS,
    Manifest,
    ShardFormatError,
    ShardRecord,
    check_split_name,
    decode_label,
    format_index,
    load_manifest,
    manifest_name,
    split_member_name,
    splits_in,
    splits_without_manifest,
    unlisted_shard_files,
)
from shards.store import Store, open_store
from shards.tarshard import scan_tar


@dataclass
class ShardCheck:
    name: str
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    decoded: int = 0  # images decoded
    cpu_seconds: float = 0.0  # process CPU time spent decoding


@functools.lru_cache(maxsize=1)
def _worker_store(location: str) -> Store:
    """The store a verify worker process checks its shards in, opened once per process, not per shard (on S3
    each opening builds boto3 sessions and clients: ~0.1-0.3 s of CPU)."""
    return open_store(location)


def check_shard(shards_dir: str | os.PathLike | Store, record: ShardRecord, num_classes: int, decode: bool, *,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                sizes: tuple[int | None, int | None] | None = None) -> ShardCheck:
    """Everything about one shard that can be checked without looking at the others; `shards_dir` is a folder,
    a store URL or an open Store, and the tar is read once, front to back. `sizes`: (tar, idx) bytes from a
    listing the caller already made (None: missing); without them each is asked of the store."""
    check = ShardCheck(record.name)
    store = shards_dir if isinstance(shards_dir, Store) else _worker_store(str(shards_dir))
    tar, idx = store.url(record.name), store.url(record.index)
    size, index_size = sizes if sizes is not None else (store.size(record.name), store.size(record.index))
    for url, found in ((tar, size), (idx, index_size)):
        if found is None:
            check.problems.append(f"{url}: missing")
    if check.problems:
        return check
    if size != record.bytes:
        check.problems.append(f"{tar}: {size} bytes, manifest says {record.bytes}")
    try:
        with store.open(record.name) as stream:
            expected_index, payloads, sha = scan_tar(stream, tar)
    except ShardFormatError as err:
        check.problems.append(str(err))
        return check
    if sha != record.sha256:
        check.problems.append(f"{tar}: sha256 {sha[:16]}... != manifest {record.sha256[:16]}...")
    if store.read_text(record.index) != format_index(expected_index):
        check.problems.append(f"{idx}: does not match the index rebuilt from {record.name} (stale or corrupt)")

    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    for name, payload in payloads:
        key, ext = split_member_name(name)
        if key not in members:
            members[key] = {}
            order.append(key)
        members[key][ext] = payload
    if len(order) != record.num_samples:
        check.problems.append(f"{tar}: {len(order)} samples, manifest says {record.num_samples}")
    start = time.process_time()
    for key in order:
        sample = members[key]
        where = f"{record.name}:{key}"
        if sorted(sample) != sorted(SAMPLE_EXTS):
            check.problems.append(f"{where}: members {sorted(sample)}, expected {sorted(SAMPLE_EXTS)}")
            continue
        try:
            label = decode_label(sample[LABEL_EXT])
        except ShardFormatError as err:
            check.problems.append(f"{where}: {err}")
            continue
        meta = json.loads(sample[META_EXT])
        if not 0 <= label < num_classes or meta.get("label") != label:
            check.problems.append(f"{where}: label {label} (json {meta.get('label')}) of {num_classes} classes")
        if decode:
            problem = decode_problem(sample[IMAGE_EXT], max_pixels=max_pixels)
            if problem is None:
                check.decoded += 1
            else:
                check.problems.append(f"{where}: {problem}")
    check.cpu_seconds = time.process_time() - start
    check.keys = order
    return check


def unmanifested(store: Store, split: str, names: list[str]) -> str:
    """The finding for shard files of a split without a manifest (shards.schema.splits_without_manifest)."""
    shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
    files = "file is" if len(names) == 1 else "files are"
    return (f"{store.url(manifest_name(split))}: missing, but {len(names)} {split} shard {files} there ({shown}): "
            f"no loader opens the split; rerun `saturate shards convert SRC {store} --split {split}` (or "
            f"`saturate shards merge {store} --split {split}` once every job has finished)")


def decode_problem(jpeg: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """None when `jpeg` is what the converter packs: an RGB JPEG within `max_pixels` that libjpeg-turbo decodes
    without a warning (the converter's own checks, shards.images); else what is wrong."""
    size = plain_rgb_jpeg_size(jpeg)
    if size is not None and size[0] * size[1] > max_pixels:
        return f"header claims {size[0]}x{size[1]} pixels, above the conversion's --max-pixels {max_pixels}"
    if size is None:
        try:
            with Image.open(io.BytesIO(jpeg)) as img:
                found = f"{img.format} {img.mode}"
        except Exception as err:  # any decoder failure is a finding, not a crash of verify
            return f"image does not decode ({err})"
        return f"{found}, expected an RGB JPEG with its end marker"
    problem = strict_decode_problem(jpeg)
    return None if problem is None else f"image does not decode cleanly ({problem[1]})"


def verify(shards_dir: str | os.PathLike, *, splits: list[str] | None = None, decode: bool = False,
           workers: int | None = None, progress: bool = False) -> tuple[list[str], dict]:
    """Return (problems, stats). No problems means every manifest found matches its shards exactly and, when
    no `splits` are named, no split has shard files without a manifest.

    stats["samples"] counts the samples actually read and checked (a missing or unreadable shard's are not);
    stats["listed"] what the manifests promise. `progress` shows a bar in images/s (stderr)."""
    check_workers(workers)
    store = open_store(shards_dir)
    store.check()
    shards_dir = str(store)  # what each worker process opens its own store from
    problems: list[str] = []
    if splits:  # a split asked for by name without a manifest fails in load_manifest, saying what to run
        splits = [check_split_name(s) for s in splits]
    else:
        splits = splits_in(store)
        orphans = splits_without_manifest(store.sizes())
        if not splits and not orphans:
            raise FileNotFoundError(f"no *.manifest.json in {shards_dir}: nothing to verify")
        problems += [unmanifested(store, split, names) for split, names in orphans.items()]
    stats = {"samples": 0, "listed": 0, "shards": 0, "decoded": 0, "cpu_seconds": 0.0, "seconds": 0.0}
    start = time.perf_counter()
    for split in splits:
        manifest: Manifest = load_manifest(store, split)
        bar = tqdm(total=manifest.num_samples, unit="img", unit_scale=True, disable=not progress,
                   desc=f"verify {split}" + (" --decode" if decode else ""))
        present = store.sizes()  # one listing for every shard's existence and size, and for unlisted ones
        with ProcessPoolExecutor(max_workers=workers or usable_cpus()) as pool:
            futures = {pool.submit(check_shard, shards_dir, r, manifest.num_classes, decode,
                                   max_pixels=manifest.max_pixels,
                                   sizes=(present.get(r.name), present.get(r.index))): r
                       for r in manifest.shards}
            for future in as_completed(futures):
                bar.update(futures[future].num_samples)
            checks = [future.result() for future in futures]  # manifest order
        bar.close()
        # left by an older, larger conversion, or copied in by hand: a loader ignores them, but they are not what
        # the manifest describes
        problems += [f"{name}: not listed in {manifest_name(split)} (left by an older conversion?); remove it"
                     for name in unlisted_shard_files(present, manifest)]
        keys: set[str] = set()
        for check in checks:
            problems += check.problems
            duplicates = keys.intersection(check.keys)
            if duplicates:
                problems.append(f"{check.name}: key {sorted(duplicates)[0]} also appears in another {split} shard")
            keys.update(check.keys)
            stats["decoded"] += check.decoded
            stats["cpu_seconds"] += check.cpu_seconds
        total = sum(r.num_samples for r in manifest.shards)
        if total != manifest.num_samples:
            problems.append(f"{manifest_name(split)}: shards hold {total} samples, num_samples={manifest.num_samples}")
        if manifest.discovered != manifest.num_samples + len(manifest.rejected):
            problems.append(f"{manifest_name(split)}: discovered {manifest.discovered} != packed "
                            f"{manifest.num_samples} + rejected {len(manifest.rejected)}")
        stats["samples"] += sum(len(check.keys) for check in checks)
        stats["listed"] += total
        stats["shards"] += len(manifest.shards)
    stats["seconds"] = time.perf_counter() - start
    return problems, stats
