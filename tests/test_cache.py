"""The node-local shard cache (shards.cache, shards.cached_store, pipeline.cache_use) against the local S3 server
(tests/s3_fixtures.py): the session's tiny shards (train 60 samples in 8 shards, val 25 in 4) uploaded once to
s3://shards/cache. Requests are counted on the relay in front of the server (every request, whoever sends it:
boto3 or DALI's own AWS client) and through boto3's event hooks (shards.request_log).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from s3_fixtures import use_server

from pipeline import LoaderOptionError, ShardReadError, build_loader
from pipeline import order as order_module
from pipeline.cache_use import segments_minimum, shard_sizes
from pipeline.order import SplitIndex
from shards import cache as cache_module
from shards import store as store_module
from shards.cache_dir import LOCKS, MARKER, STAMPS
from shards.cached_store import CachedStore
from shards.process import TMP_MARK
from shards.request_log import request_counts
from shards.schema import load_manifest
from shards.store import open_store
from tools.cli import main as cli
from tools.local_s3 import upload

ROOT = Path(__file__).resolve().parent.parent
URL = "s3://shards/cache"
SIZE = 48  # pixels
THREADS = {"dali-cpu": 1, "pytorch": 2}


@pytest.fixture(scope="module")
def remote(tiny_shards, s3_server, tmp_path_factory) -> str:
    with pytest.MonkeyPatch.context() as mp:
        use_server(mp, s3_server, tmp_path_factory.mktemp("aws"))
        upload(tiny_shards, URL)
    return URL


def object_gets(lines: list[str]) -> Counter:
    """GETs of objects under URL in relayed requests, by object name (listings and the manifest left out)."""
    prefix = "GET /shards/cache/"
    return Counter(line[len(prefix):].split("?")[0] for line in lines
                   if line.startswith(prefix) and not line.endswith(".manifest.json"))


def cached_store(cache_dir: Path, split: str = "train", *, limit: int | None = None) -> CachedStore:
    return CachedStore(open_store(URL), cache_dir, load_manifest(URL, split), limit=limit)


def fill(store: CachedStore) -> CachedStore:
    store.start()
    assert store.wait_idle(timeout=120)
    store.close()
    return store


def folder(cache_dir: Path) -> Path:
    return cache_dir / "shards" / "cache"


def loader(location, backend, **kwargs):
    kwargs.setdefault("num_threads", THREADS[backend])
    kwargs.setdefault("train", True)
    return build_loader(location, "train" if kwargs["train"] else "val", batch_size=8, image_size=SIZE,
                        backend=backend, with_keys=True, seed=1, **kwargs)


def epochs(ldr, count: int = 2) -> list:
    with ldr:
        return [[(x.clone(), list(k)) for x, _, k in ldr] for _ in range(count)]


def same_batches(a: list, b: list) -> bool:
    return all(ka == kb and xa.equal(xb) for ea, eb in zip(a, b, strict=True)
               for (xa, ka), (xb, kb) in zip(ea, eb, strict=True))


# --- download, verify, publish ---------------------------------------------------------------------------
def test_a_cold_cache_fetches_each_shard_whole_once_and_verifies_it(remote, tiny_shards, s3_env, tmp_path):
    manifest = load_manifest(remote, "train")
    seen = len(s3_env.requests())
    store = fill(cached_store(tmp_path))
    gets = object_gets(s3_env.requests()[seen:])
    assert gets == {name: 1 for r in manifest.shards for name in (r.name, r.index)}  # one GET each (< PART_BYTES)
    assert store.cached() == (8, 8) and store.cache.stats.downloaded == 8
    here = folder(tmp_path)
    for r in manifest.shards:
        assert (here / r.name).read_bytes() == (tiny_shards / r.name).read_bytes()
        assert (here / r.index).read_bytes() == (tiny_shards / r.index).read_bytes()
        assert store.url(r.name) == here / r.name
        assert json.loads((here / STAMPS / f"{r.name}.json").read_text())["sha256"] == r.sha256
    assert sorted(p.name for p in here.iterdir() if p.is_file()) == sorted(
        [MARKER, *(name for r in manifest.shards for name in (r.name, r.index))])  # nothing else: no temporaries
    assert {p.name for p in (here / LOCKS).iterdir()} == {f"{r.name}.get" for r in manifest.shards}
    assert [p.name for p in (tmp_path / LOCKS).iterdir()] == ["space"]  # one for DIR: the limit is DIR's


SHARING = """
import hashlib, json, sys, time
from pathlib import Path
from shards.cached_store import CachedStore
from shards.schema import load_manifest
from shards.store import open_store
url, cache_dir, go = sys.argv[1:4]
manifest = load_manifest(url, "train")
store = CachedStore(open_store(url), cache_dir, manifest, limit=None)
while not Path(go).exists():
    time.sleep(0.005)
