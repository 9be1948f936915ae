"""ImageNet folders -> WebDataset shards: discover -> plan -> write (tar + index per shard) -> publish -> manifest.

    sources  = discover(src, labels_csv=...)                  every regular, non-hidden file, with its WNID
    classes  = resolve_classes(...)                           ImageFolder order: sorted WNIDs (or --classes)
                                                              (both in shards.sources)
    plan     = plan_shards(sources, seed=..., ...)            global shuffle, then cut into shards
    results  = write_shards(plan[job_index::num_jobs], ...)   each shard written atomically, in parallel,
                                                              then published by a ShardSink (shards.publish)
    manifest = write_manifest(out, split)                     once every planned shard is in OUT

OUT is a folder or an object store prefix (`s3://bucket/prefix`, shards.store): shards are written to local
disk (the folder itself, or a bounded spool) and the sink uploads each as it completes, `.idx` and tar first,
the shard's record under OUT/.parts last; plans, records and manifests are read and written through the store.

The plan depends only on the sources, the seed and the options that shape the output, so J jobs (or machines)
that each write `plan[job_index::num_jobs]` produce exactly the shards one job would, and a rerun after a
crash skips every shard whose record and sha256 still match.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tqdm import tqdm

from shards.images import CHECKS, DEFAULT_MAX_PIXELS, RejectedImage, prepare_image
from shards.process import check_workers, usable_cpus
from shards.publish import (
    ShardResult,
    ShardSink,
    index_digest,
    is_complete,
    publish_plan,
    publish_shard,
    write_manifest,
)
from shards.schema import (
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    TAR_BLOCK,
    Manifest,
    ShardRecord,
    check_split_name,
    encode_label,
    format_index,
    index_name,
    load_manifest,
    manifest_name,
    sample_key,
    shard_name,
)
from shards.sources import SourceFile, check_hidden_class_folders, discover, resolve_classes
from shards.store import open_store
from shards.tarshard import ShardWriter

DEFAULT_SHARD_BYTES = 512 * 10**6  # bytes; DALI and webdataset both read 256 MB - 1 GB shards efficiently
_MAX_KEY_CHARS = 80  # ustar names hold 100 bytes: key + "-NNN" + ".json" must fit


def tool_version() -> str:
    try:
        return version("saturate")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ShardPlan:
    index: int
    sources: tuple[SourceFile, ...]


@dataclass(frozen=True)
class WriteOptions:
    """Options that change the bytes written; they are part of the plan digest and of the manifest."""

    split: str
    seed: int
    shard_bytes: int | None
    samples_per_shard: int | None
    max_size: int | None
    quality: int
    check: str  # "decode" (strict decode of every pass-through JPEG) or "header" (trust a well-formed header)
    max_pixels: int  # width x height above which an image is rejected (decompression bombs)


# --- plan -------------------------------------------------------------------------------------------------
def assign_keys(sources: Sequence[SourceFile]) -> list[SourceFile]:
    """Unique, safe keys from file names; collisions get `-2`, `-3`, ... in path order (deterministic)."""
    taken: set[str] = set()
    keyed = []
    for s in sources:
        base = sample_key(s.rel)[:_MAX_KEY_CHARS]
        key, n = base, 1
        while key in taken:
            n += 1
            key = f"{base}-{n}"
        taken.add(key)
        keyed.append(SourceFile(s.rel, s.wnid, s.size, key, s.mtime_ns))
    return keyed


def _sample_bytes(source: SourceFile) -> int:
    """Estimated bytes one sample takes in a tar: 3 headers, payloads rounded up to blocks."""
    blocks = -(-source.size // TAR_BLOCK) + 3 + 2  # image + headers + .cls and .json blocks
    return blocks * TAR_BLOCK


def plan_shards(sources: Sequence[SourceFile], options: WriteOptions) -> list[ShardPlan]:
    """Shuffle globally with the seed (DALI only shuffles inside a buffer), then cut by bytes or samples."""
    order = list(assign_keys(sorted(sources, key=lambda s: s.rel)))
    random.Random(options.seed).shuffle(order)
    shards: list[list[SourceFile]] = [[]]
    budget = 0
    for source in order:
        cost = _sample_bytes(source)
        full = (
            len(shards[-1]) >= options.samples_per_shard
            if options.samples_per_shard
            else budget + cost > options.shard_bytes
        )
        if full and shards[-1]:
            shards.append([])
            budget = 0
        shards[-1].append(source)
        budget += cost
    return [ShardPlan(i, tuple(s)) for i, s in enumerate(shards)]


def plan_digest(shard: ShardPlan, options: WriteOptions, classes: list[dict], *, mtimes: bool = True) -> str:
    """Identifies what a shard must contain; a rerun rewrites any shard whose digest changed. With `mtimes`
    (the per-shard digest that decides skipping) a source modified in place counts as changed; without (the
    split's digest in the manifest) the digest depends only on names, sizes, labels and options, so two
    copies of a source tree give byte-identical manifests."""
    files = [(s.rel, s.size, s.key, s.wnid, *([s.mtime_ns] if mtimes else [])) for s in shard.sources]
    body = json.dumps([asdict(options), classes, files, tool_version()])
    return hashlib.sha256(body.encode()).hexdigest()


# --- write ------------------------------------------------------------------------------------------------
def write_shard(
    shard: ShardPlan, *, src: Path, spool: Path, options: WriteOptions, label_of: dict[str, int],
    strict: bool, digest: str, progress_queue=None,
) -> ShardResult:
    """Pack one shard atomically into the folder `spool`; every source is packed or rejected. The caller
    publishes the result (shards.publish), which also records it under OUT/.parts."""
    split = options.split
    writer = ShardWriter(spool / shard_name(split, shard.index), spool / index_name(split, shard.index))
    result = ShardResult(shard.index, digest, None)
    pending = 0
    try:
        for source in shard.sources:
            prepared = _read_and_prepare(source, src, options)
            if isinstance(prepared, RejectedImage):
                if strict:
                    raise ValueError(f"{src / source.rel}: {prepared} (--strict)") from None
                result.rejected.append({"path": source.rel, "reason": str(prepared)})
            else:
                jpeg, reason = prepared
                label = label_of[source.wnid]
                meta = {"path": source.rel, "wnid": source.wnid, "label": label, "converted": reason}
                writer.add_sample(source.key, [
                    (IMAGE_EXT, jpeg),
                    (LABEL_EXT, encode_label(label)),
                    (META_EXT, json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
                ])
                result.class_counts[source.wnid] = result.class_counts.get(source.wnid, 0) + 1
                if reason:
                    result.converted.append({"path": source.rel, "reason": reason})
            pending += 1
            if progress_queue is not None and pending == 32:
                progress_queue.put((pending, 0))
                pending = 0
        if not writer.samples:
            writer.abort()
        else:
            size, sha = writer.commit()
            result.index_sha256 = index_digest(format_index(writer.samples))
            result.record = asdict(ShardRecord(
                shard_name(split, shard.index), index_name(split, shard.index), len(writer.samples), size, sha
            ))
    except BaseException:
        writer.abort()
        raise
    if progress_queue is not None:
        progress_queue.put((pending, result.record["bytes"] if result.record else 0))
    return result


def _read_and_prepare(source: SourceFile, src: Path, options: WriteOptions) -> tuple[bytes, str | None] | RejectedImage:
    """The packed bytes and conversion reason for one source, or the rejection (returned, not raised, so the
    writer decides what a rejection means: a manifest entry, or the end of a --strict run)."""
    try:
        fd = os.open(os.path.join(src, source.rel), os.O_RDONLY)
        try:  # one exact-size read: no BufferedReader copy, and malloc reuses the freed buffers of earlier files
            data = os.read(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return prepare_image(data, max_size=options.max_size, quality=options.quality, check=options.check,
                             max_pixels=options.max_pixels)
    except RejectedImage as err:
        return err


def write_shards(
    shards: Sequence[ShardPlan], digests: dict[int, str], *, src: Path, sink: ShardSink, options: WriteOptions,
    label_of: dict[str, int], strict: bool, workers: int, progress: bool,
) -> dict:
    """Write shards in parallel, one process per shard, each published as it completes (at most `workers`
    shards are submitted at once, so a slow upload holds the writers back instead of filling the spool), with
    one progress bar in images/s and MB/s."""
    sizes = sink.store.sizes()
    todo = [s for s in shards if not is_complete(sink.store, options.split, s.index, digests[s.index], sizes)]
    skipped = len(shards) - len(todo)
    workers = min(workers, max(len(todo), 1))  # a process per shard at most: forking more only costs
    total = sum(len(s.sources) for s in todo)
    kwargs = dict(src=src, spool=sink.spool, options=options, label_of=label_of, strict=strict)
    start = time.perf_counter()
    written = 0  # bytes
    bar = tqdm(total=total, unit="img", unit_scale=True, disable=not progress, desc=f"{options.split} shards")
    if workers <= 1 or len(todo) <= 1:
        for shard in todo:
            result = write_shard(shard, digest=digests[shard.index], **kwargs)
            publish_shard(result, sink=sink, split=options.split)
            written += result.record["bytes"] if result.record else 0
            bar.update(len(shard.sources))
            bar.set_postfix_str(f"{written / 1e6 / max(time.perf_counter() - start, 1e-9):.0f} MB/s")
    else:
        # The progress queue reaches the workers through the initializer (inherited at fork), not a Manager: a
        # Manager is one more process, and one that outlived a killed converter.
        queue = multiprocessing.get_context("fork").Queue()
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=init_worker, initargs=(os.getpid(), queue)) as pool:
            waiting = iter(todo)
            pending: set = set()
            try:
                while True:
                    for shard in itertools.islice(waiting, workers - len(pending)):
                        pending.add(pool.submit(write_shard_in_worker, shard, digest=digests[shard.index], **kwargs))
                    if not pending:
                        break
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        # re-raises a worker's error (e.g. --strict, a full disk) with its message
                        publish_shard(future.result(), sink=sink, split=options.split)
                    while not queue.empty():
                        images, nbytes = queue.get()
                        bar.update(images)
                        written += nbytes
                    bar.set_postfix_str(f"{written / 1e6 / max(time.perf_counter() - start, 1e-9):.0f} MB/s")
            except BaseException:
                stop_pool(pool)  # report now, not after every shard in flight was finished for nothing
                raise
    bar.close()
    return {"shards_written": len(todo), "shards_skipped": skipped, "images": total, "bytes": written,
            "seconds": time.perf_counter() - start}


_PROGRESS_QUEUE = None  # a pool worker's queue to the converter's progress bar


def init_worker(parent: int, progress_queue) -> None:
    """Pool worker initializer: keep the progress queue, and be killed when the converter process dies (Linux
    PR_SET_PDEATHSIG), so a `kill -9` of the converter does not leave workers writing shards nobody records."""
    import ctypes
    import signal

    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = progress_queue
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end with their queue instead
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def write_shard_in_worker(shard: ShardPlan, **kwargs) -> ShardResult:
    return write_shard(shard, progress_queue=_PROGRESS_QUEUE, **kwargs)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel queued shards and terminate the workers writing the others (their `.partial` files are
    overwritten by the next run)."""
    # no public API before Python 3.14; read before shutdown(), which drops the table
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def parse_size(text: str) -> int:
    """'512MB' -> 512_000_000 bytes (decimal units; KiB/MiB/GiB binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    try:
        value = int(float(number) * units[stripped[len(number):]])
    except (KeyError, ValueError):
        raise ValueError(f"--shard-size {text!r}: expected bytes such as 512MB or 1GB") from None
    if value < 1:
        raise ValueError(f"--shard-size {text!r} must be positive")
    return value


def convert(
    src: str | os.PathLike, out: str | os.PathLike, *, split: str,
    labels_csv: str | os.PathLike | None = None, classes_file: str | os.PathLike | None = None,
    names_file: str | os.PathLike | None = None, shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    samples_per_shard: int | None = None, seed: int = 0, workers: int | None = None, num_jobs: int = 1,
    job_index: int = 0, max_size: int | None = None, quality: int = 90, check: str = "decode",
    max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False, progress: bool = True,
    spool_dir: str | os.PathLike | None = None,
) -> Manifest | None:
    """Convert one split into OUT (a folder or an `s3://bucket/prefix` URL); returns the manifest, or None when
    other jobs' shards are still missing.

    `classes_file` pins the class list (a WNID list, LOC_synset_mapping.txt, or a manifest JSON); without it a
    non-train split reuses `OUT/train.manifest.json`'s classes when that exists, so val gets train's indices.
    `spool_dir`: where shards bound for an object store are written before upload (default: the system's
    temporary folder); it holds at most `workers` + shards.publish.UPLOADS_IN_FLIGHT shards at a time.
    """
    src, store = Path(src), open_store(out)
    check_split_name(split)
    if num_jobs < 1:
        raise ValueError(f"--num-jobs {num_jobs} must be >= 1")
    if not 0 <= job_index < num_jobs:
        raise ValueError(f"--job-index {job_index} must be in [0, --num-jobs {num_jobs})")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {samples_per_shard} must be >= 1")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality {quality} must be in 1..100")
    if check not in CHECKS:
        raise ValueError(f"--check {check!r} must be one of {', '.join(CHECKS)}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"--max-size {max_size} must be >= 1 pixel")
    if max_pixels < 1:
        raise ValueError(f"--max-pixels {max_pixels} must be >= 1")
    check_workers(workers)

    reference = None
    if classes_file is None and split != "train" and store.exists(manifest_name("train")):
        reference = load_manifest(store, "train")
        if progress:
            print(f"{split}: using class indices from {store.url(manifest_name('train'))}")
    options = WriteOptions(split, seed, None if samples_per_shard else shard_bytes, samples_per_shard,
                           max_size, quality, check, max_pixels)

    sources, discovery_rejected, folders = discover(src, labels_csv=Path(labels_csv) if labels_csv else None)
    if labels_csv is None and classes_file is None and reference is None:
        check_hidden_class_folders(src)
    if strict and discovery_rejected:
        first = discovery_rejected[0]
        raise ValueError(f"{src / first['path']}: {first['reason']} (--strict)")
    classes = resolve_classes(sources, folders=folders, classes_file=Path(classes_file) if classes_file else None,
                              names_file=Path(names_file) if names_file else None, reference=reference,
                              reference_path=store.url(manifest_name("train")))
    plan = plan_shards(sources, options)
    digests = {s.index: plan_digest(s, options, classes) for s in plan}
    content = " ".join(plan_digest(s, options, classes, mtimes=False) for s in plan)
    split_digest = hashlib.sha256(content.encode()).hexdigest()
    publish_plan(store, split, digests=[digests[s.index] for s in plan], split_digest=split_digest,
                 discovered=len(sources) + len(discovery_rejected), discovery_rejected=discovery_rejected,
                 classes=classes, options=asdict(options), tool_version=tool_version(),
                 say=print if progress else None)

    mine = plan[job_index::num_jobs]
    with ShardSink(store, spool_dir=spool_dir) as sink:
        stats = write_shards(
            mine, digests, src=src, sink=sink, options=options, label_of={c["wnid"]: c["index"] for c in classes},
            strict=strict, workers=workers or usable_cpus(), progress=progress,
        )
    manifest = write_manifest(store, split)
    if progress:
        _print_summary(split, stats, manifest, job_index, num_jobs, len(mine))
    if strict and manifest is not None and manifest.rejected:  # rejections of an earlier run without --strict
        first = manifest.rejected[0]
        raise ValueError(f"{src / first['path']}: {first['reason']} (--strict; listed in "
                         f"{store.url(manifest_name(split))})")
    if manifest is not None:
        warn_empty_classes(manifest)
    return manifest


def warn_empty_classes(manifest: Manifest) -> None:
    """Say which classes have no sample: their indices are kept (labels match torchvision's ImageFolder with
    allow_empty=True), but a class that is never seen cannot be learned or evaluated."""
    empty = [c for c in manifest.classes if c.get("num_samples") == 0]
    if empty:
        shown = ", ".join(f"{c['wnid']} (index {c['index']})" for c in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        print(f"warning: {manifest.split}: {len(empty)} of {manifest.num_classes} classes have no samples: "
              f"{shown}{more}; their indices are kept", file=sys.stderr)


def _print_summary(split, stats, manifest, job_index, num_jobs, planned) -> None:
    secs = max(stats["seconds"], 1e-9)
    print(f"{split}: job {job_index + 1}/{num_jobs} wrote {stats['shards_written']} of {planned} shards "
          f"({stats['shards_skipped']} already complete), {stats['images']} images in {secs:.1f} s "
          f"= {stats['images'] / secs:.0f} img/s, {stats['bytes'] / 1e6 / secs:.0f} MB/s")
    if manifest is None:
        print(f"{split}: other jobs' shards are still missing; the last job (or `saturate shards merge`) "
              "writes the manifest")
    else:
        print(f"{split}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
              f"{manifest.converted} converted, {len(manifest.rejected)} rejected of {manifest.discovered} "
              f"discovered, {manifest.num_classes} classes")
        for item in manifest.rejected[:10]:
            print(f"  rejected {item['path']}: {item['reason']}")
        if len(manifest.rejected) > 10:
            print(f"  ... {len(manifest.rejected) - 10} more in {manifest_name(split)}")
