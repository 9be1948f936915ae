"""Data that must never reach training silently (each test failed before its fix): re-conversions into a
folder that holds a split, corrupt JPEG data, decompression bombs, link loops, empty class folders, --strict,
converter processes and flags, and `verify`'s counts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import webdataset as wds
from conftest import TINY_CLASSES, write_tree
from PIL import Image
from torchvision.datasets.folder import find_classes

import shards.write as write_module
from pipeline import ShardReadError, build_loader
from shards.convert import convert
from shards.images import RejectedImage, prepare_image, strict_decode_problem
from shards.schema import load_manifest, manifest_name, shard_files
from shards.verify import verify
from tools.cli import main as cli

READERS = ("dali-cpu", "pytorch")


def noisy_jpeg(seed: int, size: tuple[int, int] = (160, 128), **save) -> bytes:
    """A JPEG with enough entropy-coded data (noise) that flipping bytes in the middle corrupts the scan."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, **save)
    return out.getvalue()


def corrupt_scan(data: bytes) -> bytes:
    """Flip 8 bytes inside the scan (what a bad disk or a broken download does), headers and end marker kept."""
    damaged = bytearray(data)
    start = data.index(b"\xff\xda") + 100
    for position in np.linspace(start, len(data) - 100, 8).astype(int):
        damaged[position] ^= 0xFF
    return bytes(damaged)