store.start()
checked, deadline = set(), time.monotonic() + 120
while len(checked) < len(manifest.shards) and time.monotonic() < deadline:
    for r in manifest.shards:  # every shard, as soon as this process may read it locally, must be whole
        path = store.local_path(r.name)
        if path is not None and r.name not in checked:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == r.sha256, r.name
            checked.add(r.name)
    time.sleep(0.002)
store.wait_idle(60)
store.close()
print(json.dumps({"checked": len(checked), "downloaded": store.cache.stats.downloaded}))
"""


def test_processes_sharing_one_cache_folder_download_each_shard_once(remote, s3_env, tmp_path):
    """Three processes of one node start together on one cache folder: the per-shard lock lets one of them
    download each shard (the others read it from the store meanwhile), and none ever reads a shard before it is
    whole and verified."""
    manifest = load_manifest(remote, "train")
    go = tmp_path / "go"
    seen = len(s3_env.requests())
    processes = [subprocess.Popen([sys.executable, "-c", SHARING, remote, str(tmp_path / "cache"), str(go)],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(1.0)  # all three have opened the cache folder
    go.touch()
    results = [json.loads(p.communicate(timeout=180)[0]) for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert [r["checked"] for r in results] == [8, 8, 8]
    assert sum(r["downloaded"] for r in results) == 8
    gets = object_gets(s3_env.requests()[seen:])
    assert {name: gets[name] for r in manifest.shards for name in (r.name,)} == {r.name: 1 for r in manifest.shards}


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
def test_an_epoch_from_a_warm_cache_makes_no_requests(remote, tiny_shards, s3_env, tmp_path, backend, capsys):
    """After `saturate shards cache`, a loader reads two epochs without a single request to the store (opening it
    reads the manifest and lists the prefix), and yields exactly what the loader of the local folder yields."""
    assert cli(["shards", "cache", remote, str(tmp_path), "--split", "train"]) == 0
    assert capsys.readouterr().out.startswith(f"train: 8/8 shards cached in {folder(tmp_path)} (")
    seen = len(s3_env.requests())
    ldr = loader(remote, backend, cache_dir=tmp_path)
    opened = s3_env.requests()[seen:]
    assert not object_gets(opened) and len(opened) == 3  # a listing (check), the manifest, the listing of shards
    cached = epochs(ldr)
    assert s3_env.requests()[seen + len(opened):] == []
    assert same_batches(cached, epochs(loader(tiny_shards, backend)))


def test_a_cold_cache_reads_from_the_store_until_shards_arrive(remote, tiny_shards, s3_env, tmp_path):
    """The first epoch starts at once: what is not cached yet is read from the store; the batches are the same."""
    cold = epochs(loader(remote, "dali-cpu", cache_dir=tmp_path))
    assert same_batches(cold, epochs(loader(tiny_shards, "dali-cpu")))
    assert cached_store(tmp_path).cached() == (8, 8)


def test_dali_val_reads_what_was_cached_since_from_its_next_pass(remote, tiny_shards, s3_env, tmp_path):
    """DALI's val pipeline takes its paths when it is built: a pass that starts after the cache filled builds it
    again on the local copies (val reads the same samples in the same order every pass); from then on no request
    is sent."""
    local = epochs(loader(tiny_shards, "dali-cpu", train=False), 1)[0]
    with loader(remote, "dali-cpu", train=False, cache_dir=tmp_path) as ldr:
        batches = iter(ldr)
        first = [(x.clone(), list(k)) for x, _, k in (next(batches) for _ in range(len(ldr)))]
        assert ldr.store.wait_idle(timeout=60) and ldr.store.cached() == (4, 4)  # cached while the pass ran
        second = [(x.clone(), list(k)) for x, _, k in ldr]  # a new pipeline; the old one's read-ahead into
        seen = len(s3_env.requests())  # this pass (DALI prefetches across the epoch's end) still went to the store
        third = [(x.clone(), list(k)) for x, _, k in ldr]
        assert len(s3_env.requests()) == seen
    assert same_batches([first, second, third], [local, local, local])


# --- damage and kills ------------------------------------------------------------------------------------
def test_a_corrupted_cached_shard_is_detected_and_fetched_again(remote, tiny_shards, s3_env, tmp_path, monkeypatch):
    fill(cached_store(tmp_path))
    victim = folder(tmp_path) / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))  # same size, written again: its stamp no longer matches
    store = cached_store(tmp_path)
    assert store.local_path(victim.name) is None and store.url(victim.name) == f"{URL}/{victim.name}"
    seen = len(s3_env.requests())
    fill(store)
    assert (store.cache.stats.refetched, store.cache.stats.downloaded) == (1, 1)
    assert object_gets(s3_env.requests()[seen:]) == {victim.name: 1, "train-000002.idx": 1}
    assert victim.read_bytes() == (tiny_shards / victim.name).read_bytes()

    # a flip that keeps size, inode and mtime is invisible to the stamp (said in shards/cache.py) ...
    stat = victim.stat()
    with open(victim, "r+b") as f:
        f.seek(1000)
        f.write(bytes([data[1000]]))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cached_store(tmp_path).local_path(victim.name) == victim
    # ... until the machine boots again: then every shard is hashed before it is trusted
    monkeypatch.setattr(cache_module, "boot_id", lambda: "the next boot")
    store = cached_store(tmp_path)
    assert store.cached() == (0, 8)
    fill(store)
    assert (store.cache.stats.rechecked, store.cache.stats.refetched, store.cache.stats.downloaded) == (7, 1, 1)
    assert victim.read_bytes() == (tiny_shards / victim.name).read_bytes()


KILLED = """
import sys, time
from shards import cache
from shards.cached_store import CachedStore
from shards.schema import load_manifest
from shards.store import open_store
url, cache_dir, when = sys.argv[1:4]
store = CachedStore(open_store(url), cache_dir, load_manifest(url, "train"), limit=None)
if when == "mid-download":  # the second part of the first shard never comes: the process is killed waiting
    cache.PART_BYTES, cache.STREAMS = 4096, 1
    real = store.remote.open_range
    def open_range(name, offset, length):
        if offset:
            print("downloading", flush=True)
            time.sleep(600)
        return real(name, offset, length)
    store.remote.open_range = open_range
