"""Shards on object storage, against a real S3-protocol server on 127.0.0.1 (moto's standalone server, started
here on a free port, stopped at the end; nothing reaches the network).

The server sits behind `Relay` (tests/s3_fixtures.py, shared with tests/test_cache.py), a relay the tests can
cut: `stop()` drops every connection and refuses new ones (a store gone mid-epoch), `start()` serves again,
`start(budget=N)` ends each connection after N bytes (a store that drops connections mid-object). DALI's AWS
client keeps the first endpoint it saw for the whole process, so every test of the session uses this one
endpoint (the server and relay are made once per session).

The quirk tree (CMYK, grayscale, PNG, progressive, EXIF-rotated files among plain JPEGs) is converted once to
a local folder and once to s3://shards/quirks; everything read back from the store must equal the local copy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import ShardReadError, build_loader
from shards import store as store_module
from shards import write as write_module
from shards.convert import convert
from shards.schema import IMAGE_EXT, LABEL_EXT, decode_label, load_manifest, parse_index, shard_files
from shards.store import S3Store, StoreError, open_store
from shards.verify import verify
from tools import synth
from tools.cli import main as cli
from tools.local_s3 import free_port
from training import checkpoint as checkpoint_module

BUCKET = "shards"
URL = f"s3://{BUCKET}/quirks"
SIZE = 32  # pixels
SPLITS = ("train", "val")
#: Seconds from SIGTERM to exit for a run whose store froze: the checkpoint write and the process teardown.
STOP_BOUND = 15.0


@pytest.fixture(scope="module")
def quirk_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quirks") / "imagenet"
    synth.generate(out, classes=3, train_per_class=6, val_per_class=3, quirks=True, seed=1, scale=0.25, workers=1,
                   progress=False)
    return out


def convert_split(src: Path, out: str | Path, split: str, **kwargs) -> object:
    kwargs.setdefault("workers", 1)
    return convert(src / split, out, split=split, samples_per_shard=4, seed=0, progress=False, **kwargs)


@pytest.fixture(scope="module")
def converted(quirk_tree, s3_server, tmp_path_factory) -> Path:
    """The quirk tree converted to a local folder (returned) and to URL (2 workers: the pool and the sink)."""
    local = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as mp:
        relay, key_id, secret = s3_server
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{relay.port}")
        mp.setenv("AWS_ACCESS_KEY_ID", key_id)
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
        mp.setenv("AWS_REGION", "us-east-1")
        for split in SPLITS:
            convert_split(quirk_tree, local, split)
            convert_split(quirk_tree, URL, split, workers=2)
    return local


def objects(url: str) -> dict[str, bytes]:
    """Every object under a prefix (records under .parts/ included) -> bytes."""
    store = open_store(url)
    names = list(store.sizes()) + [f".parts/{n}" for n in store.sizes(".parts")]
    return {name: store.read_bytes(name) for name in sorted(names)}


# --- convert, verify, describe ---------------------------------------------------------------------------
def test_conversion_to_the_store_equals_the_local_one(converted, s3_env):
    in_store = objects(URL)
    local = {p.name: p.read_bytes() for p in converted.iterdir() if p.is_file()}
    assert {n: b for n, b in in_store.items() if not n.startswith(".parts/")} == local
    manifest = load_manifest(URL, "train")
    assert manifest.converted >= 4  # the quirks (CMYK, grayscale, PNG, progressive, EXIF) were re-encoded
    store = open_store(URL)
    assert [store.sha256(r.name) for r in manifest.shards] == [r.sha256 for r in manifest.shards]
    assert isinstance(store, S3Store) and store.url("train-000000.tar") == f"{URL}/train-000000.tar"


def test_verify_decode_on_the_store(converted, s3_env, capsys):
    problems, stats = verify(URL, decode=True, workers=1)
    assert problems == []
    assert stats["samples"] == stats["decoded"] == sum(load_manifest(converted, s).num_samples for s in SPLITS)
    assert cli(["shards", "verify", URL, "--decode", "--workers", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("OK: ")


def test_profiler_describes_the_corpus_in_the_store(converted, s3_env):
    from tools.profiler.report import describe_corpus

    remote, local = describe_corpus(URL, "train"), describe_corpus(converted, "train")
    assert remote.pop("shards_dir") == URL and local.pop("shards_dir") == str(converted.resolve())
    assert remote == local


def test_train_config_takes_a_store_url():
    from training.config import ConfigError, build_config

    assert build_config(overrides={"data": URL, "backend": "pytorch"}).data == URL
    with pytest.raises(ConfigError, match="--data: gs://b/p: gs:// is not supported"):
        build_config(overrides={"data": "gs://b/p", "backend": "dali-cpu"})


@pytest.mark.parametrize("url, bucket, prefix", [
    ("s3://b/p/", "b", "p"), ("s3://b", "b", ""), ("s3://b/", "b", ""), ("s3://b/a b+c%20/é", "b", "a b+c%20/é"),
])
def test_store_urls_parse_to_bucket_and_prefix(url, bucket, prefix):
    store = open_store(url)
    assert (store.bucket, store.prefix, store.url("x.tar")) == (bucket, prefix, f"s3://{bucket}/{prefix}/x.tar"
                                                                  if prefix else f"s3://{bucket}/x.tar")


@pytest.mark.parametrize("url, part", [("s3://b/h#1", "#"), ("s3://b/q?x", "?"), ("s3://b/a//b", "//")])
def test_a_prefix_dali_cannot_read_back_is_refused_before_anything_is_written(url, part, tmp_path, capsys):
    """boto3 wrote these keys as given and pytorch read them, but DALI cut the key at '#'/'?' and folded '//':
    'S3 Object not found' after a whole conversion (reproduced on dali-cpu)."""
    with pytest.raises(ValueError, match="^" + re.escape(f"{url}: {part!r} in the key prefix cannot be read back")):
        open_store(url)
    assert cli(["shards", "convert", str(tmp_path / "no-src"), url, "--split", "val"]) == 2
    assert capsys.readouterr().err == (f"saturate shards: error: {url}: {part!r} in the key prefix cannot be read "
                                       "back by DALI's S3 reader; use letters, digits and - _ . / in PREFIX\n")


def test_an_endpoint_that_never_answers_fails_at_the_control_timeout(monkeypatch, tmp_path):
    """A port that takes connections and never answers held every command for 4 x READ_TIMEOUT (4 minutes,
    measured) before its one line; listings and HEADs now wait CONTROL_READ_TIMEOUT, shard reads still the long
    one. Shortened here, the rule is the same."""
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(silent.accept()[0]) for _ in range(16)], daemon=True).start()
    for name, value in (("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}"),
                        ("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_REGION", "us-east-1"),
                        ("AWS_CONFIG_FILE", str(tmp_path / "none")), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(store_module, "CONTROL_READ_TIMEOUT", 0.2)
    monkeypatch.setattr(store_module, "REQUEST_ATTEMPTS", 1)
    store = open_store("s3://bucket/prefix")
    assert store.client.meta.config.read_timeout == store_module.READ_TIMEOUT
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"^s3://bucket/prefix: Read timeout on endpoint URL"):
        store.check()
    assert time.monotonic() - started < 5
    silent.close()
    for connection in held:
        connection.close()


def test_credentials_in_the_endpoint_url_are_not_printed(monkeypatch, tmp_path, capsys):
    """botocore quotes the endpoint it could not reach, user:password included."""
    port = free_port()  # nothing listens there
    for name, value in (("AWS_ENDPOINT_URL", f"http://user:the-secret@127.0.0.1:{port}"), ("AWS_ACCESS_KEY_ID", "k"),
                        ("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_REGION", "us-east-1"),
                        ("AWS_CONFIG_FILE", str(tmp_path / "none")), ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(store_module, "REQUEST_ATTEMPTS", 0)
    assert cli(["shards", "verify", "s3://bucket/prefix"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saturate shards: error: s3://bucket/prefix: Could not connect to the endpoint URL: "
                          f'"http://***@127.0.0.1:{port}/bucket?') and "the-secret" not in err


def test_a_killed_converters_spool_is_removed_by_the_next_run(tmp_path):
    """A `kill -9` of a convert to s3:// left its spool (up to workers + uploads shards) in the temporary
    folder for good; the next run removes spools whose converter is gone, and only those."""
    from shards.process import host_tag
    from shards.publish import ShardSink

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    spools = {name: tmp_path / f"saturate-spool.tmp-{name}" for name in
              (f"{host_tag()}-{dead.pid}-abc", f"{host_tag()}-{os.getpid()}-def", f"otherhost-{dead.pid}-ghi")}
    for spool in spools.values():
        spool.mkdir()
        (spool / "train-000000.tar").write_bytes(b"x" * 100)
    with ShardSink(S3Store("bucket", "prefix"), spool_dir=tmp_path) as sink:
        mine = sink.spool
        assert mine.parent == tmp_path and mine.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir() if p != mine) == sorted(
            spools[name].name for name in (f"{host_tag()}-{os.getpid()}-def", f"otherhost-{dead.pid}-ghi"))
    assert not mine.exists()


# --- the loaders ------------------------------------------------------------------------------------------
def raw_samples_dali(pairs) -> dict[str, tuple[bytes, int]]:
    """key -> (JPEG bytes, label) as DALI's webdataset reader returns them for these (tar, idx) paths/URLs."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs], ext=[IMAGE_EXT, LABEL_EXT],
            dtypes=[types.UINT8] * 2, name="Reader", pad_last_batch=True,
        )
        return jpg, cls, fn.get_property(jpg, key="source_info")

    pipe = read()
    pipe.build()
    size, found = pipe.reader_meta("Reader")["epoch_size"], {}
    while sum(1 for _ in found) < size:
        jpg, cls, info = pipe.run()
        for i in range(len(jpg)):
            key = bytes(np.array(info.at(i))).decode().rsplit(":", 1)[-1].split(".")[0]
            found[key] = (bytes(np.array(jpg.at(i))), decode_label(bytes(np.array(cls.at(i)))))
    return found