def bomb(data: bytes, side: int = 60000) -> bytes:
    """`data` with its frame header claiming side x side pixels."""
    patched = bytearray(data)
    sof = data.index(b"\xff\xc0")
    patched[sof + 5: sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    return bytes(patched)


def tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def read_keys(out: Path, split: str, backend: str, **kwargs) -> list[str]:
    loader = build_loader(out, split, train=False, batch_size=4, image_size=32, backend=backend, num_threads=1,
                          with_keys=True, **kwargs)
    return [key for _, _, keys in loader for key in keys]


# --- 1. a re-conversion never leaves a manifest describing shards it did not write -------------------------
def test_killed_reconversion_with_another_seed_leaves_no_trusted_manifest(tiny_imagenet, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, seed=0, workers=1, progress=False)
    real_write_shard = write_module.write_shard
    written = []

    def killed_after_two(shard, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("kill -9")
        written.append(shard.index)
        return real_write_shard(shard, **kwargs)

    monkeypatch.setattr(write_module, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, seed=1, workers=1, progress=False)
    # two shards of the new order replaced two of the old: no manifest may describe this mix
    assert written == [0, 1] and not (out / manifest_name("train")).exists()
    for backend in READERS:
        with pytest.raises(FileNotFoundError, match="train.manifest.json not found"):
            read_keys(out, "train", backend)
    monkeypatch.setattr(write_module, "write_shard", real_write_shard)
    convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, seed=1, workers=1, progress=False)
    assert verify(out, workers=1)[0] == []


@pytest.mark.parametrize("backend", READERS)
def test_loaders_refuse_a_shard_that_does_not_match_its_record(tiny_shards, tmp_path, backend):
    out = Path(tmp_path / "shards")
    out.mkdir()
    for path in tiny_shards.iterdir():
        if path.is_file():
            (out / path.name).write_bytes(path.read_bytes())
    # another conversion's shard of the same name, not what the manifest describes
    (out / "val-000001.tar").write_bytes((out / "val-000000.tar").read_bytes())
    with pytest.raises(ShardReadError, match=r"val-000001\.tar: \d+ bytes, the val manifest says \d+"):
        read_keys(out, "val", backend)
    (out / "val-000001.tar").write_bytes((tiny_shards / "val-000001.tar").read_bytes())
    (out / "val-000001.idx").write_text("v1.2 3\n")
    with pytest.raises(ShardReadError, match=r"val-000001\.tar: its index starts 'v1.2 3', the val manifest says 8"):
        read_keys(out, "val", backend)


def test_shards_of_an_older_larger_plan_are_removed_and_unlisted_ones_reported(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    convert(tiny_imagenet / "val", out, split="val", samples_per_shard=4, workers=1, progress=False)
    assert len(list(out.glob("val-*.tar"))) == 7
    manifest = convert(tiny_imagenet / "val", out, split="val", samples_per_shard=10, workers=1, progress=False)
    assert sorted(p.name for p in out.glob("val-*")) == ["val-000000.idx", "val-000000.tar", "val-000001.idx",
                                                          "val-000001.tar", "val-000002.idx", "val-000002.tar"]
    assert [r.num_samples for r in manifest.shards] == [10, 10, 5]
    (out / "val-000007.tar").write_bytes((out / "val-000000.tar").read_bytes())
    problems, stats = verify(out, workers=1)
    assert problems == ["val-000007.tar: not listed in val.manifest.json (left by an older conversion?); remove it"]


def test_verify_fails_a_split_whose_shards_have_no_manifest(tiny_shards, tmp_path, capsys):
    """`cp -r sh shm; rm shm/train.manifest.json; saturate shards verify shm` said OK for val and never
    mentioned the train tars, which no loader can open; a killed re-conversion leaves exactly that."""
    out = tmp_path / "shm"
    out.mkdir()
    for path in tiny_shards.iterdir():
        if path.is_file() and path.name != "train.manifest.json":
            (out / path.name).write_bytes(path.read_bytes())
    (out / "test-000000.tar.partial").write_bytes(b"")  # a conversion of split 'test' killed at its first shard
    expected = [
        f"{out / 'train.manifest.json'}: missing, but 16 train shard files are there (train-000000.idx, "
        f"train-000000.tar, ...): no loader opens the split; rerun `saturate shards convert SRC {out} --split "
        f"train` (or `saturate shards merge {out} --split train` once every job has finished)",
        f"{out / 'test.manifest.json'}: missing, but 1 test shard file is there (test-000000.tar.partial): no "
        f"loader opens the split; rerun `saturate shards convert SRC {out} --split test` (or `saturate shards "
        f"merge {out} --split test` once every job has finished)",
    ]
    problems, stats = verify(out, workers=1)
    assert problems == expected and stats["listed"] == 25  # val is still checked
    assert cli(["shards", "verify", str(out), "--workers", "1", "--no-progress"]) == 1
    assert capsys.readouterr().out.splitlines()[:2] == [f"FAIL {line}" for line in expected]
    assert verify(out, splits=["val"], workers=1)[0] == []  # only val asked about, and val is whole
    for path in out.glob("val*"):  # no manifest at all: still a finding per split, not "nothing to verify"
        path.unlink()
    problems, stats = verify(out, workers=1)
    assert problems == expected and stats["shards"] == 0


# --- 2. corrupt entropy-coded data ------------------------------------------------------------------------
def test_corrupt_jpeg_data_is_rejected_by_default_and_flagged_by_verify(tmp_path):
    good, damaged = noisy_jpeg(0), corrupt_scan(noisy_jpeg(1))
    Image.open(io.BytesIO(damaged)).load()  # the premise: Pillow decodes it with a warning at most
    assert strict_decode_problem(good) is None and strict_decode_problem(damaged)[0] == "corrupt"
    src = tree(tmp_path / "src", {"n01/good.JPEG": good, "n01/damaged.JPEG": damaged, "n02/other.JPEG": good})
    manifest = convert(src, tmp_path / "out", split="train", workers=1, progress=False)
    assert manifest.num_samples == 2
    [rejected] = manifest.rejected
    assert rejected["path"] == "n01/damaged.JPEG" and rejected["reason"].startswith("corrupt JPEG data (")
    # --check header trusts the header: packed, and `verify --decode` then names the sample
    fast = convert(src, tmp_path / "fast", split="train", workers=1, check="header", progress=False)
    assert fast.num_samples == 3 and fast.options["check"] == "header"
    problems, stats = verify(tmp_path / "fast", decode=True, workers=1)
    assert len(problems) == 1 and ":damaged: image does not decode cleanly (" in problems[0]
    assert stats["decoded"] == 2


# --- 3. decompression bombs ---------------------------------------------------------------------------------
def test_decompression_bomb_is_rejected_and_loaders_name_one_that_got_through(tmp_path):
    header_bomb = bomb(noisy_jpeg(2, (64, 48)))
    with pytest.raises(RejectedImage, match=r"header claims 60000x60000 = 3600000000 pixels, above --max-pixels"):
        prepare_image(header_bomb, check="header")
    with pytest.raises(RejectedImage, match="above --max-pixels 1000"):
        prepare_image(noisy_jpeg(3), max_pixels=1000)
    files = {f"n0{c}/{c}_{i}.JPEG": noisy_jpeg(10 * c + i, (64, 48)) for c in (1, 2) for i in range(3)}
    src = tree(tmp_path / "src", {**files, "n01/bomb.JPEG": header_bomb})
    manifest = convert(src, tmp_path / "out", split="val", workers=1, progress=False)
    assert [r["path"] for r in manifest.rejected] == ["n01/bomb.JPEG"]
    # an operator who raised the limit and skipped the decode check packed it: every loader names it
    convert(src, tmp_path / "let", split="val", workers=1, check="header", max_pixels=4 * 10**9, progress=False)
    for backend in READERS:
        with pytest.raises(ShardReadError, match=r"val-000000\.tar.*bomb"):
            read_keys(tmp_path / "let", "val", backend)


# --- 4. links -----------------------------------------------------------------------------------------------
def test_links_are_followed_once_and_unusable_ones_rejected(tmp_path):
    src = tree(tmp_path / "src", {f"n01/{i}.JPEG": noisy_jpeg(i, (32, 32)) for i in range(3)})
    tree(src, {f"n02/{i}.JPEG": noisy_jpeg(10 + i, (32, 32)) for i in range(2)})
    outside = tree(tmp_path / "elsewhere", {"n03/x.JPEG": noisy_jpeg(20, (32, 32))})
    os.symlink("..", src / "n01" / "up")  # a loop: 5 images became 205 samples, 80 wrongly labelled
    os.symlink("self", src / "n01" / "self")
    os.symlink("missing.JPEG", src / "n02" / "dangling.JPEG")
    os.symlink(outside / "n03", src / "n03")  # a class folder on another disk: followed, like ImageFolder
    os.symlink(src / "n03", src / "n02" / "again")  # the same real folder a second time
    manifest = convert(src, tmp_path / "out", split="train", workers=1, progress=False)
    assert manifest.num_samples == 6 and manifest.wnids == ["n01", "n02", "n03"]
    reasons = {r["path"]: r["reason"] for r in manifest.rejected}
    assert reasons.keys() == {"n01/up", "n01/self", "n02/dangling.JPEG", "n02/again"}
    assert reasons["n01/up"].startswith("link to a folder already read (..)")
    assert "Too many levels of symbolic links" in reasons["n01/self"]
    assert reasons["n02/dangling.JPEG"] == "unusable link to missing.JPEG (No such file or directory)"
    assert manifest.discovered == manifest.num_samples + len(manifest.rejected)


# --- 5. empty class folders ---------------------------------------------------------------------------------
def test_empty_class_folder_keeps_imagefolder_indices(tmp_path, capsys):
    src = write_tree(tmp_path / "src", train_per_class=2, val_per_class=0)
    (src / "train" / "n00000003b").mkdir()  # sorts between n00000003 and n00000004
    _, class_to_idx = find_classes(str(src / "train"))  # what ImageFolder(allow_empty=True) uses
    manifest = convert(src / "train", tmp_path / "out", split="train", workers=1, progress=False)
    assert {c["wnid"]: c["index"] for c in manifest.classes} == class_to_idx
    assert class_to_idx["n00000004"] == 4 and len(class_to_idx) == len(TINY_CLASSES) + 1
    assert [c["num_samples"] for c in manifest.classes] == [2, 2, 2, 0, 2, 2]
    assert "1 of 6 classes have no samples: n00000003b (index 3)" in capsys.readouterr().err
    shard = wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False).decode()
    labels = {int(s["cls"]) for s in shard}
    assert labels == {0, 1, 2, 4, 5}


# --- 6. --strict covers discovery ---------------------------------------------------------------------------
def test_strict_stops_at_a_file_outside_any_class_folder(tmp_path):
    src = tree(tmp_path / "src", {"n01/a.JPEG": noisy_jpeg(0, (32, 32)), "stray.JPEG": noisy_jpeg(1, (32, 32))})
    assert cli(["shards", "convert", str(src), str(tmp_path / "out"), "--split", "train", "--strict",
                "--no-progress"]) == 2
    assert not list((tmp_path / "out").glob("*.tar"))
    with pytest.raises(ValueError, match=r"stray\.JPEG: not inside a class folder \(--strict\)"):
        convert(src, tmp_path / "out", split="train", strict=True, progress=False)


# --- 9. converter processes, full disks, permissions ----------------------------------------------------------
def test_killed_converter_takes_its_workers_with_it(tmp_path):
    src = tree(tmp_path / "src", {f"n0{c}/{i}.JPEG": noisy_jpeg(100 * c + i, (640, 480))
                                  for c in range(2) for i in range(60)})
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "shards", "convert", str(src), str(tmp_path / "out"),
                             "--split", "train", "--samples-per-shard", "4", "--workers", "2", "--no-progress"],
                            cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "out").glob("*.tar")) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = parent.children(recursive=True)
    assert len(children) >= 2  # the shard workers (and the progress manager)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []


