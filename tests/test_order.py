"""The train data order (pipeline.order): a fresh sample-level order every epoch that neither the number of
processes nor the backend changes, and a position that continues on another process count.

Ranks are simulated in one process (rank/world_size given explicitly), so every backend and process count is
checked on the same tiny split quickly; the trainer's own resume across process counts (torchrun, SIGTERM) is in
test_train_elastic.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, TINY_TRAIN_PER_CLASS

import pipeline.order as order_module
from pipeline import LoaderOptionError, build_loader
from pipeline.order import ENTRY_FOLDER, ORDER_CHUNK, SplitIndex, epoch_stream, rank_batches, segments
from shards.process import TMP_MARK, host_tag
from shards.schema import load_manifest
from shards.store import open_store

SIZE = 32  # pixels
GLOBAL = 12  # samples per global micro-batch: 1, 2, 3 and 4 processes keep it
SPLIT = len(TINY_CLASSES) * TINY_TRAIN_PER_CLASS  # 60 train samples: 5 global batches per epoch
STEPS = SPLIT // GLOBAL
BACKENDS = ("dali-cpu", "pytorch")


# --- the order itself, from the plan alone ----------------------------------------------------------------------
def test_an_epoch_is_every_sample_once_in_chunks_and_each_epoch_differs():
    counts = [37, 8, 100, 1, 16]
    stream = epoch_stream(counts, seed=3, epoch=0)
    assert sorted(stream.tolist()) == list(range(sum(counts)))
    assert np.array_equal(stream, epoch_stream(counts, seed=3, epoch=0))  # same seed and epoch, same order
    assert not np.array_equal(stream, epoch_stream(counts, seed=3, epoch=1))
    assert not np.array_equal(stream, epoch_stream(counts, seed=4, epoch=0))
    starts = np.cumsum([0, *counts])
    shard = np.searchsorted(starts, stream, side="right") - 1
    runs = np.split(stream, np.flatnonzero(np.diff(shard)) + 1)
    # a chunk is at most ORDER_CHUNK samples of one shard, read forwards; there are as many chunks as the
    # shards' chunk counts (two chunks of one shard may meet, so runs can be fewer)
    assert sum(-(-n // ORDER_CHUNK) for n in counts) >= len(runs)
    for run in runs:
        assert list(run) == sorted(run) or len(run) > ORDER_CHUNK
    # chunks differ between epochs: the pairs that read together in epoch 0 mostly do not in epoch 1
    def neighbours(s: np.ndarray) -> set:
        return {(int(a), int(b)) for a, b in zip(s[:-1], s[1:], strict=True)}
    again = neighbours(stream) & neighbours(epoch_stream(counts, seed=3, epoch=1))
    assert len(again) < len(stream) // 4


def test_rank_batches_split_each_global_batch_whatever_the_process_count():
    stream = epoch_stream([30, 30], seed=0, epoch=2)
    whole = stream[: (len(stream) // GLOBAL) * GLOBAL].reshape(-1, GLOBAL)
    for world in (1, 2, 3, 4):
        parts = [rank_batches(stream, rank=r, world_size=world, batch_size=GLOBAL // world) for r in range(world)]
        joined = np.concatenate(parts, axis=1)
        assert np.array_equal(joined, whole)


def test_segments_cut_at_batch_boundaries_within_the_entry_bound(tiny_shards):
    manifest = load_manifest(tiny_shards, "train")
    index = SplitIndex(open_store(tiny_shards), manifest)
    batches = rank_batches(epoch_stream(index.counts, seed=0, epoch=0), rank=0, world_size=1, batch_size=4)
    cut = segments(index, batches, max_entries=3)
    assert [s.first_batch for s in cut] == list(np.cumsum([0] + [s.num_batches for s in cut[:-1]]))
    assert sum(s.num_batches for s in cut) == len(batches) and len(cut) > 1
    for s in cut:
        assert len(s.entries) <= 3 or s.num_batches == 1
        shards = [shard for shard, samples in s.entries for _ in samples]
        assert shards == list(index.locate(s.batches.reshape(-1))[0])
    # an index line of an entry is the shard's own line for that sample
    shard, samples = cut[0].entries[0]
    text = index.index_text(shard, samples).decode().splitlines()
    assert text[0] == f"v1.2 {len(samples)}"
    idx = (tiny_shards / manifest.shards[shard].index).read_text().splitlines()
    assert text[1:] == [idx[1 + int(j)] for j in samples]


def test_bad_orders_are_named(tiny_shards):
    with pytest.raises(LoaderOptionError, match="order='random': choose one of sample, shard"):
        build_loader(tiny_shards, "train", train=True, batch_size=4, backend="dali-cpu", order="random")
    with pytest.raises(LoaderOptionError, match="order='sample': val loaders read every sample once"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="pytorch", order="sample")


# --- the loaders -------------------------------------------------------------------------------------------------
def make(shards, backend, world, rank, *, state=None, seed=0, **kwargs):
    return build_loader(shards, "train", train=True, batch_size=GLOBAL // world, image_size=SIZE, backend=backend,
                        rank=rank, world_size=world, num_threads=kwargs.pop("num_threads", 1), seed=seed,
                        with_keys=True, state=state, **kwargs)


def run(loaders, steps: int) -> list[tuple[list[str], dict[str, torch.Tensor]]]:
    """`steps` global batches from ranks in lockstep, across epoch ends: (sorted keys, key -> image)."""
    passes = [iter(ldr) for ldr in loaders]
    out = []
    while len(out) < steps:
        try:
            batches = [next(p) for p in passes]
        except StopIteration:
            passes = [iter(ldr) for ldr in loaders]
            continue
        images = {k: image.clone() for b in batches for k, image in zip(b[2], b[0], strict=True)}
        out.append((sorted(images), images))
    return out


@pytest.fixture()
def small_segments(monkeypatch):
    """A few entries per DALI pipeline, so an epoch is several segments and their boundaries are exercised."""
    monkeypatch.setattr(order_module, "MAX_ENTRIES", 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_batches_and_resume_do_not_depend_on_the_process_count(tiny_shards, backend, small_segments):
    """The same seed gives the same global batches on 1, 2, 3 and 4 processes (elastic determinism); a state saved
    mid-epoch on 2 continues on 1, 3 and 4 with exactly the samples not yet seen; on 2 it continues bit for bit."""
    reference = None
    for world in (1, 2, 3, 4):
        loaders = [make(tiny_shards, backend, world, r) for r in range(world)]
        got = run(loaders, 2 * STEPS)
        for ldr in loaders:
            ldr.close()
        keys = [k for k, _ in got]
        if reference is None:
            reference = got
            for e in range(2):  # each epoch: every sample once, the tail of 60 % 12 = 0 samples left out
                epoch_keys = [k for ks in keys[e * STEPS:(e + 1) * STEPS] for k in ks]
                assert sorted(epoch_keys) == sorted(set(epoch_keys)) and len(epoch_keys) == SPLIT
            assert keys[:STEPS] != keys[STEPS:]  # consecutive epochs differ at sample level
        assert keys == [k for k, _ in reference], f"{world} processes"
    # stopped on 2 processes 2 batches into epoch 1
    loaders = [make(tiny_shards, backend, 2, r) for r in range(2)]
    done = run(loaders, STEPS + 2)
    states = [ldr.state_dict() for ldr in loaders]
    for ldr in loaders:
        ldr.close()
    assert states[0]["position"] == 2 * GLOBAL and states[0]["epoch"] == 1
    whole = run([make(tiny_shards, backend, 2, r) for r in range(2)], 3 * STEPS)
    for world in (1, 3, 4, 2):
        loaders = [make(tiny_shards, backend, world, r, state=states[r if world == 2 else 0]) for r in range(world)]
        assert [len(ldr) for ldr in loaders] == [STEPS - 2] * world
        rest = run(loaders, STEPS - 2 + STEPS)
        for ldr in loaders:
            ldr.close()
        assert [k for k, _ in done + rest] == [k for k, _ in whole], f"resumed on {world}"
        if world == 2 or backend == "pytorch":  # the same loader; pytorch seeds by stream position anyway
            for (_, a), (_, b) in zip(done + rest, whole, strict=True):
                assert all(torch.equal(a[k], b[k]) for k in a), f"pixels, resumed on {world}"


def test_a_position_another_global_batch_cannot_reach_is_refused(tiny_shards):
    ldr = make(tiny_shards, "pytorch", 1, 0)
    next(iter(ldr))
    state = ldr.state_dict()  # 12 samples into epoch 0
    with pytest.raises(ValueError, match=r"12 samples into epoch 0, not a whole number of this loader's global "
                                         r"micro-batches of 10 \(batch_size 5 x world_size 2\)"):
        build_loader(tiny_shards, "train", train=True, batch_size=5, image_size=SIZE, backend="pytorch", rank=0,
                     world_size=2, state=state)
    other = {**state, "seed": 1}
    with pytest.raises(ValueError, match="saved loader state has seed=1, this loader has seed=0"):
        make(tiny_shards, "pytorch", 1, 0, state=other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_orders_read_the_same_samples_per_epoch(tiny_shards, backend):
    """`shard` (the previous order) and `sample` read a whole epoch each (60 // 12 global batches of 12)."""
    for order in ("sample", "shard"):
        ldr = make(tiny_shards, backend, 1, 0, order=order)
        keys = [k for _, _, ks in ldr for k in ks]
        ldr.close()
        assert len(keys) == len(set(keys)) == SPLIT


def test_index_folders_are_private_and_cleaned(tiny_shards, tmp_path, monkeypatch):
    """DALI's entries are written under the temporary folder and removed once read; a folder a killed loader
    left (its pid gone) is removed by the next loader, a live one's is not."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"{ENTRY_FOLDER}{TMP_MARK}{host_tag()}-{4_000_000 - 7}-abc"
    alive = tmp_path / f"{ENTRY_FOLDER}{TMP_MARK}{host_tag()}-{os.getpid()}-def"
    for folder in (dead, alive):
        (folder / "segment-1").mkdir(parents=True)
    ldr = make(tiny_shards, "dali-cpu", 1, 0)
    assert not dead.exists() and alive.exists()
    ours = [p for p in Path(tmp_path).glob(f"{ENTRY_FOLDER}{TMP_MARK}*") if p != alive]
    assert len(ours) == 1
    list(ldr)
    assert list(ours[0].iterdir()) == []  # each segment's index files went once its reader was built
    ldr.close()
    assert not ours[0].exists()


def test_the_chunk_is_a_knob_of_sample_order_only(tiny_shards):
    for kwargs, message in (({"order": "shard", "order_chunk": 4}, "order_chunk=4: order='shard' reads whole"),
                            ({"order_chunk": 0}, r"order_chunk=0: must be an integer >= 1 \(samples\)")):
        with pytest.raises(LoaderOptionError, match=message):
            build_loader(tiny_shards, "train", train=True, batch_size=4, backend="pytorch", **kwargs)
    with pytest.raises(LoaderOptionError, match="order_chunk=2: val loaders read every sample once"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="pytorch", order_chunk=2)
    ldr = make(tiny_shards, "pytorch", 1, 0, order_chunk=2)
    state = ldr.state_dict()
    assert (ldr.order_chunk, state["order_chunk"]) == (2, 2)
    with pytest.raises(ValueError, match="saved loader state has order_chunk=2, this loader has order_chunk=16"):
        make(tiny_shards, "pytorch", 1, 0, state=state)
    def runs(chunk: int) -> int:  # reads from one shard in a row: smaller chunks switch shards more often
        shard = epoch_stream([40] * 8, seed=0, epoch=0, chunk=chunk) // 40
        return int(np.count_nonzero(np.diff(shard))) + 1
    assert runs(2) > runs(4) > runs(16)


def test_the_quality_tool_measures_what_it_says(tmp_path, capsys):
    """tools/order_quality.py on a small split: an i.i.d. order re-meets as often as chance says ((b-1)/(n-1) of
    the pairs of a batch of b share one again), the previous shard order re-meets more per GPU, chunks of 4
    mix small per-GPU batches better than chunks of 16, and the cost table counts what the loader writes."""
    from tools.order_quality import main, quality

    counts = np.full(8, 1000, dtype=np.int64)
    labels = np.random.default_rng(0).permutation(np.arange(8000) % 10)
    q = quality(counts, labels, 10, world=8, global_batch=256, chunks=[16, 4])
    assert q["iid"]["remeet_micro"] == pytest.approx(31 / 7999, rel=0.2)
    assert q["iid"]["remeet_global"] == pytest.approx(255 / 7999, rel=0.1)
    assert q["shard"]["remeet_micro"] > 3 * q["iid"]["remeet_micro"]
    assert q["sample (4)"]["remeet_micro"] < q["sample (16)"]["remeet_micro"] < q["shard"]["remeet_micro"]
    assert q["sample (16)"]["shards_global"] > q["shard"]["shards_micro"]
    assert main(["--samples", "8000", "--shards", "8", "--classes", "10", "--ranks", "8", "--global-batch", "256",
                 "--json", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 256 | 32 | iid | " in out and "(1.0x)" in out
    cost = json.loads((tmp_path / "q.json").read_text())["cost"]
    assert [(c["ranks"], c["chunk"]) for c in cost] == [(8, 16), (8, 4)]
    assert cost[1]["index_files"] > cost[0]["index_files"] >= 1000 // 16


def test_a_state_of_other_shards_is_refused_and_the_trainer_restarts_the_epoch(tiny_imagenet, tiny_shards, tmp_path,
                                                                                capsys):
    """The split re-converted with another shard size holds the same 60 samples in other places: a position
    counted on the old shards would repeat some samples and skip others, so the loader refuses the state
    (StateMismatch naming the shards) and a resumed training run says the epoch's order restarts."""
    from pipeline import StateMismatch
    from shards.convert import convert
    from training.config import build_config
    from training.train import train

    other = tmp_path / "reconverted"
    for split in ("train", "val"):
        convert(tiny_imagenet / split, other, split=split, samples_per_shard=10, seed=0, workers=1, progress=False)
    ldr = make(tiny_shards, "pytorch", 1, 0)
    next(iter(ldr))
    state = ldr.state_dict()
    with pytest.raises(StateMismatch, match="the split's shards changed since") as caught:
        make(other, "pytorch", 1, 0, state=state)
    assert caught.value.key == "split_digest"
    older = {key: value for key, value in state.items() if key != "split_digest"}  # saved before the digest
    assert make(tiny_shards, "pytorch", 1, 0, state=older).state_dict() == state  # unknown: the position stays

    def config(data, **extra):
        return build_config(overrides=dict(data=str(data), backend="pytorch", arch="resnet18", image_size=32,
                                           precision="fp32", global_batch_size=12, epochs=2, num_threads=1,
                                           log_every=1, checkpoint_minutes=0, progress=False,
                                           run_dir=str(tmp_path / "run"), **extra))

    train(config(tiny_shards, max_steps=2))
    capsys.readouterr()
    summary = train(config(other, resume="auto"))
    out = capsys.readouterr().out
    assert "warning: the data order of epoch 0 restarts: cannot resume: the split's shards changed since" in out
    assert summary["steps"] == 2 * STEPS


def test_a_full_temporary_folder_is_named_with_the_variable_that_moves_it(tiny_shards, tmp_path, monkeypatch):
    """DALI reads its reader entries from index files in a temporary folder: when that disk is full the error
    names the folder and TMPDIR, not only `[Errno 28] No space left on device`."""
    import errno
    import tempfile
    from pathlib import Path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    write_bytes = Path.write_bytes

    def full_disk(path, data):
        if path.suffix == ".idx" and str(path).startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match=f"cannot write the data reader's index files in {tmp_path}/.*No space left on "
                                      "device.*point TMPDIR at a writable folder") as caught:
        next(iter(make(tiny_shards, "dali-cpu", 1, 0)))
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.rglob("*.idx")] == []
