"""`sample` order on the DALI backends: a rank's epoch read as segments, each by a DALI pipeline of its own.

An epoch in `sample` order is a few thousand reader entries per segment (pipeline.order: a DALI reader takes a
bounded number), so an epoch on one GPU is a handful of pipelines. The loader reads the current one while the
next (the next segment, or the next epoch's first) is built in a background thread and starts prefetching, so
neither a segment nor an epoch boundary shows in the step time. A segment's pipeline is seeded from (seed, rank,
epoch, first batch), and a state saved mid-segment holds its DALI checkpoint: restored on the same loader it
continues bit for bit; at a segment's end nothing more is needed.

With a node-local shard cache (shards.cached_store), each segment's entries name the local copy of every shard
cached by the time the segment is built and the store's URL of the others; the segment holds its shards until its
pipeline is dropped (a held shard is never evicted), and each new current segment tells the cache which shards
the rest of the epoch reads first.
"""

from __future__ import annotations

import base64
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.base import ShardReadError
from pipeline.order import EntryFolder, Segment, rank_segments, shards_read
from shards.local_store import Hold


def sample_order_reader(tars: list[str], indexes: list[str]) -> dict[str, Any]:
    """The reader of one segment (pipeline.dali.imagenet_graph's `reader`): its entries, read in the order given."""
    return dict(paths=tars, index_paths=indexes, random_shuffle=False)


def segment_seed(seed: int, rank: int, epoch: int, first_batch: int) -> int:
    """Seed of a segment's pipeline: its own augmentation stream, the same for the same segment."""
    return int(np.random.SeedSequence([seed, rank, epoch, first_batch]).generate_state(1)[0] % 2**31)


