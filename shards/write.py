"""Writing the planned shards: each packed into a tar and its DALI index by a process of a pool, and handed to
the sink (shards.publish) as it completes.

    write_shards(plan[job_index::num_jobs], digests, ...)   skips complete shards, runs the pool, one progress bar
    write_shard(shard, ...)                                 one shard: read, prepare (shards.images), pack, commit

Every source of a shard is packed or rejected with its reason (`--strict`: the first rejection stops the run).
A shard is written atomically (shards.tarshard: `.partial` files renamed into place), so a killed run leaves
nothing that looks finished, and the pool's workers die with the converter.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from shards.images import RejectedImage, prepare_image
from shards.plan import ShardPlan, WriteOptions
from shards.process import end_with_parent
from shards.publish import ShardResult, ShardSink, index_digest, is_complete, publish_shard
from shards.schema import (
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    ShardRecord,
    encode_label,
    format_index,
    index_name,
    shard_name,
)
from shards.sources import SourceFile
from shards.tarshard import ShardWriter


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
    """Pool worker initializer: keep the progress queue, and be killed when the converter process dies
    (shards.process.end_with_parent), so a `kill -9` of the converter does not leave workers writing shards
    nobody records. Elsewhere than on Linux workers end with their queue instead."""
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = progress_queue
    end_with_parent(signal.SIGKILL, parent=parent)


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
