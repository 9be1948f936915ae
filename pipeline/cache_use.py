"""How the loaders read through a node-local shard cache (shards.cached_store): the `cache_dir=`/`cache_limit=`
keywords, the smallest `cache_limit` each way of reading needs, and when the downloader starts.

The smallest limit. A reader holds every shard it may open (shards.cache), and a held shard is never evicted:

    dali-gpu/dali-cpu, `sample` order   the shards named by the segment being read and the one built ahead of it
    pytorch, `sample` order             each worker's open tars (up to SampleReader.OPEN_FILES)
    pytorch, `shard` order and val      each worker's open tar (one at a time)
    dali, `shard` order and val         the local copies the pipeline was built with (they fit already)

so a limit below what the node's processes hold at once could not keep the folder under it, and one below a
shard could never hold a shard at all: such a limit is refused when the loader is built, in one line that says
the smallest limit that works. In `sample` order a segment reads chunks of most shards of the split (4,096
entries of 16 samples: with ImageNet's 1.28 M samples in ~280 shards of 512 MB every segment reads every shard),
so there the smallest limit is nearly the whole split. That is the honest price of a fresh sample-level order:
every pass needs every shard all the time, so no cache can keep "only what the current pass still needs" small.
`shard` order needs a few shards per process. Whatever does not fit under a limit is read from the store.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

from pipeline.base import LoaderOptionError
from pipeline.order import SampleReader, SplitIndex, rank_segments, segments, shards_read
from shards.cached_store import CachedStore
from shards.plan import format_size, parse_size
from shards.process import environment_place
from shards.store import Store, open_store


def check_cache_options(backend: str, shards_dir: str | os.PathLike | Store | None, *, cache_dir: Any,
                        cache_limit: Any) -> int | None:
    """`cache_limit` in bytes (None: no limit but the disk); LoaderOptionError naming the keyword for a cache
    the backend or the location cannot use."""
    if cache_dir is None:
        if cache_limit is not None:
            raise LoaderOptionError("cache_limit", cache_limit, "needs cache_dir, the folder it limits")
        return None
    if backend == "synthetic":
        raise LoaderOptionError("cache_dir", cache_dir, "backend 'synthetic' reads no data; leave it unset")
    if shards_dir is not None and open_store(shards_dir).local_dir is not None:
        raise LoaderOptionError("cache_dir", cache_dir, f"{shards_dir} is a folder and is read in place; a shard "
                                "cache is for s3:// locations (copy a folder on a slow shared file system instead)")
    if isinstance(cache_limit, str):
        try:
            return parse_size(cache_limit, "cache_limit")
        except ValueError:
            raise LoaderOptionError("cache_limit", cache_limit, "expected bytes such as 200GB or 1.5TB") from None
    if cache_limit is not None and (isinstance(cache_limit, bool) or not isinstance(cache_limit, int)
                                    or cache_limit < 1):
        raise LoaderOptionError("cache_limit", cache_limit, "must be bytes >= 1, or a size such as 200GB")
    return cache_limit


def node_ranks(rank: int, world_size: int) -> range:
    """The ranks of this node, as torchrun places them (consecutive; this one is $LOCAL_RANK from the first)."""
    place = environment_place()
    if place.world_size != world_size:  # not placed by torchrun: a process alone on its node
        return range(rank, rank + 1)
    first = rank - place.local_rank
    return range(max(0, first), min(world_size, first + place.local_world_size))


def shard_sizes(store: Store) -> dict[str, int] | None:
    """Bytes each shard takes in a cache (tar and index) by tar name; None when `store` has no cache."""
    if not isinstance(store, CachedStore):
        return None
    return {r.name: r.bytes + (store.cache.index_bytes[r.index] or 0) for r in store.cache.records.values()}


def segments_minimum(index: SplitIndex, sizes: dict[str, int], *, seed: int, epoch: int, rank: int,
                     world_size: int, batch_size: int, chunk: int) -> tuple[int, str]:
    """(bytes, why) the node's DALI `sample`-order readers hold at once: the shards of two consecutive segments
    on each of the node's ranks (they step through their segments together), the most over epoch `epoch` and the
    next one. Later epochs are drawn the same way; should one need more, the shards that do not fit are read from
    the store."""
    ranks = node_ranks(rank, world_size)
    plans = [rank_segments(index, seed=seed, epoch=e, rank=r, world_size=world_size, batch_size=batch_size,
                           chunk=chunk) for r in ranks for e in (epoch, epoch + 1)]
    plans = [plans[i] + plans[i + 1] for i in range(0, len(plans), 2)]  # per rank: this epoch, then the next
    bytes_of = np.array([sizes[name] for name in index.tars], dtype=np.int64)
    most = 0
    for step in range(max(len(plan) for plan in plans)):
        held = {shard for plan in plans for segment in plan[step:step + 2] for shard, _ in segment.entries}
        most = max(most, int(bytes_of[sorted(held)].sum()))
    return most, (f"the shards read by the segment being read and the one built ahead, on {len(ranks)} "
                  "process(es) of this node")


def workers_minimum(sizes: dict[str, int], *, rank: int, world_size: int, workers: int,
                    sample_order: bool) -> tuple[int, str]:
    """(bytes, why) the node's `pytorch` workers hold at once: their open tars."""
    processes = len(node_ranks(rank, world_size))
    per_worker = SampleReader.OPEN_FILES if sample_order else 1
    readers = processes * max(1, workers)
    largest = sorted(sizes.values(), reverse=True)[: readers * per_worker]
    return int(sum(largest)), (f"{processes} process(es) x {max(1, workers)} worker(s) x {per_worker} open tar(s)")


