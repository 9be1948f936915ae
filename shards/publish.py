"""The converter's sink: finished shards go into the store, then their records.

A shard is written whole on local disk first (the tar writer needs a seekable, renamable file), into the
store's own folder when the store is one (nothing moves), else into a private spool. `publish` then uploads
the `.idx` and the tar (multipart above `shards.store.MULTIPART_BYTES`, several shards at once) and writes the
shard's record last, so a record exists only for a shard wholly in the store; a killed run leaves at most
shards without records, which the next run rewrites.

Spool disk stays bounded: `publish` blocks while `uploads` shards wait for their upload, and the converter
keeps at most `workers` shards being written, so the spool never holds more than `workers + uploads` shards.
A private spool is named `saturate-spool.tmp-<host>-<pid>-<random>` (shards.process's temporary naming), so the
next converter run removes the spool of one that was killed (`kill -9`, OOM) instead of leaving its shards,
up to `workers + uploads` of them at 512 MB each, in the temporary folder for good.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from shards.process import FOREIGN_STALE_AFTER, TMP_MARK, host_tag, is_stale
from shards.store import Store

UPLOADS_IN_FLIGHT = 4  # shards uploading at once (each in up to shards.store.UPLOAD_THREADS parts)
SPOOL_NAME = "saturate-spool"


def remove_stale_spools(parent: str | Path, *, foreign_after: float = FOREIGN_STALE_AFTER) -> list[Path]:
    """Remove the private spools in `parent` whose converter no longer runs (same rule as the atomic writers'
    temporaries: a spool of another host goes once it is `foreign_after` seconds old); returns what went."""
    removed = []
    for entry in Path(parent).glob(f"{SPOOL_NAME}{TMP_MARK}*"):
        try:
            if entry.is_dir() and is_stale(entry, foreign_after=foreign_after):
                shutil.rmtree(entry)
                removed.append(entry)
        except FileNotFoundError:  # another run removed it first
            continue
    return removed


class ShardSink:
    """Where the converter's finished shards go (see the module docstring). Use as a context manager: leaving
    it waits for every upload and re-raises the first failure."""

    def __init__(self, store: Store, *, spool_dir: str | Path | None = None, uploads: int = UPLOADS_IN_FLIGHT):
        self.store = store
        self._own_spool = store.local_dir is None
        if self._own_spool:
            parent = Path(spool_dir if spool_dir is not None else tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_spools(parent)
            # mkdtemp's random tail has no '-', so the name parses as <host>-<pid>-<random>
            self.spool = Path(tempfile.mkdtemp(prefix=f"{SPOOL_NAME}{TMP_MARK}{host_tag()}-{os.getpid()}-", dir=parent))
        else:
            self.spool = store.local_dir
        self._slots = threading.BoundedSemaphore(uploads)
        self._pool = ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="upload")
        self._futures: list[Future] = []

    def publish(self, files: list[tuple[str, str | None]], record: tuple[str, str]) -> None:
        """Put `files` ((name in the spool, sha256 or None), in order) into the store, then write `record`
        (name, text). Returns once the upload is queued; blocks while `uploads` are already waiting."""
        self._raise_failed()
        self._slots.acquire()
        try:
            self._futures.append(self._pool.submit(self._upload, files, record))
        except BaseException:
            self._slots.release()
            raise

    def _upload(self, files: list[tuple[str, str | None]], record: tuple[str, str]) -> None:
        try:
            for name, sha256 in files:
                self.store.put_file(self.spool / name, name, sha256=sha256)
            if self._own_spool:
                for name, _ in files:
                    (self.spool / name).unlink(missing_ok=True)
            self.store.put_bytes(*record)
        finally:
            self._slots.release()

    def _raise_failed(self) -> None:
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()  # an upload's error (access denied, endpoint gone), naming the URL

    def close(self, *, cancel: bool = False) -> None:
        """Wait for every queued upload (or drop the queued ones with `cancel`), re-raise the first failure,
        and remove a private spool."""
        try:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            if not cancel:
                for future in self._futures:
                    future.result()
        finally:
            self._futures.clear()
            if self._own_spool:
                shutil.rmtree(self.spool, ignore_errors=True)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        self.close(cancel=exc_type is not None)
