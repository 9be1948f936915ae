"""A node-local folder of whole shards copied from an object store, shared by every process of the node.

    cache = ShardCache(remote, "/nvme/cache", manifest, index_bytes, limit=200 * 10**9)
    cache.fetch("train-000003.tar", rank)   # download, verify and publish one shard (or find it there)
    cache.local_path("train-000003.idx")    # the verified local copy of a shard's tar or index, else None
    hold = cache.hold(names); ...; hold.release()   # while a reader may open them, they stay

shards.cached_store puts this behind the Store interface with a downloader thread; this module is the folder.

Layout: DIR/<bucket>/<prefix>/ mirrors the store's location (one DIR serves any number of data sets):

    .saturate-cache                             the marker: it works only in folders it made or marked; one
                                                holding other files is refused, unchanged (shards.cache_dir)
    train-000000.tar, train-000000.idx          published copies, renamed into place whole
    .train-000000.tar.tmp-<host>-<pid>-<rand>   a download in progress (shards.process temporaries)
    .verified/train-000000.tar.json             the stamp: what was checked, and the files as they were then
    .locks/train-000000.tar.get | .use          flock(2) files (see Processes); DIR/.locks/space is DIR's

Trust. A shard is read locally only while its stamp matches: the manifest's sha256 and bytes, the store's index
bytes, and the tar and index files as they were when the sha256 was checked (inode, mtime, size) on this boot of
the machine. A download is written to a temporary, fsynced, hashed and compared with the manifest, then the index
and the tar are renamed into place and the stamp is written last; a process killed at any point (kill -9, OOM, a
node failure) leaves a temporary (removed by the next process) or files without a valid stamp, never a trusted
half shard. Files without a valid stamp (a cache left by a killed job, copied in, changed since, or from before a
reboot) are hashed again, with the index fetched again, before they are trusted, and fetched again when they
differ. A stamp cannot see a bit that flips on the disk without the file being written (mtime unchanged): after a
reboot everything is hashed again, and removing `.verified/` has every shard hashed again by the next process.

Processes. Each shard has two lock files. `.get` is held exclusively while a process downloads, re-checks or
evicts the shard, so a shard is downloaded once per node however many ranks want it; the others read it from the
store meanwhile. `.use` is held shared by every process that may open the shard's files (`hold`); eviction takes
it exclusively without waiting, so a shard in use is never evicted. The kernel drops a flock when its process
dies, so a killed process leaves no claim behind; a claim file named with host and pid would need the staleness
rule of shards.process.is_stale and has a race between finding it stale and removing it. The `.get` file says
which host and pid holds it, for a person looking. `DIR/.locks/space` makes "count the bytes, evict, reserve the
download's bytes" one step across the processes of every data set cached in DIR, so DIR stays under `limit`
whoever downloads. DIR must be on a file system with working flock(2): a node's local disk.

Eviction: `limit` is for DIR as a whole: the bytes counted are those of every cache folder under DIR (every
marked folder: each data set and split cached there), whichever process or job put them there. A download that
does not fit evicts the shards its caller ranks latest (`rank`: position in the order the shards are needed),
those not needed at all first: other splits of its folder and the shards of the other cache folders under DIR
(evicted with their own folder's locks, so never one another process holds or fetches); never one held by a
reader and never one needed sooner than the shard being fetched. When nothing can go the fetch returns FULL and
readers keep reading that shard from the store: a full cache slows reads down to the store's pace, it never
stops them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shards.cache_dir import LOCKS, MARKER, STAMPS, CacheError, cache_folder, cache_folders, disk_error, open_folder
from shards.local_store import Hold, Store, sha256_file
from shards.process import atomic_write, current_umask, host_tag, temporary_path
from shards.schema import Manifest, ShardRecord, check_shard_record, index_beside

PART_BYTES = 64 * 2**20  # bytes per ranged GET of a download: a 512 MB shard is 8 requests
STREAMS = 4  # ranged GETs of one shard in flight
CHUNK = 2**20  # bytes written at a time
DONE, BUSY, FULL = "done", "busy", "full"  # what fetch() did: published or found; another process has it; no room


class CacheClosed(Exception):
    """A download stopped because its process closed the cache (ShardCache.abandon); no error of the data."""


def boot_id() -> str:
    """This boot of the machine (Linux); stamps from an earlier boot are not trusted."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _raise_open_files_limit() -> None:
    """A reader holds one lock file per shard it may open (a segment can name every shard of a split): lift
    the soft limit on open files to the hard one, as DataLoader-heavy programs do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class CacheStats:
    """What this process's cache did (shards, bytes, seconds)."""

    downloaded: int = 0  # shards downloaded and published by this process
    downloaded_bytes: int = 0
    download_seconds: float = 0.0
    rechecked: int = 0  # shards found without a valid stamp, hashed again and found sound
    refetched: int = 0  # of those, found damaged or different and removed (then downloaded again)
    evicted: int = 0  # shards this process removed to stay under the limit