def test_a_second_converter_of_a_split_names_the_first_instead_of_racing_it(tmp_path, capsys, monkeypatch):
    """Two converters into the same OUT raced over the same `.partial` files, and the loser died with
    `[Errno 2] No such file or directory: 'race/train-000007.tar.partial' -> ...`. The second now stops before
    writing anything, naming the first; a claim whose converter is gone is ignored."""
    import socket
    import threading

    from shards import claim as claim_module
    from shards.claim import CLAIM_STALE_AFTER

    src = tree(tmp_path / "src", {f"n0{c}/{i}.JPEG": noisy_jpeg(100 * c + i, (640, 480))  # ~1 s of converting
                                  for c in range(2) for i in range(60)})
    out = tmp_path / "race"
    argv = ["shards", "convert", str(src), str(out), "--split", "train", "--samples-per-shard", "4", "--workers",
            "1", "--no-progress"]

    def start(*extra: str) -> subprocess.Popen:
        """A converter in its own process, returned once it holds its claim on the split."""
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *argv, *extra], cwd=Path(__file__).parents[1],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list(out.glob(".parts/.train.claim.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        return proc

    first = start()
    os.kill(first.pid, signal.SIGSTOP)  # frozen mid-conversion, holding its claim
    try:
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"saturate shards: error: another converter (host {socket.gethostname()}, pid "
                              f"{first.pid}) is writing {out / 'train'} (job 0 of 1); wait for it to end or stop "
                              "it. Its claim "), err
        assert err.count("\n") == 1
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert verify(out, workers=1)[0] == [] and not list(out.glob(".parts/.train.claim*"))  # released at the end

    killed = start("--seed", "1")  # kill -9 leaves the claim; its pid is gone, so on this host it is stale at once
    killed.kill()
    killed.wait()
    assert list(out.glob(".parts/.train.claim.tmp-*"))
    assert cli([*argv, "--seed", "1"]) == 0
    assert verify(out, workers=1)[0] == [] and not list(out.glob(".parts/.train.claim*"))

    # claims of converters on another host, which cannot be asked: live while refreshed
    (out / "train.manifest.json").unlink()
    digest = json.loads((out / ".parts" / "train.plan.json").read_text())["plan_digest"]
    foreign = out / ".parts" / ".train.claim.tmp-otherhost-12-abcd"

    def claim(job_index: int, *, age: float = 0.0, plan: str = digest, started: float = 0.0) -> None:
        foreign.write_text(json.dumps({"host": "node07", "pid": 12, "plan_digest": plan, "num_jobs": 2,
                                       "job_index": job_index, "refreshed": time.time() - age, "started": started}))

    claim(1)  # job 1 of the same two-job conversion: writes other shards, no conflict
    assert cli([*argv, "--seed", "1", "--num-jobs", "2", "--job-index", "0"]) == 0 and foreign.exists()
    (out / "train.manifest.json").unlink()
    claim(0)  # the same job
    assert cli([*argv, "--seed", "1", "--num-jobs", "2", "--job-index", "0"]) == 2
    assert "another converter (host node07, pid 12) is writing" in capsys.readouterr().err
    claim(1, plan="another")  # another conversion
    assert cli([*argv, "--seed", "1", "--num-jobs", "2", "--job-index", "0"]) == 2
    assert "(job 1 of 2 of another conversion (other source, seed or options))" in capsys.readouterr().err
    # two converters that start together: the one that started first goes on once the other has stopped...
    monkeypatch.setattr(claim_module, "CLAIM_SETTLE", 2.0)
    claim(1, plan="another", started=time.time() + 60)
    threading.Timer(0.5, foreign.unlink).start()  # the later one saw this claim and stops
    assert cli([*argv, "--seed", "1", "--num-jobs", "2", "--job-index", "0"]) == 0
    (out / "train.manifest.json").unlink()
    claim(1, plan="another", started=time.time() + 60)  # ...and stops too when the other never saw it and runs
    assert cli([*argv, "--seed", "1", "--num-jobs", "2", "--job-index", "0"]) == 2
    assert "another converter (host node07, pid 12) is writing" in capsys.readouterr().err
    claim(1, plan="another", age=CLAIM_STALE_AFTER + 1)  # not refreshed for too long: abandoned, removed
    assert cli([*argv, "--seed", "1"]) == 0 and not foreign.exists()
    assert verify(out, workers=1)[0] == []


def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    src = write_tree(tmp_path / "src", train_per_class=2, val_per_class=0)

    def full(fd, chunks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    assert cli(["shards", "convert", str(src / "train"), str(tmp_path / "out"), "--split", "train", "--workers", "1",
                "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-000000.tar.partial failed: [Errno 28] No space left on device" in err[0]
    assert not list((tmp_path / "out").glob("*.tar*")) and not (tmp_path / "out" / "train.manifest.json").exists()


def test_manifest_and_plan_follow_the_umask(tiny_imagenet, tmp_path):
    old = os.umask(0o022)
    try:
        convert(tiny_imagenet / "val", tmp_path / "out", split="val", samples_per_shard=8, workers=1, progress=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "out" / "val.manifest.json", tmp_path / "out" / ".parts" / "val.plan.json",
                 tmp_path / "out" / ".parts" / "val-000000.json", tmp_path / "out" / "val-000000.tar"):
        assert path.stat().st_mode & 0o777 == 0o644, path


# --- 10. flags that slipped through ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--max-size", "0"], "--max-size 0 must be >= 1 pixel"),
    (["--workers", "0"], "--workers 0 must be in 1..4096"),
    (["--workers", "-3"], "--workers -3 must be in 1..4096"),
    (["--max-pixels", "0"], "--max-pixels 0 must be >= 1"),
    (["--split", "../up"], "--split '../up': a split name is letters"),
])
def test_bad_converter_flags_are_one_line_and_write_nothing(tmp_path, capsys, flags, message):
    src = write_tree(tmp_path / "src", train_per_class=1, val_per_class=0)
    argv = ["shards", "convert", str(src / "train"), str(tmp_path / "out"), "--no-progress"]
    argv += flags if "--split" in flags else ["--split", "train", *flags]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_any_split_name_converts_and_loaders_take_an_explicit_train_switch(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    convert(tiny_imagenet / "val", out, split="minival", samples_per_shard=8, workers=1, progress=False)
    assert [tar.name for tar, _ in shard_files(out, load_manifest(out, "minival"))][0] == "minival-000000.tar"
    as_val = read_keys(out, "minival", "dali-cpu")
    assert sorted(as_val) == sorted(read_keys(out, "minival", "pytorch")) and len(as_val) == 25
    trained = build_loader(out, "minival", train=True, batch_size=4, image_size=32, backend="dali-cpu", num_threads=1)
    assert len(trained) == 25 // 4  # train drops the last partial batch: the switch, not the name, decides


# --- 11. verify's counts --------------------------------------------------------------------------------------
def test_verify_counts_only_samples_it_read(tiny_shards, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    for path in tiny_shards.glob("val*"):
        (out / path.name).write_bytes(path.read_bytes())
    (out / "val-000001.tar").unlink()
    problems, stats = verify(out, decode=True, workers=1)
    assert stats["listed"] == 25 and stats["samples"] == 17 and stats["decoded"] == 17
    assert any("val-000001.tar: missing" in p for p in problems)
    assert cli(["shards", "verify", str(out), "--workers", "1", "--no-progress"]) == 1
    assert "17 of 25 listed samples checked" in capsys.readouterr().out


def test_manifest_lists_per_class_counts(tiny_shards):
    manifest = json.loads((tiny_shards / "train.manifest.json").read_text())
    assert [c["num_samples"] for c in manifest["classes"]] == [12] * 5


@pytest.mark.parametrize("mode, save", [("L", {}), ("CMYK", {}), ("RGB", {"exif": b"rotate"}), ("RGB", {"big": 1})])
def test_corrupt_data_is_rejected_also_when_the_image_would_be_converted(mode, save):
    """Grayscale, CMYK, EXIF-rotated and --max-size images are re-encoded: damaged data must be caught before,
    or the clean re-encoded JPEG would carry the damage (and `verify --decode` could never see it)."""
    pixels = np.random.default_rng(7).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    options = {}
    if save.get("exif"):
        exif = Image.Exif()
        exif[0x0112] = 6
        options["exif"] = exif.tobytes()
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", quality=90, **options)
    good, damaged = out.getvalue(), corrupt_scan(out.getvalue())
    max_size = 64 if save.get("big") else None
    _, reason = prepare_image(good, max_size=max_size)
    assert reason  # the premise: this image is converted, not passed through
    with pytest.raises(RejectedImage, match=r"^corrupt JPEG data \("):
        prepare_image(damaged, max_size=max_size)


# --- found by a hostile review of the above -------------------------------------------------------------------
def test_a_link_above_the_source_does_not_read_the_tree_again(tmp_path):
    """`c1/up -> ../..` reaches SRC from above: the real folders inside the link are the tree itself."""
    src = tree(tmp_path / "anc" / "data" / "train", {f"c{c}/{i}.JPEG": noisy_jpeg(10 * c + i, (32, 32))
                                                     for c in (1, 2) for i in range(3)})
    os.symlink("../..", src / "c1" / "up")
    manifest = convert(src, tmp_path / "out", split="train", workers=1, progress=False)
    assert manifest.num_samples == 6
    assert {r["path"]: r["reason"] for r in manifest.rejected} == {
        "c1/up/train": "folder already read through another path; each folder is read once"}


def test_unreadable_folders_and_files_are_rejected_not_lost(tmp_path, monkeypatch):
    src = tree(tmp_path / "src", {"a/x.JPEG": noisy_jpeg(0, (32, 32)), "a/locked/y.JPEG": noisy_jpeg(1, (32, 32)),
                                  "b/z.JPEG": noisy_jpeg(2, (32, 32))})
    real_walk, real_access = os.walk, os.access

    def walk(top, **kwargs):  # what os.walk does for a folder it may not list (root can read anything)
        for dirpath, dirnames, filenames in real_walk(top, **kwargs):
            if dirpath.endswith("locked"):
                if kwargs.get("onerror"):
                    kwargs["onerror"](PermissionError(13, "Permission denied", dirpath))
                continue
            yield dirpath, dirnames, filenames

    monkeypatch.setattr(os, "walk", walk)
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("z.JPEG") and real_access(path, mode))
    manifest = convert(src, tmp_path / "out", split="train", workers=1, progress=False)
    assert manifest.num_samples == 1 and manifest.discovered == 3
    assert {r["path"]: r["reason"] for r in manifest.rejected} == {
        "a/locked": "unreadable folder (Permission denied)", "b/z.JPEG": "unreadable file (Permission denied)"}


def test_strict_with_several_workers_is_one_line_and_stops_the_pool(tmp_path, capsys):
    files = {f"n0{c}/{i}.JPEG": noisy_jpeg(100 * c + i, (64, 48)) for c in (1, 2) for i in range(8)}
    files["n01/3.JPEG"] = corrupt_scan(noisy_jpeg(7, (160, 128)))
    src = tree(tmp_path / "src", files)
    argv = ["shards", "convert", str(src), str(tmp_path / "out"), "--split", "train", "--samples-per-shard", "2",
            "--workers", "2", "--strict", "--no-progress"]
    assert cli(argv) == 2  # was a 60-line AttributeError from the pool's shutdown
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "n01/3.JPEG: corrupt JPEG data" in err[0] and "(--strict)" in err[0]
    assert not psutil.Process().children(recursive=True)
    assert cli([*argv[:-2], "--no-progress"]) == 0  # the same tree without --strict: rejected, listed
    assert cli(argv) == 2  # a rerun with --strict over that conversion: its manifest lists the rejection
    assert "listed in" in capsys.readouterr().err.strip().splitlines()[-1]
    assert cli([*argv, "--workers", "99999999999999999999"]) == 2
    assert "--workers 99999999999999999999 must be in 1..4096" in capsys.readouterr().err


def test_a_file_fixed_in_place_is_packed_on_rerun(tmp_path):
    good = noisy_jpeg(5, (96, 64))
    src = tree(tmp_path / "src", {"n01/a.JPEG": good, "n01/b.JPEG": corrupt_scan(good), "n02/c.JPEG": good})
    first = convert(src, tmp_path / "out", split="train", workers=1, progress=False)
    assert [r["path"] for r in first.rejected] == ["n01/b.JPEG"]
    (src / "n01" / "b.JPEG").write_bytes(good)  # the same size: only its modification time says it changed
    os.utime(src / "n01" / "b.JPEG", ns=(time.time_ns(), time.time_ns() + 10**9))
    fixed = convert(src, tmp_path / "out", split="train", workers=1, progress=False)
    assert fixed.rejected == [] and fixed.num_samples == 3
    assert fixed.plan_digest == first.plan_digest  # names, sizes and labels are the same: one plan


def test_another_plan_s_index_beside_a_complete_tar_is_rewritten(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    convert(tiny_imagenet / "val", out, split="val", samples_per_shard=8, workers=1, progress=False)
    index = out / "val-000001.idx"
    good = index.read_text()
    head, *lines = good.splitlines()
    index.write_text("\n".join([head, *reversed(lines)]) + "\n")  # a kill between the renames of another plan
    convert(tiny_imagenet / "val", out, split="val", samples_per_shard=8, workers=1, progress=False)
    assert index.read_text() == good and verify(out, workers=1)[0] == []


def test_a_hidden_class_folder_is_refused_unless_classes_are_pinned(tmp_path):
    src = tree(tmp_path / "src", {"n01/a.JPEG": noisy_jpeg(0, (32, 32)), ".ipynb_checkpoints/a.JPEG": b"x"})
    with pytest.raises(ValueError, match=r"\.ipynb_checkpoints is a hidden folder: torchvision's ImageFolder would"):
        convert(src, tmp_path / "out", split="train", workers=1, progress=False)
    (tmp_path / "classes.txt").write_text("n01\n")
    pinned = convert(src, tmp_path / "out", split="train", workers=1, classes_file=tmp_path / "classes.txt",
                     progress=False)
    assert pinned.wnids == ["n01"] and pinned.num_samples == 1


def test_a_16_bit_grayscale_png_keeps_its_tones():
    """Pillow's convert("RGB") clips 16-bit values at 255: a gradient came out almost all white."""
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")
    assert Image.open(io.BytesIO(out.getvalue())).mode == "I;16"
    data, reason = prepare_image(out.getvalue())
    pixels = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
    assert reason == "PNG source" and pixels.shape == (48, 64, 3)
    assert abs(pixels.mean() - 127.5) < 2 and pixels.min() <= 1 and pixels.max() >= 254
