"""The node-local shard cache (shards.cache, shards.cache_dir, shards.cached_store) against what an operator, a
disk or a store may bring: a --cache-dir that is not the cache's own, data sets sharing one --cache-limit, a full
or read-only disk, a store that freezes while the process stops. Against the local S3 server (tests/s3_fixtures.py):
the session's tiny shards (train 60 samples in 8 shards, val 25 in 4) uploaded once to each of SETS
(tests/test_cache.py has the rest).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_fixtures import use_server
from test_cache import fill

from pipeline import build_loader
from pipeline.cache_use import shard_sizes
from shards.cache import ShardCache
from shards.cache_dir import LOCKS, MARKER, STAMPS, CacheError
from shards.cached_store import CachedStore
from shards.process import TMP_MARK
from shards.schema import load_manifest
from shards.store import open_store
from tools.cli import main as cli
from tools.local_s3 import upload

ROOT = Path(__file__).resolve().parent.parent
SETS = ("s3://shards/set-a", "s3://shards/set-b")  # two data sets (the same shards) under two prefixes


@pytest.fixture(scope="module")
def remote(tiny_shards, s3_server, tmp_path_factory) -> tuple[str, ...]:
    with pytest.MonkeyPatch.context() as mp:
        use_server(mp, s3_server, tmp_path_factory.mktemp("aws"))
        for url in SETS:
            upload(tiny_shards, url)
    return SETS


def cached_store(cache_dir: Path, url: str = SETS[0], split: str = "train", *,
                 limit: int | None = None) -> CachedStore:
    return CachedStore(open_store(url), cache_dir, load_manifest(url, split), limit=limit)


def folder(cache_dir: Path, url: str = SETS[0]) -> Path:
    return cache_dir.joinpath(*url.removeprefix("s3://").split("/"))


def contents(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (relative) with a file's bytes; None for a folder."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# --- whose folder ---------------------------------------------------------------------------------------------
def test_a_folder_of_shards_that_is_not_a_cache_is_refused_and_left_as_it_is(remote, tiny_shards, s3_env, tmp_path):
    """--cache-dir DIR where DIR/<bucket>/<prefix> happens to be a local copy of the data set, one shard of it
    re-converted since: the cache used to re-check that shard, find it unlike the manifest and delete it (and
    evict the rest under a limit). Now it refuses the folder in one line and changes nothing under DIR."""
    here = folder(tmp_path)
    shutil.copytree(tiny_shards, here)
    copy = bytearray((here / "train-000002.tar").read_bytes())
    copy[1000] ^= 0xFF
    (here / "train-000002.tar").write_bytes(bytes(copy))
    before = contents(tmp_path)
    with pytest.raises(CacheError) as refused:
        fill(cached_store(tmp_path))
    assert str(refused.value) == (
        f"--cache-dir {tmp_path}: {here}, where the cache would keep the shards of {SETS[0]}, holds files that are "
        f"not a shard cache's (train-000000.idx, train-000000.tar, train-000001.idx and 23 more) and no {MARKER} "
        "marker; the cache removes files it cannot trust, so it leaves this folder as it is: give --cache-dir a "
        "folder of its own")
    assert contents(tmp_path) == before  # nothing removed, nothing added (no marker, no .locks)


def test_a_shard_folder_given_as_the_cache_dir_is_refused_and_never_adopted_later(remote, tiny_shards, s3_env,
                                                                                  tmp_path):
    """The review's two steps: the user's shard folder given as --cache-dir by mistake got DIR's `.locks/`, and a
    later cache whose folder was that shard folder adopted it (`.locks/` looked like an old cache) and replaced
    16 of its files. Now the first step is refused with nothing added, and `.locks/` alone adopts nothing."""
    before = contents(tiny_shards)
    with pytest.raises(CacheError, match=f"--cache-dir {tiny_shards} holds files .* so it is not a cache folder"):
        fill(cached_store(tiny_shards))
    assert contents(tiny_shards) == before
    here = folder(tmp_path)
    shutil.copytree(tiny_shards, here)
    (here / LOCKS).mkdir()  # what the first step used to leave
    with pytest.raises(CacheError, match="holds files that are not a shard cache's"):
        fill(cached_store(tmp_path))


def test_a_new_folder_is_marked_and_a_cache_from_before_the_marker_is_adopted(remote, s3_env, tmp_path):
    """A missing folder is made and marked (who made it, for a person looking). A cache made before the marker
    existed (its `.locks/` and `.verified/`, no marker) is adopted: marked, and its shards trusted as they were."""
    here = folder(tmp_path)
    fill(cached_store(tmp_path))
    marker = json.loads((here / MARKER).read_text())
    assert {k: marker[k] for k in ("mirrors", "pid", "adopted")} == {"mirrors": SETS[0], "pid": os.getpid(),
                                                                     "adopted": False}
    (here / MARKER).unlink()  # as a cache from before the marker looks
    assert (here / LOCKS).is_dir() and (here / STAMPS).is_dir()
    store = fill(cached_store(tmp_path))
    assert json.loads((here / MARKER).read_text())["adopted"] is True
    assert store.cached() == (8, 8) and (store.cache.stats.downloaded, store.cache.stats.rechecked) == (0, 0)


def on_disk(cache_dir: Path) -> int:
    """Bytes of shards, indexes and downloads in progress anywhere under `cache_dir`, counted without the cache."""
    return sum(p.stat().st_size for p in cache_dir.rglob("*")
               if p.is_file() and p.parent.name not in (LOCKS, STAMPS) and p.name != MARKER)


# --- the limit ------------------------------------------------------------------------------------------------
def test_the_cache_limit_holds_for_the_whole_cache_dir_across_data_sets(remote, s3_env, tmp_path, monkeypatch):
    """Two data sets cached in one DIR under a limit that fits one: the second evicts the first's shards, except
    one a reader of the first holds, and DIR never holds more than the limit (counted per data set, it held
    twice the limit)."""
    peaks = []  # bytes under DIR each time a download has reserved its room (its tar's bytes allocated)
    reserve = ShardCache._reserve

    def counted(cache: ShardCache, record, rank):
        temporary = reserve(cache, record, rank)
        if temporary is not None:  # room made: the index comes next
            peaks.append(on_disk(tmp_path) + cache.index_bytes[record.index])
        return temporary

    monkeypatch.setattr(ShardCache, "_reserve", counted)
    first = cached_store(tmp_path, SETS[0])
    sizes = list(shard_sizes(first).values())  # bytes of each shard, tar and index, in manifest order
    limit = sum(sizes)
    first = fill(cached_store(tmp_path, SETS[0], limit=limit))
    assert first.cached() == (8, 8) and on_disk(tmp_path) == limit
    hold = first.hold(["train-000003.tar"])  # a reader of the first data set
    try:
        second = fill(cached_store(tmp_path, SETS[1], limit=limit))
        fits = max(k for k in range(9) if sizes[3] + sum(sizes[:k]) <= limit)  # beside the held shard, in order
        assert second.cached() == (fits, 8) and second.cache.stats.evicted == 7
        assert first.cached() == (1, 8) and first.local_path("train-000003.tar") is not None
    finally:
        hold.release()
    assert len(peaks) == 8 + fits and max(peaks) <= limit and on_disk(tmp_path) <= limit


# --- a frozen store --------------------------------------------------------------------------------------------
STUCK = """
import sys, threading, time
from pathlib import Path
from shards import cache, store as store_module
from shards.cached_store import CachedStore
from shards.process import TMP_MARK
from shards.schema import load_manifest
from shards.store import open_store
url, cache_dir, frozen, where = sys.argv[1:5]
store_module.READ_TIMEOUT = 8  # seconds: a GET to the frozen store ends after 3 tries x (5 + 8) s, not 76 s
cache.PART_BYTES = 4096  # bytes: a shard is many ranged GETs, STREAMS of them in flight
store = CachedStore(open_store(url), cache_dir, load_manifest(url, "train"), limit=None)
sent, announced = threading.Event(), threading.Lock()
def held_at(call, hangs):  # the chosen GET waits until the store is frozen, then is sent to it
    def request(name, *args, **kwargs):
        if hangs(name, *args) and not sent.is_set():
            if announced.acquire(blocking=False):
                print("sending", flush=True)
            while not Path(frozen).exists():
                time.sleep(0.01)
            sent.set()
        return call(name, *args, **kwargs)
    return request