def start_workers_cache(loader: Any) -> None:
    """`start_cache` for a `pytorch` loader: its limit checked against the tars the node's workers hold."""
    sizes = shard_sizes(loader.store)
    if sizes is not None:
        start_cache(loader.store, minimum=workers_minimum(sizes, rank=loader.rank, world_size=loader.world_size,
                                                          workers=loader.num_workers,
                                                          sample_order=loader.order == "sample"))


def pass_order(loader: Any, plan: dict[str, Any]) -> list[str]:
    """The tars a `pytorch` pass (`plan`: its workers' plan) reads, in the order they are first needed: in
    `sample` order its segments' shards, in `shard` order and val the workers' units side by side."""
    if loader.order == "sample":
        return shards_read(loader._index, segments(loader._index, plan["batches"]))
    return [loader.tars[unit[0]] for step in itertools.zip_longest(*plan["units"]) for unit in step
            if unit is not None]


def start_cache(store: Store, *, minimum: tuple[int, str] | None, want: list[str] | None = None) -> None:
    """Refuse a cache limit below `minimum` (bytes, why; None: one shard), or a cache that cannot fit on its
    disk, then start the downloader on `want` (the shards in the order they are read; default: the manifest's).
    Nothing for other stores."""
    if not isinstance(store, CachedStore):
        return
    cache = store.cache
    sizes = list(shard_sizes(store).values())
    need, why = minimum if minimum is not None else (0, "")
    need = max(min(need, sum(sizes)), max(sizes))
    why = why if need > max(sizes) else "one shard"
    try:
        if cache.limit is not None and cache.limit < need:
            raise LoaderOptionError("cache_limit", cache.limit, f"below the smallest limit that works here, "
                                    f"{format_size(need, up=True)} ({need:,} bytes: {why})")
        wanted = sum(sizes) if cache.limit is None else min(cache.limit, sum(sizes))
        used, free = cache.usage(whole_dir=cache.limit is not None)[0], cache.free_bytes()  # evictable bytes
        if wanted > used + free:
            raise LoaderOptionError("cache_dir", str(cache.folder), f"its disk has {format_size(free)} free (and "
                                    f"{format_size(used)} cached), the cache needs {format_size(wanted)} for the "
                                    f"{cache.split} split: free space or set cache_limit (at least "
                                    f"{format_size(need, up=True)})")
    except LoaderOptionError:
        store.close()
        raise
    if want is not None:
        store.want(want)
    store.start()


def stop_cache(store: Store | None) -> None:
    """Stop a cache's downloader (the loader is closed); nothing for other stores."""
    if isinstance(store, CachedStore):
        store.close()


def cached_shards(store: Store) -> int:
    """Shards of the split verified in the store's cache now; 0 without a cache."""
    return store.cached()[0] if isinstance(store, CachedStore) else 0
