"""A store read through a node-local shard cache: the Store interface the loaders already use, with a
downloader thread that copies whole shards into the cache ahead of the readers (shards.cache).

    store = CachedStore(open_store("s3://bucket/imagenet"), "/nvme/cache", manifest, limit=None)
    store.want(names)            # the order the shards are needed in (soonest first)
    store.start()                # the downloader begins; readers need not wait for it
    store.url(name)              # the local copy when it is cached and verified, else the store's URL
    store.read_bytes(name, ...)  # from the local copy when there is one, else one ranged GET
    hold = store.hold(names)     # while a reader may open these files they are not evicted

Nothing waits for the cache: a shard not cached yet is read from the store, so the first epoch starts at once
and every segment, pass or file opened later reads what has been cached by then. One downloader per process;
the processes of a node share the folder and divide the downloads between them (the per-shard `.get` lock), so
each shard crosses the network once per node. A downloader whose store fails keeps the error for the log and
tries again (the readers meet the store's error themselves); a downloader that finds a shard unlike its manifest
or a disk it cannot write stops, and every later call on the store raises that error (CacheError).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any, BinaryIO

from shards.cache import BUSY, FULL, CacheClosed, CacheError, ShardCache
from shards.local_store import STREAM_BUFFER, Hold, Store
from shards.process import StopRequested
from shards.schema import Manifest
from shards.store import StoreError

#: Seconds between looks at shards another process is downloading, or after the store failed.
POLL = 0.5  # seconds
STORE_BACKOFF = 2.0  # seconds
#: Seconds close() waits for the downloader; one stuck in a request to a frozen store is left behind (a daemon).
CLOSE_WAIT = 1.0  # seconds


class CachedStore(Store):
    """`remote` read through a ShardCache of `manifest`'s shards (see the module docstring). Writes go to the
    store itself, never through a cache."""

    def __init__(self, remote: Store, cache_dir: str | os.PathLike, manifest: Manifest, *,
                 limit: int | None) -> None:
        self.remote = remote
        self._listing = remote.sizes()  # one listing: the index sizes the cache checks, and `sizes()` below
        self.cache = ShardCache(remote, cache_dir, manifest, self._listing, limit=limit)
        self.manifest = manifest
        self._order = [r.name for r in manifest.shards]
        self._rank = {name: i for i, name in enumerate(self._order)}
        self._changed = threading.Event()
        self._idle = threading.Event()  # set while the downloader has nothing it can do
        self._closed = False
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # what stopped the downloader
        self.store_error: BaseException | None = None  # the store's last failure seen by the downloader

    def __getstate__(self) -> dict:  # a spawned worker reads; the downloader stays with its parent
        return {**self.__dict__, "_changed": None, "_idle": None, "_thread": None, "_closed": True}

    def __str__(self) -> str:
        return str(self.remote)

    # --- the downloader ----------------------------------------------------------------------------------
    def want(self, names: list[str]) -> None:
        """Shards in the order they are needed, soonest first; the rest of the split follows in manifest order
        (fetched when they fit without evicting any of these)."""
        listed = dict.fromkeys(name for name in names if name in self.cache.records)
        order = list(listed) + [name for name in self.manifest_order() if name not in listed]
        self._order, self._rank = order, {name: i for i, name in enumerate(order)}
        if self._changed is not None:
            self._changed.set()

    def manifest_order(self) -> list[str]:
        return [r.name for r in self.manifest.shards]

    def rank(self, name: str) -> float:
        """When this process needs shard `name`: its place in the wanted order, infinity when not at all."""
        return self._rank.get(name, float("inf"))

    def start(self) -> None:
        """Start the downloader thread (once; a forked worker never starts one)."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._download, name="shard-cache", daemon=True)
            self._thread.start()

    def _download(self) -> None:
        try:
            self._fetch_wanted()
        finally:
            self._idle.set()

    def _fetch_wanted(self) -> None:
        while not self._closed:
            self._changed.clear()
            waiting, full = False, False
            for name in list(self._order):
                if self._closed or self._changed.is_set():
                    break
                if self.cache.trusted(name):
                    continue
                try:
                    outcome = self.cache.fetch(name, self.rank)
                except (StoreError, FileNotFoundError) as err:
                    self.store_error, waiting = err, True
                    self._changed.wait(STORE_BACKOFF)
                    break
                except (StopRequested, CacheClosed):  # the process is stopping (SIGTERM), or closed the cache
                    return
                except BaseException as err:  # a disk that cannot be written, a shard unlike its manifest
                    self.failure = err
                    return
                if outcome == FULL:  # the rest is needed later still: nothing of it fits either
                    full = True
                    break
                waiting = waiting or outcome == BUSY
            if not waiting and not self._changed.is_set():  # all cached, or no room: until the order changes
                self._idle.set()
                self._changed.wait(None if not full else POLL)  # no room: space may be freed by others
                self._idle.clear()
                continue
            self._changed.wait(POLL)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the downloader has nothing it can do (every wanted shard cached, or no room for the next);
        raises what stopped it. False when `timeout` seconds passed first."""
        done = self._idle.wait(timeout)
        self.raise_failure()
        return done

    def check(self) -> None:
        """Raise what stopped the downloader (CacheError), if anything did; else check the store."""
        self.raise_failure()
        self.remote.check()

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Stop the downloader: a download stops at its next chunk and removes its temporary. One waiting on a
        frozen store is not waited for beyond CLOSE_WAIT (it waited out the store's time bound, ~18 s after a
        stall, while the trainer exited): it ends with its request, or with the process (ShardCache.abandon)."""
        self._closed = True
        self.cache.abandon()
        if self._changed is not None:
            self._changed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=CLOSE_WAIT)

    def cached(self) -> tuple[int, int]:
        """(shards of the manifest trusted in the cache now, shards in the manifest)."""
        return sum(self.cache.trusted(name) for name in self.cache.records), len(self.cache.records)

    # --- reads ---------------------------------------------------------------------------------------------
    def url(self, name: str) -> Path | str:
        self.raise_failure()
        local = self.cache.local_path(name)
        return local if local is not None else self.remote.url(name)

    def local_path(self, name: str) -> Path | None:
        return self.cache.local_path(name)

    def hold(self, names: list[str]) -> Hold:
        self.raise_failure()
        return self.cache.hold(names)

    def read_bytes(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        local = self.cache.local_path(name)
        if local is None:
            return self.remote.read_bytes(name, offset=offset, length=length)
        with open(local, "rb") as f:  # open before a possible eviction: the open file stays readable
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def open(self, name: str) -> BinaryIO:
        """The local copy, held while it is open, when there is one; else the store's stream."""
        hold = self.cache.hold([name]) if name in self.cache.records else Hold()
        local = self.cache.local_path(name)
        if local is None:
            hold.release()
            return self.remote.open(name)
        return _HeldFile(local, hold)

    def open_range(self, name: str, offset: int, length: int) -> BinaryIO:
        return self.remote.open_range(name, offset, length)

    # --- the rest is the store's ---------------------------------------------------------------------------
    def resolved(self) -> str:
        return self.remote.resolved()

    def prepare(self) -> None:
        self.remote.prepare()

    def sizes(self, folder: str = "") -> dict[str, int]:
        return dict(self._listing) if not folder else self.remote.sizes(folder)

    def size(self, name: str) -> int | None:
        return self._listing.get(name) if name in self._listing else self.remote.size(name)

    def sha256(self, name: str) -> str | None:
        return self.remote.sha256(name)


class _HeldFile(io.BufferedReader):
    """A cached file open for reading; closing it releases the hold that kept it from eviction."""

    def __init__(self, path: Path, hold: Hold) -> None:
        super().__init__(io.FileIO(path, "rb"), buffer_size=STREAM_BUFFER)
        self._hold = hold

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._hold.release()


def describe(store: Any) -> str | None:
    """One line on a CachedStore's state for logs; None for other stores."""
    if not isinstance(store, CachedStore):
        return None
    cached, total = store.cached()
    stats = store.cache.stats
    line = (f"cache {store.cache.folder}: {cached}/{total} shards verified here; this process downloaded "
            f"{stats.downloaded} ({stats.downloaded_bytes / 1e6:,.0f} MB"
            + (f" at {stats.downloaded_bytes / 1e6 / stats.download_seconds:,.0f} MB/s" if stats.download_seconds
               else "") + f"), re-checked {stats.rechecked}, re-fetched {stats.refetched}, evicted {stats.evicted}")
    if store.store_error is not None:
        line += f"; last store error: {store.store_error}"
    return line


__all__ = ["CacheError", "CachedStore", "describe"]