def raw_samples_webdataset(location, split) -> dict[str, tuple[bytes, int]]:
    """key -> (JPEG bytes, label) through the pytorch backend's stages (store stream -> webdataset)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from pipeline.pytorch_loader import open_shards, unreadable_tar

    store = open_store(location)
    names = [r.name for r in load_manifest(store, split).shards]
    files = tar_file_expander(open_shards(names, store), handler=unreadable_tar)
    return {s["__key__"]: (s[IMAGE_EXT], decode_label(s[LABEL_EXT])) for s in group_by_keys(files)}


def test_every_sample_read_from_the_store_equals_the_local_one(converted, s3_env):
    for split in SPLITS:
        local = raw_samples_webdataset(converted, split)
        assert len(local) == load_manifest(converted, split).num_samples
        assert raw_samples_webdataset(URL, split) == local
        pairs = shard_files(URL, load_manifest(URL, split))
        assert all(str(t).startswith(f"{URL}/") for t, _ in pairs)  # DALI is handed the URLs as they are
        assert raw_samples_dali(pairs) == raw_samples_dali(shard_files(converted, load_manifest(converted, split)))


def batches(location, split, backend, **kwargs):
    kwargs.setdefault("num_threads", 1)
    if split == "train" and kwargs.get("order") == "shard":  # DALI fills its buffer by re-reading a split
        kwargs.setdefault("shuffle_buffer", 8)  # smaller than it: one GET per sample
    ldr = build_loader(location, split, train=split == "train", batch_size=4, image_size=SIZE, backend=backend,
                       with_keys=True, **kwargs)
    with ldr:
        return [(images.clone(), labels.clone(), list(keys)) for images, labels, keys in ldr]


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
@pytest.mark.parametrize(("split", "order"), [("train", "sample"), ("train", "shard"), ("val", None)])
def test_loaders_yield_the_same_batches_from_the_store(converted, s3_env, backend, split, order):
    remote = batches(URL, split, backend, seed=3, order=order)
    local = batches(converted, split, backend, seed=3, order=order)
    assert [k for _, _, k in remote] == [k for _, _, k in local] and remote
    for (x, y, _), (x_local, y_local, _) in zip(remote, local, strict=True):
        assert x.equal(x_local) and y.equal(y_local)


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
def test_sample_order_resumes_on_another_process_count_from_the_store(converted, s3_env, backend):
    """The order's guarantees hold on s3:// too: global batches of 6 on 1, 2 and 3 processes are the same, and a
    state saved on 2 processes continues on 3 with exactly the samples not yet seen."""
    def run(world, state=None, steps=None):
        loaders = [build_loader(URL, "train", train=True, batch_size=6 // world, image_size=SIZE, backend=backend,
                                rank=r, world_size=world, num_threads=1, seed=5, with_keys=True, state=state)
                   for r in range(world)]
        passes, out = [iter(ldr) for ldr in loaders], []
        for batch in zip(*passes, strict=True):
            out.append(sorted(k for b in batch for k in b[2]))
            if steps is not None and len(out) == steps:
                break
        states = [ldr.state_dict() for ldr in loaders]
        for ldr in loaders:
            ldr.close()
        return out, states

    whole, _ = run(1)
    assert len(whole) == 3 and sorted(k for ks in whole for k in ks) == sorted(keys_in(converted, "train"))
    assert run(3)[0] == whole
    first, states = run(2, steps=1)
    rest, _ = run(3, state=states[0])
    assert first + rest == whole


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_coverage_is_exact_from_the_store(converted, s3_env, backend, world_size):
    seen = [k for rank in range(world_size)
            for _, _, keys in batches(URL, "val", backend, rank=rank, world_size=world_size) for k in keys]
    assert sorted(seen) == sorted(keys_in(converted, "val"))


def keys_in(location, split) -> list[str]:
    """Every sample key of a split, from its DALI indexes."""
    store = open_store(location)
    return [sample[0].name.split(".")[0] for r in load_manifest(store, split).shards
            for sample in parse_index(store.read_text(r.index))]


# --- reruns, jobs and merge -------------------------------------------------------------------------------
def test_killed_conversion_reruns_to_the_same_objects(quirk_tree, converted, s3_env, monkeypatch):
    url = f"s3://{BUCKET}/killed"
    real_write_shard, written = write_module.write_shard, []

    def dies_at_third(shard, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a scheduler's kill does to the converter mid-run
        written.append(shard.index)
        return real_write_shard(shard, **kwargs)

    monkeypatch.setattr(write_module, "write_shard", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        convert_split(quirk_tree, url, "train")
    assert not open_store(url).exists("train.manifest.json")
    monkeypatch.setattr(write_module, "write_shard",
                        lambda shard, **kw: written.append(shard.index) or real_write_shard(shard, **kw))
    convert_split(quirk_tree, url, "train")
    planned = len(load_manifest(url, "train").shards)
    assert sorted(written) == list(range(planned))  # the rerun wrote only the shards the killed run had not
    train_objects = {n: b for n, b in objects(URL).items() if n.startswith(("train", ".parts/train"))}
    assert objects(url) == train_objects


def test_jobs_and_merge_against_the_store(quirk_tree, converted, s3_env, capsys):
    url = f"s3://{BUCKET}/jobs"
    assert convert_split(quirk_tree, url, "train", num_jobs=2, job_index=1) is None  # job 0 is still missing
    assert cli(["shards", "merge", url, "--split", "train"]) == 2
    assert "not written yet" in capsys.readouterr().err
    manifest = convert_split(quirk_tree, url, "train", num_jobs=2, job_index=0)
    assert manifest == load_manifest(converted, "train")
    open_store(url).delete("train.manifest.json")
    assert cli(["shards", "merge", url, "--split", "train"]) == 0
    assert open_store(url).read_bytes("train.manifest.json") == (converted / "train.manifest.json").read_bytes()


def test_a_converter_claims_the_split_in_the_store(quirk_tree, converted, s3_env, capsys):
    """Two converters of one split into the same prefix raced; on s3:// the claim is an object under .parts/,
    refreshed while its converter runs (another host's process cannot be asked whether it still runs)."""
    from shards.claim import CLAIM_STALE_AFTER, SplitBusy

    url = f"s3://{BUCKET}/claimed"
    store = open_store(url)
    foreign = ".parts/.val.claim.tmp-node07-12-abcd"
    store.put_bytes(foreign, json.dumps({"host": "node07", "pid": 12, "plan_digest": "x", "num_jobs": 1,
                                         "job_index": 0, "refreshed": time.time(), "started": 0.0}))
    with pytest.raises(SplitBusy, match=re.escape(f"another converter (host node07, pid 12) is writing {url}/val "
                                                  "(job 0 of 1 of another conversion")):
        convert_split(quirk_tree, url, "val")
    assert sorted(store.sizes(".parts")) == [foreign.split("/")[1]]  # nothing written, its own claim removed
    store.put_bytes(foreign, json.dumps({"host": "node07", "pid": 12, "refreshed": time.time() - CLAIM_STALE_AFTER
                                         - 1}))
    assert convert_split(quirk_tree, url, "val") == load_manifest(converted, "val")
    assert not [name for name in store.sizes(".parts") if ".claim" in name]


# --- faults -----------------------------------------------------------------------------------------------
def copy_prefix(source: str, target: str) -> None:
    store = open_store(target)
    for name, data in objects(source).items():
        store.put_bytes(name, data)


@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
def test_a_missing_object_is_named(converted, s3_env, backend):
    url = f"s3://{BUCKET}/missing-{backend}"
    copy_prefix(URL, url)
    open_store(url).delete("val-000001.tar")
    with pytest.raises(FileNotFoundError, match=f"{url}/val-000001.tar listed in the val manifest is missing"):
        build_loader(url, "val", train=False, batch_size=4, image_size=SIZE, backend=backend, num_threads=1)
    problems, _ = verify(url, splits=["val"], workers=1)
    assert f"{url}/val-000001.tar: missing" in problems


def test_verify_fails_shards_without_a_manifest_in_the_store(converted, s3_env, capsys):
    """A split whose manifest is gone (a killed re-conversion removes it first) was approved: `OK`, rc 0."""
    url = f"s3://{BUCKET}/no-manifest"
    copy_prefix(URL, url)
    open_store(url).delete("train.manifest.json")
    problems, _ = verify(url, workers=1)
    assert [p.split(":", 2)[:2] for p in problems] == [["s3", f"//{BUCKET}/no-manifest/train.manifest.json"]]
    assert f"train shard files are there (train-000000.idx, train-000000.tar, ...): no loader opens the split; " \
           f"rerun `saturate shards convert SRC {url} --split train`" in problems[0]
    assert cli(["shards", "verify", url, "--workers", "1", "--no-progress"]) == 1
    assert capsys.readouterr().out.startswith(f"FAIL {url}/train.manifest.json: missing, but ")


def test_wrong_credentials_and_missing_bucket_are_one_line_errors(converted, s3_env, monkeypatch, capsys):
    with pytest.raises(StoreError, match=r"^s3://no-such-bucket/x: NoSuchBucket"):
        load_manifest("s3://no-such-bucket/x", "val")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreError, match=f"^{URL}.*SignatureDoesNotMatch"):
        build_loader(URL, "val", train=False, batch_size=4, image_size=SIZE, backend="pytorch", num_threads=1)
    assert cli(["shards", "verify", URL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SignatureDoesNotMatch" in err and "not-the-secret" not in err


def test_dropped_connections_are_resumed(converted, s3_env):
    """Every connection is cut after 8 KB: each read resumes from the byte it reached, nothing is lost."""
    store = open_store(URL)
    payload = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    store.put_bytes("big.bin", payload)
    s3_env.start(budget=8192)
    before = s3_env.connections
    assert open_store(URL).read_bytes("big.bin") == payload
    assert s3_env.connections - before >= 100_000 // 8192
    assert raw_samples_webdataset(URL, "train") == raw_samples_webdataset(converted, "train")
    s3_env.start()
    store.delete("big.bin")


@pytest.mark.timeout(120, method="thread")  # a hang must fail, not stall the suite
@pytest.mark.parametrize("backend", ["dali-cpu", "pytorch"])
@pytest.mark.parametrize("order", ["sample", "shard"])
def test_store_stopped_mid_epoch_is_a_clear_error(converted, s3_env, backend, order):
    # little read-ahead, so most of the epoch is still in the store when it goes away
    buffer = {"shuffle_buffer": 1} if order == "shard" else {}
    ldr = build_loader(URL, "train", train=True, batch_size=2, image_size=SIZE, backend=backend, num_threads=1,
                       prefetch_depth=1, order=order, **buffer)
    batches_seen, started = 0, time.monotonic()
    try:
        with pytest.raises(ShardReadError) as caught:
            for _ in ldr:
                batches_seen += 1
                if batches_seen == 1:
                    s3_env.stop()  # the store goes away with the epoch half read
                    started = time.monotonic()
        assert batches_seen < len(ldr)  # it failed; it did not end the epoch early and quietly
        assert time.monotonic() - started < 60  # a bounded retry, not a hang
        message = str(caught.value)
        assert URL in message
        if backend == "pytorch":
            assert "reading stopped at byte" in message or "Could not connect" in message
    finally:
        ldr.close()
        s3_env.start()


def test_train_reads_train_and_val_from_the_store(converted, s3_env, tmp_path):
    from training.config import build_config
    from training.train import train

    config = build_config(overrides=dict(
        data=URL, backend="pytorch", arch="resnet18", image_size=SIZE, precision="fp32", batch_size=4, epochs=1,
        max_steps=2, num_threads=1, log_every=1, throughput_warmup_steps=0, run_dir=str(tmp_path / "run"),
        progress=False, checkpoint_minutes=0,
    ))
    summary = train(config)
    assert summary["steps"] == 2
    assert summary["final_eval"]["total"] == load_manifest(converted, "val").num_samples  # every val sample once


@pytest.mark.timeout(180, method="thread")
def test_a_stop_during_a_frozen_store_ends_in_a_checkpoint_at_once(converted, s3_env, tmp_path):
    """The store freezes mid-epoch (its relay stopped with SIGSTOP: connections open, nothing answers) and the
    scheduler sends SIGTERM: the run writes its checkpoint at the last finished step and exits 143 within
    STOP_BOUND seconds, instead of waiting out the store's retries while the scheduler's grace period runs out."""
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "tools.cli", "train", "--data", URL, "--backend", "pytorch", "--num-threads", "1",
            "--arch", "resnet18", "--image-size", str(SIZE), "--precision", "fp32", "--batch-size", "2",
            "--epochs", "3", "--log-every", "1", "--throughput-warmup-steps", "0", "--checkpoint-minutes", "0",
            "--no-progress", "--run-dir", str(run_dir), "--prefetch-depth", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    try:
        while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        os.kill(s3_env._process.pid, signal.SIGSTOP)  # the store stops answering
        time.sleep(3)  # the loader's read-ahead runs dry; the loop waits on the store
        stopped_at = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=STOP_BOUND * 4)
        took = time.monotonic() - stopped_at
    finally:
        os.kill(s3_env._process.pid, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert took < STOP_BOUND, f"{took:.1f} s"
    assert "SIGTERM while waiting for data" in out and "after writing checkpoint" in err
    saved = checkpoint_module.load(checkpoint_module.list_checkpoints(run_dir)[-1])
    assert saved["step"] >= 2 and saved["loader_states"][0]["position"] == saved["step_in_epoch"] * 2