class SegmentReads:
    """`sample` order on DALI: the rank's epoch as segments (pipeline.order.segments), each read by a pipeline of
    its own. What comes next (the next segment, or the next epoch's first) is built in a background thread and
    starts prefetching while the current one is read, so a segment or epoch boundary costs no step time."""

    def __init__(self, loader: Any, state: dict[str, Any] | None) -> None:
        """`loader`: the DaliLoader this reads for (its `iterator`, `_index`, `store` and position)."""
        self.loader = loader
        self.folder = EntryFolder()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-segment")
        self._saved = state  # a state of this same loader: its segment continues exactly (DALI checkpoint)
        self._plan: list[Segment] = []  # the epoch's segments still to read, the current one first
        self._epoch = -1
        self._dali: Any = None  # the current segment's iterator
        self._hold = Hold()  # its shards, kept in a shard cache while its pipeline may read them
        self._left = 0  # its batches not yet read
        self._ahead: Future | None = None  # (epoch, first batch, plan, (iterator, hold)) being built

    def plan(self, epoch: int, first_batch: int) -> list[Segment]:
        loader = self.loader
        return rank_segments(loader._index, seed=loader.seed, epoch=epoch, rank=loader.rank,
                             world_size=loader.world_size, batch_size=loader.batch_size, chunk=loader.order_chunk,
                             first_batch=first_batch)

    def open(self, epoch: int, segment: Segment, *, checkpoint: bytes | None = None,
             prefetch: bool = True) -> tuple[Any, Hold, int]:
        """(the segment's DALI iterator, the hold on its shards: release it when the iterator is dropped, how many
        of them it reads from local files)."""
        loader = self.loader
        names = shards_read(loader._index, [segment])
        hold = loader.store.hold(names)  # before the entries name local copies
        try:
            urls = {name: loader.store.url(name) for name in names}  # once per shard, not per entry
            local = sum(isinstance(url, Path) for url in urls.values())
            tars, indexes, folder = self.folder.write(loader._index, segment.entries, urls.__getitem__)
            try:  # DALI parses the indexes when the pipeline is built; the files are not needed afterwards
                dali = loader.iterator(sample_order_reader(tars, indexes), checkpoint=checkpoint, prefetch=prefetch,
                                       seed=segment_seed(loader.seed, loader.rank, epoch, segment.first_batch))
                return dali, hold, local
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        except BaseException:
            hold.release()
            raise

    def _local(self, segment: Segment) -> int:
        """How many of the segment's shards are local files now (all in a folder; none on a store without cache)."""
        return sum(self.loader.store.local_path(name) is not None for name in shards_read(self.loader._index,
                                                                                          [segment]))

    def _current(self, plan: list[Segment], opened: tuple[Any, Hold, int]) -> None:
        """Make `plan[0]` (opened) the segment being read, releasing the one before."""
        self._release()
        self._plan, (self._dali, self._hold, _) = plan, opened
        self._left = plan[0].num_batches
        self.loader.store.want(shards_read(self.loader._index, plan))

    def _release(self) -> None:
        self._dali = None
        self._hold.release()

    def start(self, epoch: int, batch: int) -> None:
        """Read `epoch` from micro-batch `batch` on."""
        self.stop()
        saved, self._saved = self._saved, None
        self._epoch = epoch
        if saved is not None and "dali_checkpoint" in saved:  # mid-segment, same loader: continue it exactly
            first = int(saved["segment_first_batch"])
            plan = self.plan(epoch, first)
            self._current(plan, self.open(epoch, plan[0], checkpoint=base64.b64decode(saved["dali_checkpoint"]),
                                          prefetch=False))
            self._left = first + self._plan[0].num_batches - batch
        else:
            ahead = self._take_ahead(epoch, batch)
            if ahead is None:
                plan = self.plan(epoch, batch)
                ahead = plan, self.open(epoch, plan[0], prefetch=False)
            self._current(*ahead)
        self._prepare_next()

    def next(self) -> dict:
        loader = self.loader
        if self._left == 0:  # the current segment is read: the next one, built ahead
            following = self._plan[0].first_batch + self._plan[0].num_batches
            self._release()
            ahead = self._take_ahead(self._epoch, following)
            self._current(*(ahead if ahead is not None else (self._plan[1:], self.open(self._epoch, self._plan[1]))))
            self._prepare_next()
        with loader._dali_errors("reading"):
            try:
                out = next(self._dali)[0]
            except StopIteration:
                raise ShardReadError(f"{loader.backend}: DALI ended a segment of the {loader.split} epoch early, "
                                     f"at batch {loader.batch_in_epoch} (rank {loader.rank} of "
                                     f"{loader.world_size})") from None
        self._left -= 1
        return out

    def _prepare_next(self) -> None:
        """Start building what follows the current segment: the next segment, or the next epoch's first."""
        epoch, rest = self._epoch, self._plan[1:]

        def build() -> tuple:
            if rest:
                return epoch, rest[0].first_batch, rest, self.open(epoch, rest[0])
            plan = self.plan(epoch + 1, 0)
            return epoch + 1, 0, plan, self.open(epoch + 1, plan[0])

        self._ahead = self._pool.submit(build)

    def _take_ahead(self, epoch: int, first_batch: int) -> tuple | None:
        """(plan, (iterator, hold, local)) built ahead when it starts at (`epoch`, `first_batch`); else None (it is
        dropped). Built again when a shard cache has verified shards it would read from the store: the same
        segment with the same seed, so the same batches, read from local files (a pipeline build, once per
        segment while the cache fills)."""
        if self._ahead is None:
            return None
        future, self._ahead = self._ahead, None
        built_epoch, built_first, plan, opened = future.result()  # a failure to build it is raised here
        if (built_epoch, built_first) != (epoch, first_batch):
            opened[1].release()
            return None
        if self._local(plan[0]) > opened[2]:
            fresh = self.open(epoch, plan[0], prefetch=False)
            opened[1].release()
            opened = fresh
        return plan, opened

    def checkpoint(self, batch: int) -> dict[str, Any]:
        """What continues this segment exactly (on a loader like this one): its first batch and, mid-segment, the
        DALI checkpoint of its pipeline. At a segment's end nothing more is needed: the next one starts afresh."""
        if self._saved is not None:  # restored but not read yet: what it was restored from
            return {k: self._saved[k] for k in ("segment_first_batch", "dali_checkpoint") if k in self._saved}
        if self._dali is None or self._left == 0 or batch == 0:
            return {"segment_first_batch": batch}
        checkpoint = base64.b64encode(self._dali.checkpoints()[0]).decode("ascii")
        return {"segment_first_batch": self._plan[0].first_batch, "dali_checkpoint": checkpoint}

    def stop(self) -> None:
        """Drop the segment in progress (what was built ahead stays, for the next start to take)."""
        self._release()
        self._left = 0

    def close(self) -> None:
        self.stop()
        if self._ahead is not None:
            try:
                self._ahead.result()[3][1].release()
            except Exception:  # closing: a build that failed has nothing left to report to
                pass
            self._ahead = None
        self._pool.shutdown(wait=True)
        self.folder.close()