if where == "index":  # in the downloader thread itself
    store.remote.read_bytes = held_at(store.remote.read_bytes, lambda name, *rest: name.endswith(".idx"))
else:  # in the threads of a shard's ranged GETs
    store.remote.open_range = held_at(store.remote.open_range, lambda name, offset, length: offset > 0)
store.start()
sent.wait()
time.sleep(0.5)  # the request is out and waits for an answer
started = time.monotonic()
store.close()
print(f"closed in {time.monotonic() - started:.2f} s", flush=True)
"""


@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("where", ["index", "part"])
def test_closing_the_cache_does_not_wait_for_a_download_stuck_on_a_frozen_store(remote, s3_env, tmp_path, where):
    """The store freezes (its relay stopped with SIGSTOP: connections open, nothing answers) while the downloader
    waits for an index or a part of a shard; the process stops. close() used to join the downloader until the
    GET gave up (the store's time bound: ~18 s seen after a stall), and the exit then waited for the part
    threads: now close() returns within a second and the process exits at once."""
    frozen = tmp_path / "frozen"
    child = subprocess.Popen([sys.executable, "-c", STUCK, SETS[0], str(tmp_path / "cache"), str(frozen), where],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "sending\n"
        os.kill(s3_env._process.pid, signal.SIGSTOP)
        frozen.touch()
        closed = child.stdout.readline()
        closed_at = time.monotonic()
        child.wait(timeout=120)
        exit_seconds = time.monotonic() - closed_at
    finally:
        if child.poll() is None:
            child.kill()
        s3_env.start()  # a fresh relay: what the frozen one holds is never answered (nor counted)
    assert closed.startswith("closed in ") and float(closed.split()[2]) <= 1.5, closed
    assert child.returncode == 0 and exit_seconds < 2.0, f"exit took {exit_seconds:.1f} s after close"


# --- the disk -------------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_clear_error_and_leaves_nothing_trusted(remote, s3_env, tmp_path, monkeypatch):
    real, calls = os.posix_fallocate, []

    def third_is_full(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", third_is_full)
    ldr = build_loader(SETS[0], "train", train=True, batch_size=8, image_size=48, backend="pytorch", num_threads=0,
                       seed=1, cache_dir=tmp_path)
    with pytest.raises(CacheError) as full:
        with ldr:
            for _ in range(3):
                for _ in ldr:
                    time.sleep(0.05)
    assert str(full.value).startswith(f"--cache-dir {folder(tmp_path)}: allocating ")
    assert str(full.value).endswith(" failed: no space left: free space on that disk, or set --cache-limit below "
                                    "its free space") and "\n" not in str(full.value)
    here = folder(tmp_path)
    assert not [p for p in here.iterdir() if TMP_MARK in p.name]
    manifest = load_manifest(SETS[0], "train")
    store = cached_store(tmp_path)
    for r in manifest.shards:  # what is trusted is whole
        if store.local_path(r.name) is not None:
            assert hashlib.sha256((here / r.name).read_bytes()).hexdigest() == r.sha256
    assert store.cached() == (2, 8)


READ_ONLY = """
import sys
from pipeline import build_loader
url, cache_dir = sys.argv[1:3]
try:
    with build_loader(url, "val", train=False, batch_size=8, image_size=48, backend="pytorch", num_threads=1,
                      cache_dir=cache_dir) as loader:
        next(iter(loader))
    print("read")
except Exception as err:
    print(f"{type(err).__name__}: {err}")
"""
#: sh run in a user and mount namespace of its own: "$1" bind-mounted read-only over itself, then the rest runs.
MOUNT_READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def test_a_read_only_cache_dir_is_one_clear_error_at_start(remote, s3_env, tmp_path):
    """A cache staged with `saturate shards cache`, then mounted read-only (a real read-only bind mount, in a user
    and mount namespace of the test's own: root ignores a chmod, not a read-only mount). The reader's first lock
    file failed with `[Errno 30] Read-only file system`, which a pytorch worker reported as "val-000000.tar: not
    a readable tar (30); re-convert it"; now building the loader says, in one line naming --cache-dir and the
    folder, that the cache needs a folder it can write."""
    namespace = ["unshare", "--user", "--map-root-user", "--mount"]
    if subprocess.run([*namespace, "sh", "-c", MOUNT_READ_ONLY, "sh", str(tmp_path), "true"],
                      capture_output=True).returncode != 0:
        pytest.skip("no user and mount namespaces here (unshare): a read-only mount cannot be made")
    cache_dir = tmp_path / "cache"
    assert cli(["shards", "cache", SETS[0], str(cache_dir), "--split", "val"]) == 0
    staged = contents(cache_dir)
    read = subprocess.run([*namespace, "sh", "-c", MOUNT_READ_ONLY, "sh", str(cache_dir), sys.executable, "-c",
                           READ_ONLY, SETS[0], str(cache_dir)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert read.stdout == (
        f"CacheError: --cache-dir {folder(cache_dir)}: opening the cache folder failed: Read-only file system "
        "(EROFS): the cache needs a folder it can write on a local disk, it keeps lock files next to the shards (a "
        "cache staged on a read-only mount: copy it to a local disk, or give --cache-dir a writable folder)\n"
    ), read.stderr[-3000:]
    assert contents(cache_dir) == staged


def test_a_disk_that_turns_read_only_under_a_reader_is_one_clear_error(remote, s3_env, tmp_path, monkeypatch):
    """The disk is remounted read-only after the cache opened (ext4's errors=remount-ro), simulated: os.open of a
    new lock file fails with EROFS. A reader's hold is a CacheError naming the lock file, not a raw OSError, and
    keeps none of the shards it held before it failed."""
    store = fill(cached_store(tmp_path, split="val"))
    here, real = folder(tmp_path), os.open

    def read_only(path, flags, *args, **kwargs):
        if f"/{LOCKS}/" in str(path) and not Path(path).exists():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *args, **kwargs)

    store.hold(["val-000000.tar"]).release()  # its lock file exists; val-000001's is made at its first hold
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(CacheError) as refused:
        store.hold(["val-000000.tar", "val-000001.tar"])
    assert str(refused.value).startswith(f"--cache-dir {here}: opening the lock file {LOCKS}/val-000001.tar.use "
                                         "failed: Read-only file system (EROFS): the cache needs a folder it can "
                                         "write on a local disk, ")
    fd = real(here / LOCKS / "val-000000.tar.use", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the failed hold keeps it
    finally:
        os.close(fd)