else:  # killed after the tar and index are renamed into place, before the stamp is written
    def stamp(record):
        print("published", flush=True)
        time.sleep(600)
    store.cache._write_stamp = stamp
store.want(["train-000003.tar"])
store.start()
time.sleep(600)
"""


@pytest.mark.parametrize("when", ["mid-download", "before-the-stamp"])
def test_kill_9_leaves_nothing_a_later_run_trusts(remote, tiny_shards, s3_env, tmp_path, when):
    child = subprocess.Popen([sys.executable, "-c", KILLED, remote, str(tmp_path), when], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() in ("downloading", "published")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    here, name = folder(tmp_path), "train-000003.tar"
    left = sorted(p.name for p in here.iterdir() if p.is_file())
    if when == "mid-download":
        assert [n for n in left if TMP_MARK in n] and name not in left  # a temporary, nothing under its name
    else:
        assert name in left and not (here / STAMPS / f"{name}.json").exists()  # published, never stamped
    assert (here / LOCKS / f"{name}.get").read_text().split()[1] == str(child.pid)  # who held it, for people
    store = cached_store(tmp_path)
    assert store.local_path(name) is None and store.cached() == (0, 8)  # nothing trusted
    assert not [p for p in here.iterdir() if TMP_MARK in p.name]  # the dead process's temporary is gone
    seen = len(s3_env.requests())
    fill(store)  # its lock was dropped by the kernel: the shard is fetched (or checked) at once
    assert store.cached() == (8, 8) and (here / name).read_bytes() == (tiny_shards / name).read_bytes()
    stats, gets = store.cache.stats, object_gets(s3_env.requests()[seen:])
    if when == "mid-download":
        assert (stats.downloaded, stats.rechecked, gets[name]) == (8, 0, 1)
    else:  # hashed and found sound: only its index is read again
        assert (stats.downloaded, stats.rechecked, gets[name], gets["train-000003.idx"]) == (7, 1, 0, 1)


# --- limits -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, order", [("dali-cpu", "sample"), ("pytorch", "shard")])
def test_a_cache_limit_below_the_split_evicts_and_loses_nothing(remote, tiny_shards, s3_env, tmp_path, monkeypatch,
                                                               backend, order):
    """Segments of at most 2 reader entries (so each reads 1-2 shards) or one open tar per worker: the smallest
    limit is a few shards; with it the cache evicts, stays under the limit, and every epoch yields exactly the
    batches of the uncached loader."""
    monkeypatch.setattr(order_module, "MAX_ENTRIES", 2)
    manifest = load_manifest(remote, "train")
    store = cached_store(tmp_path / "probe")
    sizes = shard_sizes(store)
    if backend == "dali-cpu":
        need, _ = segments_minimum(SplitIndex(store, manifest), sizes, seed=1, epoch=0, rank=0, world_size=1,
                                   batch_size=8, chunk=order_module.ORDER_CHUNK)
    else:
        need = max(sizes.values()) * 2  # one open tar (1 worker) and room for the next
    assert need < sum(sizes.values())
    ldr = loader(remote, backend, cache_dir=tmp_path, cache_limit=need, order=order, num_threads=1)
    used, batches = [], []
    with ldr:
        for _ in range(3):
            batches.append([])
            for x, _, keys in ldr:
                batches[-1].append((x.clone(), list(keys)))
                used.append(ldr.store.cache.usage()[0])
        evicted = ldr.store.cache.stats.evicted
    assert max(used) <= need and evicted > 0
    assert same_batches(batches, epochs(loader(tiny_shards, backend, order=order, num_threads=1), 3))


@pytest.mark.parametrize("backend, train, why", [
    ("dali-cpu", True, "the shards read by the segment being read and the one built ahead, on 1 process(es) of "
                       "this node"),
    ("pytorch", True, "1 process(es) x 2 worker(s) x 32 open tar(s)"),
    ("pytorch", False, "1 process(es) x 2 worker(s) x 1 open tar(s)"),
    ("dali-cpu", False, "one shard"),
])
def test_a_cache_limit_below_the_smallest_that_works_is_refused_at_start(remote, s3_env, tmp_path, backend, train,
                                                                         why):
    split = "train" if train else "val"
    sizes = shard_sizes(cached_store(tmp_path / "probe", split))
    need = {"one shard": max(sizes.values()), "1 process(es) x 2 worker(s) x 1 open tar(s)":
            sum(sorted(sizes.values())[-2:])}.get(why, sum(sizes.values()))  # else: the whole split
    with pytest.raises(LoaderOptionError) as refused:
        loader(remote, backend, train=train, cache_dir=tmp_path, cache_limit=need - 1)
    assert str(refused.value).startswith(f"cache_limit={need - 1}: below the smallest limit that works here, ")
    assert str(refused.value).endswith(f" ({need:,} bytes: {why})")
    assert not [p for p in folder(tmp_path).iterdir() if p.is_file() and p.name != MARKER]  # nothing downloaded
    with loader(remote, backend, train=train, cache_dir=tmp_path, cache_limit=need) as ldr:
        assert ldr.store.cache.limit == need


def test_cache_keywords_are_refused_where_they_cannot_work(tiny_shards, tmp_path):
    with pytest.raises(LoaderOptionError, match="^cache_dir=.*: backend 'synthetic' reads no data"):
        build_loader(None, "train", train=True, batch_size=8, backend="synthetic", cache_dir=tmp_path)
    with pytest.raises(LoaderOptionError, match=f"^cache_dir=.*: {tiny_shards} is a folder and is read in place"):
        loader(tiny_shards, "pytorch", cache_dir=tmp_path)
    with pytest.raises(LoaderOptionError, match="^cache_limit='lots': expected bytes such as 200GB"):
        loader(URL, "pytorch", cache_dir=tmp_path, cache_limit="lots")
    with pytest.raises(LoaderOptionError, match="^cache_limit=1000: needs cache_dir"):
        loader(URL, "pytorch", cache_limit=1000)


# --- request rate and back-off ------------------------------------------------------------------------------
def test_slow_down_answers_are_retried_with_backoff_and_counted(remote, tiny_shards, s3_env, tmp_path, monkeypatch):
    """Every third request answered `503 Slow Down` (S3's throttling): botocore's standard retry mode waits and
    retries each, the hooks count every attempt, and the shards arrive whole."""
    monkeypatch.setattr(store_module, "REQUEST_ATTEMPTS", 5)
    s3_env.start(slow_down_every=3)
    seen, before = len(s3_env.requests()), request_counts()
    store = fill(cached_store(tmp_path, "val"))
    counts, relayed = request_counts() - before, s3_env.requests()[seen:]
    assert counts.requests == len(relayed) and counts.throttled == len(relayed) // 3 > 0
    assert counts.retries == counts.throttled  # each answer retried once, none given up on
    assert counts.line().endswith(f"{counts.retries} retries, {counts.throttled} throttled answers")
    assert store.cached() == (4, 4)
    for r in load_manifest(remote, "val").shards:
        assert (folder(tmp_path) / r.name).read_bytes() == (tiny_shards / r.name).read_bytes()


def test_throttling_fails_dali_reads_from_the_store_but_not_reads_through_the_cache(remote, tiny_shards, s3_env,
                                                                                   tmp_path, monkeypatch):
    """Every fourth request answered `503 Slow Down`. boto3 (the `pytorch` backend, the cache's downloads) waits and
    retries; DALI 2.4's S3 reader does not: its read fails (a ShardReadError quoting DALI, not a short or wrong
    epoch). Staged through the cache first, DALI reads the same epoch without a single request."""
    monkeypatch.setattr(store_module, "REQUEST_ATTEMPTS", 5)
    s3_env.start(slow_down_every=4)
    local = {backend: epochs(loader(tiny_shards, backend, train=False), 1) for backend in THREADS}
    assert same_batches(epochs(loader(remote, "pytorch", train=False), 1), local["pytorch"])
    with pytest.raises(ShardReadError, match="DALI said: Error in CPU operator `nvidia.dali.fn.readers.webdataset`"):
        epochs(loader(remote, "dali-cpu", train=False), 1)
    assert cli(["shards", "cache", remote, str(tmp_path), "--split", "val"]) == 0
    ldr = loader(remote, "dali-cpu", train=False, cache_dir=tmp_path)
    seen = len(s3_env.requests())
    assert same_batches(epochs(ldr, 1), local["dali-cpu"]) and len(s3_env.requests()) == seen


# --- the trainer ----------------------------------------------------------------------------------------------
def test_train_flags_for_the_cache(tiny_shards, tmp_path):
    from training.config import ConfigError, build_config

    config = build_config(overrides={"data": URL, "backend": "pytorch", "cache_dir": str(tmp_path),
                                     "cache_limit": "2GB"}, check_paths=False)
    assert (config.cache_dir, config.cache_limit) == (str(tmp_path), "2GB")
    with pytest.raises(ConfigError, match=f"^--cache-dir: {tiny_shards} is a folder and is read in place"):
        build_config(overrides={"data": str(tiny_shards), "backend": "pytorch", "cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="^--cache-dir: backend 'synthetic' reads no data"):
        build_config(overrides={"backend": "synthetic", "cache_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="^--cache-limit: expected bytes such as 200GB"):
        build_config(overrides={"data": URL, "backend": "pytorch", "cache_dir": str(tmp_path), "cache_limit": "x"})


def test_train_reads_through_the_cache_and_logs_the_requests(remote, s3_env, tmp_path, capsys):
    from training.config import build_config
    from training.train import train

    config = build_config(overrides=dict(
        data=remote, backend="pytorch", arch="resnet18", image_size=32, precision="fp32", batch_size=4, epochs=1,
        max_steps=2, num_threads=1, log_every=1, throughput_warmup_steps=0, run_dir=str(tmp_path / "run"),
        progress=False, checkpoint_minutes=0, cache_dir=str(tmp_path / "cache"),
    ))
    assert train(config)["steps"] == 2
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 0: store (boto3"))
    assert " requests (" in line and f"; cache {folder(tmp_path / 'cache')}: " in line


# --- the profiler ---------------------------------------------------------------------------------------------
def test_profile_reports_requests_per_image_for_every_backend(remote, s3_env, tmp_path):
    """`saturate profile` counts the store's requests on a relay of its own in front of the http:// endpoint
    (DALI's AWS client included), in a process of its own (DALI keeps the first endpoint it saw): from the store
    each backend sends requests per image; through a staged cache, none."""
    assert cli(["shards", "cache", remote, str(tmp_path / "cache"), "--split", "train"]) == 0
    figures = {}
    for name, extra in (("store", []), ("cache", ["--cache-dir", str(tmp_path / "cache")])):
        out = tmp_path / f"report-{name}"  # not the cache dir: files there make it no cache folder
        subprocess.run([sys.executable, "-m", "tools.cli", "profile", remote, "--out", str(out), "--modes", "loader",
                        "--backends", "dali-cpu,pytorch", "--threads", "1", "--batch-size", "8", "--image-size", "48",
                        "--steps", "6", "--windows", "2", "--warmup", "2", "--max-warmup", "0", "--no-progress",
                        *extra], cwd=ROOT, check=True, capture_output=True, timeout=600)
        rows = json.loads((out / "report.json").read_text())["rows"]
        assert all(row["error"] is None for row in rows), [row["error"] for row in rows]
        figures[name] = {row["backend"]: row["requests_per_image"] for row in rows}
    report = (tmp_path / "report-store" / "report.md").read_text()
    assert "| req/img |" in report and "counted on a relay in front of the store's http:// endpoint" in report
    assert figures["store"]["dali-cpu"] > 1.0 and 0.5 < figures["store"]["pytorch"] < 2.0  # a GET per sample
    assert figures["cache"] == {"dali-cpu": 0.0, "pytorch": 0.0}