class ShardCache:
    """The cache folder of one store location for the shards of one manifest (see the module docstring)."""

    def __init__(self, remote: Store, cache_dir: str | os.PathLike, manifest: Manifest, index_bytes: dict[str, int],
                 *, limit: int | None) -> None:
        """`index_bytes`: the store's listing of index sizes. `limit`: bytes every cache folder under
        `cache_dir` may hold together (None: the file system's space)."""
        self.remote, self.limit, self.split = remote, limit, manifest.split
        self.cache_dir, self.folder = Path(cache_dir), cache_folder(cache_dir, remote)
        self.records = {r.name: r for r in manifest.shards}
        self._shard_of = {**{r.index: r.name for r in manifest.shards}, **{r.name: r.name for r in manifest.shards}}
        self.index_bytes = {r.index: index_bytes.get(r.index) for r in manifest.shards}
        self.stats = CacheStats()
        self._boot = boot_id()
        open_folder(self.folder, cache_dir=cache_dir, mirrors=str(remote))
        _raise_open_files_limit()
        self._mutex = threading.Lock()
        self._holds: dict[str, list[int]] = {}  # shard -> [lock fd, holds]
        self._holds_pid = os.getpid()
        self._abandoned = threading.Event()  # set by abandon(): downloads stop

    def __getstate__(self) -> dict:  # a spawned worker reads; its holds are its own
        return {**self.__dict__, "_mutex": None, "_holds": {}, "_holds_pid": -1, "_abandoned": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _mutex=threading.Lock(), _abandoned=threading.Event())

    def abandon(self) -> None:
        """Stop this process's downloads at their next chunk (CacheClosed), removing their temporaries; one stuck
        in a request to a frozen store stops when it ends (or with the process: the next one removes it)."""
        self._abandoned.set()

    # --- trust ------------------------------------------------------------------------------------------
    def _stamp(self, record: ShardRecord) -> dict:
        tar, index = (os.stat(self.folder / name) for name in (record.name, record.index))
        return {"sha256": record.sha256, "bytes": record.bytes, "index_bytes": self.index_bytes[record.index],
                "tar": [tar.st_ino, tar.st_mtime_ns, tar.st_size], "index": [index.st_ino, index.st_mtime_ns,
                                                                           index.st_size], "boot": self._boot}

    def _stamp_path(self, name: str) -> Path:
        return self.folder / STAMPS / f"{name}.json"

    def trusted(self, name: str) -> bool:
        """Whether shard `name` (its tar's name) is here, whole, and the one the manifest describes."""
        try:
            return json.loads(self._stamp_path(name).read_text()) == self._stamp(self.records[name])
        except (OSError, ValueError):
            return False

    def local_path(self, name: str) -> Path | None:
        """The trusted local copy of a shard's tar or index `name`; None when there is none (yet)."""
        shard = self._shard_of.get(name)
        return self.folder / name if shard is not None and self.trusted(shard) else None

    # --- locks ------------------------------------------------------------------------------------------
    def _lock_fd(self, name: str, folder: Path | None = None) -> int:
        folder = folder or self.folder
        try:
            return os.open(folder / LOCKS / name, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        except OSError as err:  # a disk remounted read-only, a folder whose permissions changed
            raise disk_error(folder, err, f"opening the lock file {LOCKS}/{name}") from None

    @contextlib.contextmanager
    def _locked(self, name: str, *, wait: bool, folder: Path | None = None) -> Iterator[bool]:
        """flock `<folder>/.locks/<name>` (default: this cache folder's) exclusively; yields False when `wait` is
        off and another process holds it."""
        fd = self._lock_fd(name, folder)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                if name.endswith(".get"):  # who holds it, for a person looking
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{host_tag()} {os.getpid()}\n".encode(), 0)
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def hold(self, names: list[str]) -> Hold:
        """Keep shards `names` (tar names) from eviction until the Hold is released; a shard held before it is
        published is kept once it is. Waits only while one of them is being evicted (milliseconds)."""
        names, taken = [self._shard_of.get(name, name) for name in names], []
        try:
            with self._mutex:
                if self._holds_pid != os.getpid():  # a forked worker: the parent's locks are not its to release
                    self._holds, self._holds_pid = {}, os.getpid()
                for name in names:
                    entry = self._holds.get(name)
                    if entry is None:
                        fd = self._lock_fd(f"{name}.use")
                        fcntl.flock(fd, fcntl.LOCK_SH)
                        self._holds[name] = entry = [fd, 0]
                    entry[1] += 1
                    taken.append(name)
        except BaseException:  # a lock file that cannot be made (CacheError): the holds taken so far go
            self._release(taken)
            raise
        return _CacheHold(self, names)

    def _release(self, names: list[str]) -> None:
        with self._mutex:
            if self._holds_pid != os.getpid():
                return
            for name in names:
                entry = self._holds.get(name)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] == 0:
                    fcntl.flock(entry[0], fcntl.LOCK_UN)  # explicitly: a forked worker may share the descriptor
                    os.close(entry[0])
                    del self._holds[name]

    # --- fetch ------------------------------------------------------------------------------------------
    def fetch(self, name: str, rank: Callable[[str], float]) -> str:
        """Make shard `name` trusted here: DONE (found, re-checked, or downloaded and published), BUSY (another
        process is at it: ask again later) or FULL (no room: nothing evictable is needed later than it).
        `rank(shard)`: when the caller needs a shard (smaller: sooner). Raises CacheError for the disk or a
        shard that is not the manifest's, StoreError when the store fails."""
        record = self.records[name]
        with self._locked(f"{name}.get", wait=False) as mine:
            if not mine:
                return BUSY
            if self.trusted(name) or self._recheck(record):
                return DONE
            temporary = self._reserve(record, rank)
            if temporary is None:
                return FULL
            try:
                self._download(record, temporary)
            finally:
                temporary.unlink(missing_ok=True)
            return DONE

    def _recheck(self, record: ShardRecord) -> bool:
        """Files of `record` without a valid stamp: trusted again when the tar's sha256 matches (the index is
        fetched again, one small GET), else removed. False when there is nothing (sound) here."""
        tar = self.folder / record.name
        if not tar.exists() and not (self.folder / record.index).exists():
            return False
        try:
            sound = tar.is_file() and tar.stat().st_size == record.bytes and sha256_file(tar) == record.sha256
        except OSError:
            sound = False
        if not sound:
            self._remove(self.folder / record.name)
            self.stats.refetched += 1
            return False
        self._publish_index(record, self._fetch_index(record))
        self._write_stamp(record)
        self.stats.rechecked += 1
        return True

    def _reserve(self, record: ShardRecord, rank: Callable[[str], float]) -> Path | None:
        """A temporary for the download with the shard's bytes allocated, after making room under the limit
        (one step for every process using DIR: `DIR/.locks/space`); None when there is no room."""
        need = record.bytes + (self.index_bytes[record.index] or 0)
        with self._locked("space", wait=True, folder=self.cache_dir):
            if self.limit is not None and not self._make_room(need, record.name, rank):
                return None
            temporary = temporary_path(self.folder / record.name)
            try:
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
                try:
                    os.posix_fallocate(fd, 0, record.bytes)  # a full disk shows here, before any GET
                finally:
                    os.close(fd)
            except OSError as err:
                temporary.unlink(missing_ok=True)
                raise disk_error(self.folder, err, f"allocating {record.bytes:,} bytes for {record.name}") from None
            return temporary

    def _make_room(self, need: int, name: str, rank: Callable[[str], float]) -> bool:
        used, shards = self.usage()
        if used + need <= self.limit:
            return True

        def later(tar: Path) -> float:  # another cache folder's shards are not needed by this process at all
            return rank(tar.name) if tar.parent == self.folder else float("inf")

        mine = self.folder / name
        for victim in sorted((s for s in shards if s != mine and later(s) > rank(name)), key=later, reverse=True):
            used -= self._evict(victim)
            if used + need <= self.limit:
                return True
        return False

    def usage(self, *, whole_dir: bool = True) -> tuple[int, list[Path]]:
        """(bytes of the files of every cache folder under DIR, what `limit` counts, or with `whole_dir` off of
        this one: shards, indexes, downloads in progress (not the marker); the shards' tar paths)."""
        used, shards = 0, []
        folders = {self.folder, *cache_folders(self.cache_dir)} if whole_dir else {self.folder}
        for folder in sorted(folders):
            with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
                for entry in entries:
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another process
                        if entry.is_file(follow_symlinks=False) and entry.name != MARKER:
                            used += entry.stat(follow_symlinks=False).st_size
                            if index_beside(entry.name) is not None:
                                shards.append(folder / entry.name)
        return used, shards

    def _evict(self, tar: Path) -> int:
        """Remove shard `tar` (of this cache folder or another under DIR, with its folder's locks) unless a
        process holds or fetches it; returns the bytes freed."""
        name, folder = tar.name, tar.parent
        with (self._locked(f"{name}.get", wait=False, folder=folder) as free,
              self._locked(f"{name}.use", wait=False, folder=folder) as unused):
            if not (free and unused):
                return 0
            freed = self._remove(tar)
            self.stats.evicted += 1
            return freed

    def _remove(self, tar: Path) -> int:
        (tar.parent / STAMPS / f"{tar.name}.json").unlink(missing_ok=True)  # untrusted first: nobody starts using it
        freed = 0
        for path in (tar, tar.with_name(index_beside(tar.name))):
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
        return freed

    # --- download -----------------------------------------------------------------------------------------
    def _fetch_index(self, record: ShardRecord) -> bytes:
        index = self.remote.read_bytes(record.index)
        if self.index_bytes[record.index] is not None and len(index) != self.index_bytes[record.index]:
            raise CacheError(f"{self.remote.url(record.index)}: {len(index):,} bytes read, the store listed "
                             f"{self.index_bytes[record.index]:,}: it changed while the cache read it; start again")
        head = index.split(b"\n", 1)[0].decode("ascii", errors="replace")
        check_shard_record(record, tar_bytes=record.bytes, index_head=head, where=self.remote.url(record.name),
                           split=self.split)
        return index

    def _download(self, record: ShardRecord, temporary: Path) -> None:
        """The shard's index (one GET) and tar (ranged GETs of PART_BYTES, STREAMS at once) into `temporary`,
        fsynced, hashed, compared with the manifest, then published."""
        started = time.perf_counter()
        index = self._fetch_index(record)
        fd = os.open(temporary, os.O_WRONLY)

        def part(offset: int) -> None:
            length = min(PART_BYTES, record.bytes - offset)
            with self.remote.open_range(record.name, offset, length) as stream:
                position = offset
                while position < offset + length and (chunk := stream.read(min(CHUNK, offset + length - position))):
                    if self._abandoned.is_set():
                        raise CacheClosed(record.name)
                    view = memoryview(chunk)
                    while view:  # pwrite may write less than asked
                        try:
                            written = os.pwrite(fd, view, position)
                        except OSError as err:
                            raise disk_error(self.folder, err, f"writing {temporary.name}") from None
                        view, position = view[written:], position + written
            if position != offset + length:
                raise CacheError(f"{self.remote.url(record.name)}: the store sent {position - offset:,} of the "
                                 f"{length:,} bytes asked for at byte {offset:,}")

        try:
            _each_part(part, list(range(0, record.bytes, PART_BYTES)))
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = sha256_file(temporary)
        if digest != record.sha256:
            raise CacheError(f"{self.remote.url(record.name)}: sha256 {digest} of the downloaded shard, the "
                             f"{self.split} manifest says {record.sha256}: the object in the store is not the shard "
                             f"the manifest describes; run `saturate shards verify {self.remote}`")
        self._publish_index(record, index)
        try:
            os.replace(temporary, self.folder / record.name)
        except OSError as err:
            raise disk_error(self.folder, err, f"publishing {record.name}") from None
        self._write_stamp(record)
        self.stats.downloaded += 1
        self.stats.downloaded_bytes += record.bytes + len(index)
        self.stats.download_seconds += time.perf_counter() - started

    def _publish_index(self, record: ShardRecord, index: bytes) -> None:
        try:
            atomic_write(self.folder / record.index, index, fsync=True)
        except OSError as err:
            raise disk_error(self.folder, err, f"writing {record.index}") from None

    def _write_stamp(self, record: ShardRecord) -> None:
        try:
            dir_fd = os.open(self.folder, os.O_RDONLY)  # the renames reach the disk before the stamp says so
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            atomic_write(self._stamp_path(record.name), json.dumps(self._stamp(record)), fsync=True)
        except OSError as err:
            raise disk_error(self.folder, err, f"writing the stamp of {record.name}") from None

    def free_bytes(self) -> int:
        """Bytes free on the cache folder's file system for this user."""
        stat = os.statvfs(self.folder)
        return stat.f_bavail * stat.f_frsize


def _each_part(part: Callable[[int], None], offsets: list[int]) -> None:
    """part(offset) for every offset, STREAMS at once, in daemon threads: a ThreadPoolExecutor's threads are joined
    when the interpreter exits, so one stuck in a GET to a frozen store held the exit for the store's time bound.
    Raises the first error; the other streams stop before their next part."""
    pending, errors = offsets[::-1], []

    def stream() -> None:
        while not errors:
            try:
                offset = pending.pop()  # atomic: each part is taken once
            except IndexError:
                return
            try:
                part(offset)
            except BaseException as err:  # raised in the downloader below
                errors.append(err)

    streams = [threading.Thread(target=stream, name="cache-get", daemon=True)
               for _ in range(min(STREAMS, len(pending)))]
    for thread in streams:
        thread.start()
    for thread in streams:
        thread.join()
    if errors:
        raise errors[0]


class _CacheHold(Hold):
    def __init__(self, cache: ShardCache, names: list[str]) -> None:
        self._cache, self._names = cache, names

    def release(self) -> None:
        names, self._names = self._names, []
        if names:
            self._cache._release(names)


__all__ = ["BUSY", "DONE", "FULL", "CacheClosed", "CacheError", "CacheStats", "ShardCache", "cache_folder"]
