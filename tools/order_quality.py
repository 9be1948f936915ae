"""How well a train order mixes, and what it costs, from the plan alone (no images): `python -m tools.order_quality`.

    python -m tools.order_quality --samples 1281167 --shards 280 --classes 1000 --ranks 8,64,512 \\
        --global-batch 1024,65536

For each process count and global batch it compares three orders over two consecutive epochs of a split shaped
like ImageNet (shards of equal size, labels spread over the shards by the converter's write-time shuffle):

    shard        the previous order, as DALI reads it: a new shard order every epoch, each rank its contiguous
                 share, through a shuffle buffer of pipeline.constants.SHUFFLE_BUFFER samples per rank (DALI's
                 algorithm: fill the buffer, then hand out a random one and put the next sample in its place)
    sample (c)   pipeline.order's `sample` order with chunks of c samples (--chunks), by the product's functions
    iid          a uniformly random permutation of the split every epoch: the ideal

and measures, per order, for the micro-batch one GPU sees (what its batch norm sees) and for the global batch (what
one optimizer step sees):

    re-meet         of the sample pairs that share a batch in epoch e, the share that share one again in epoch e+1
                    (an i.i.d. order gives about batch / samples; in parentheses the ratio to the iid column)
    shards/batch    distinct shards a batch draws from (mean)
    label TV        total variation distance between a micro-batch's label histogram and the split's, mean over
                    micro-batches (an i.i.d. draw is not 0 either: the iid column is the yardstick)

and, for `sample` order, the cost per rank of preparing one epoch: the time to compute the order and write its
reader entries' index files (measured, on this machine, with the product's SplitIndex over synthetic indexes of
the same shape), the index files and DALI pipelines (segments) per epoch, and the memory the order holds.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.constants import SHUFFLE_BUFFER
from pipeline.order import ORDER_CHUNK, EntryFolder, SplitIndex, epoch_stream, rank_batches, segments
from shards.schema import INDEX_VERSION, Manifest, ShardRecord, index_name, shard_name
from shards.store import open_store


# --- the orders, as global batches ----------------------------------------------------------------------------
def shard_order_batches(counts: np.ndarray, *, seed: int, epoch: int, world: int, batch: int) -> np.ndarray:
    """(steps, global batch) sample numbers in the previous order (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch, 1])
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    samples = np.concatenate([np.arange(starts[s], starts[s] + counts[s]) for s in rng.permutation(len(counts))])
    total = len(samples)
    per_rank = []
    for rank in range(world):
        share = samples[total * rank // world: total * (rank + 1) // world]
        per_rank.append(buffered(share, rng=np.random.default_rng([seed, epoch, 2, rank])))
    steps = min(len(r) for r in per_rank) // batch
    return np.concatenate([r[: steps * batch].reshape(steps, batch) for r in per_rank], axis=1)


def buffered(stream: np.ndarray, *, rng: np.random.Generator, size: int = SHUFFLE_BUFFER) -> np.ndarray:
    """`stream` through a shuffle buffer of `size`: fill it, then output a random element and refill its place
    with the next sample; drain it at the end (random order)."""
    size = min(size, len(stream))
    pool = list(stream[:size])
    picks = rng.integers(0, size, len(stream) - size) if len(stream) > size else []
    out = np.empty(len(stream), dtype=np.int64)
    for i, (pick, sample) in enumerate(zip(picks, stream[size:], strict=True)):
        out[i] = pool[pick]
        pool[pick] = sample
    out[len(stream) - size:] = rng.permutation(np.array(pool, dtype=np.int64))
    return out


def sample_order_batches(counts: np.ndarray, *, seed: int, epoch: int, world: int, batch: int,
                         chunk: int = ORDER_CHUNK) -> np.ndarray:
    stream = epoch_stream(counts, seed=seed, epoch=epoch, chunk=chunk)
    return np.concatenate([rank_batches(stream, rank=r, world_size=world, batch_size=batch) for r in range(world)],
                          axis=1)


def iid_batches(counts: np.ndarray, *, seed: int, epoch: int, world: int, batch: int) -> np.ndarray:
    stream = np.random.default_rng([seed, epoch, 3]).permutation(int(counts.sum()))
    steps = len(stream) // (world * batch)
    return stream[: steps * world * batch].reshape(steps, world * batch)


def variants(chunks: list[int]) -> dict[str, object]:
    """Order name (as the tables print it) -> its global batches' maker."""
    return {"shard": shard_order_batches,
            **{f"sample ({c})": functools.partial(sample_order_batches, chunk=c) for c in chunks},
            "iid": iid_batches}


# --- the measures ---------------------------------------------------------------------------------------------
def pairs(sizes: np.ndarray) -> int:
    return int((sizes * (sizes - 1) // 2).sum())


def remeet_share(first: np.ndarray, second: np.ndarray, total: int) -> float:
    """Of the pairs sharing a global batch of `first`, the share sharing one of `second` too."""
    batch_of = np.full(total, -1, dtype=np.int64)
    batch_of[second.reshape(-1)] = np.repeat(np.arange(len(second)), second.shape[1])
    later = batch_of[first]  # (batches of first, members): their batch in the second epoch, -1 if it sat out
    keys = np.repeat(np.arange(len(first)), first.shape[1]) * (len(second) + 1) + (later.reshape(-1) + 1)
    keys = keys[later.reshape(-1) >= 0]
    _, together = np.unique(keys, return_counts=True)
    return pairs(together) / pairs(np.full(len(first), first.shape[1]))


def shards_per_batch(batches: np.ndarray, starts: np.ndarray) -> float:
    shard = np.searchsorted(starts, batches, side="right") - 1
    return float(np.mean([len(np.unique(row)) for row in shard]))


def label_tv(batches: np.ndarray, labels: np.ndarray, classes: int) -> float:
    rows = np.repeat(np.arange(len(batches)), batches.shape[1])
    hist = np.bincount(rows * classes + labels[batches.reshape(-1)], minlength=len(batches) * classes)
    hist = hist.reshape(len(batches), classes) / batches.shape[1]
    split = np.bincount(labels, minlength=classes) / len(labels)
    return float(np.mean(0.5 * np.abs(hist - split).sum(axis=1)))


def quality(counts: np.ndarray, labels: np.ndarray, classes: int, *, world: int, global_batch: int,
            chunks: list[int], seed: int = 0) -> dict[str, dict[str, float]]:
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    batch, out = global_batch // world, {}
    for order, make in variants(chunks).items():
        first, second = (make(counts, seed=seed, epoch=e, world=world, batch=batch) for e in (0, 1))
        micro_first, micro_second = first.reshape(-1, batch), second.reshape(-1, batch)  # rank by rank, step by step
        out[order] = {"remeet_micro": remeet_share(micro_first, micro_second, int(counts.sum())),
                      "remeet_global": remeet_share(first, second, int(counts.sum())),
                      "shards_micro": shards_per_batch(micro_first, starts),
                      "shards_global": shards_per_batch(first, starts),
                      "label_tv_micro": label_tv(micro_first, labels, classes)}
    return out


# --- the cost of `sample` order per rank --------------------------------------------------------------------------
def synthetic_split(folder: Path, counts: np.ndarray) -> Manifest:
    """Index files shaped like a converted split's (three members per sample, ~110 KB images) and a manifest
    that lists them, so the product's SplitIndex reads them as it reads a real split's."""
    records = []
    for shard, count in enumerate(counts):
        sizes = np.random.default_rng(shard).integers(60_000, 160_000, count)
        lines, offset = [], 0
        for j, size in enumerate(sizes):
            key = f"n{shard:08d}_{j}"
            jpg, cls, meta = offset + 512, offset + 1024 + size + (-size % 512), offset + 2048 + size + (-size % 512)
            lines.append(f"jpg {jpg} {size} {key}.jpg cls {cls} 6 {key}.cls json {meta} 90 {key}.json")
            offset = meta + 512
        (folder / index_name("train", shard)).write_text(f"{INDEX_VERSION} {count}\n" + "\n".join(lines) + "\n")
        records.append(ShardRecord(shard_name("train", shard), index_name("train", shard), int(count), offset, ""))
    return Manifest(split="train", num_samples=int(counts.sum()), discovered=int(counts.sum()), converted=0,
                    rejected=[], classes=[], label_encoding={}, shards=records, seed=0, options={}, tool_version="")


def rank_cost(index: SplitIndex, *, world: int, global_batch: int, chunk: int, rank: int = 0) -> dict[str, float]:
    """Prepare one epoch of rank `rank` as the DALI loader does (order, batches, segments, every segment's index
    files written and removed); seconds, files, pipelines and the order's memory."""
    started = time.perf_counter()
    stream = epoch_stream(index.counts, seed=0, epoch=0, chunk=chunk)
    batches = rank_batches(stream, rank=rank, world_size=world, batch_size=global_batch // world)
    cut = segments(index, batches)
    computed = time.perf_counter() - started
    folder = EntryFolder()
    try:
        for segment in cut:
            _, _, written = folder.write(index, segment.entries, str)
            shutil.rmtree(written)
    finally:
        folder.close()
    return {"seconds": time.perf_counter() - started, "order_seconds": computed,
            "index_files": sum(len(s.entries) for s in cut), "pipelines": len(cut),
            "memory_mb": (index.nbytes + stream.nbytes + batches.nbytes) / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.order_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_281_167, help="samples in the split (ImageNet's train)")
    parser.add_argument("--shards", type=int, default=280, help="shards of the split")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ranks", default="8,64,512", help="process counts, comma list")
    parser.add_argument("--global-batch", default="1024,65536", help="global batches, comma list")
    parser.add_argument("--chunks", default=f"{ORDER_CHUNK},4", help="sample order's chunk sizes to compare")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",")]
    global_batches = [int(x) for x in args.global_batch.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    counts = np.full(args.shards, args.samples // args.shards, dtype=np.int64)
    counts[: args.samples % args.shards] += 1
    labels = np.random.default_rng(7).permutation(np.arange(args.samples) % args.classes)  # write-time shuffle
    print(f"split: {args.samples} samples in {args.shards} shards, {args.classes} classes; chunk {ORDER_CHUNK}, "
          f"shuffle buffer {SHUFFLE_BUFFER}")
    rows, figures = [], []
    for world in ranks:
        for global_batch in global_batches:
            if global_batch % world:
                continue
            q = quality(counts, labels, args.classes, world=world, global_batch=global_batch, chunks=chunks)
            figures.append({"ranks": world, "global_batch": global_batch, **q})
            iid = q["iid"]
            for order, f in q.items():
                rows.append(f"| {world} | {global_batch} | {global_batch // world} | {order} | "
                            f"{f['remeet_micro']:.1e} ({f['remeet_micro'] / iid['remeet_micro']:.1f}x) | "
                            f"{f['remeet_global']:.1e} ({f['remeet_global'] / iid['remeet_global']:.1f}x) | "
                            f"{f['shards_micro']:.0f} | {f['shards_global']:.0f} | {f['label_tv_micro']:.3f} |")
            print(f"  measured {world} ranks, global batch {global_batch}", file=sys.stderr)
    print("\n| ranks | global batch | per GPU | order | re-meet per GPU | re-meet global | shards per GPU batch | "
          "shards per global batch | label TV per GPU |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    with tempfile.TemporaryDirectory() as folder:
        index = SplitIndex(open_store(folder), synthetic_split(Path(folder), counts))
        costs = []
        print("\n| ranks | global batch | chunk | epoch order per rank (s) | of which computing it (s) | index files "
              "per rank per epoch | DALI pipelines per epoch | memory per rank (MB) |\n" + "|---" * 8 + "|")
        for world in ranks:
            global_batch = min(global_batches, key=lambda g: abs(g // world - 256))  # nearest 256 per GPU
            for chunk in chunks:
                cost = rank_cost(index, world=world, global_batch=global_batch, chunk=chunk)
                costs.append({"ranks": world, "global_batch": global_batch, "chunk": chunk, **cost})
                print(f"| {world} | {global_batch} | {chunk} | {cost['seconds']:.2f} | {cost['order_seconds']:.2f} | "
                      f"{cost['index_files']} | {cost['pipelines']} | {cost['memory_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"quality": figures, "cost": costs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
