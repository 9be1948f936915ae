"""The converter round-trips real bytes: webdataset and DALI read our shards back exactly."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import TINY_CLASSES, tiny_image, write_tree
from PIL import Image
from torchvision.datasets import ImageFolder

import shards.write as write_module
from shards.convert import convert
from shards.plan import parse_size
from shards.publish import write_manifest
from shards.schema import (
    IMAGE_EXT,
    LABEL_EXT,
    LABEL_WIDTH,
    META_EXT,
    decode_label,
    load_manifest,
    manifest_name,
    sample_key,
    shard_files,
)
from shards.verify import verify
from tools.cli import main as cli


def read_back(out: Path, split: str) -> dict[str, dict]:
    """Every sample of a split through the webdataset library, keyed by source path."""
    manifest = load_manifest(out, split)
    urls = [str(tar) for tar, _ in shard_files(out, manifest)]
    samples = {}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():  # standard decoders: .cls -> int
        meta = sample[META_EXT]
        assert meta["path"] not in samples
        samples[meta["path"]] = {"jpg": sample[IMAGE_EXT], "cls": sample[LABEL_EXT], "meta": meta}
    return samples


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_webdataset_reads_exact_bytes_and_imagefolder_labels(tiny_imagenet, tiny_shards):
    folder = ImageFolder(tiny_imagenet / "train")
    samples = read_back(tiny_shards, "train")
    assert len(samples) == len(folder.samples) == 60
    for path, target in folder.samples:
        rel = Path(path).relative_to(tiny_imagenet / "train").as_posix()
        got = samples[rel]
        assert got["jpg"] == Path(path).read_bytes()  # untouched RGB JPEG bytes
        assert got["cls"] == target == got["meta"]["label"]
        assert got["meta"]["wnid"] == folder.classes[target]
    manifest = load_manifest(tiny_shards, "train")
    assert manifest.wnids == folder.classes == TINY_CLASSES
    assert manifest.label_encoding["width"] == LABEL_WIDTH
    assert [s.num_samples for s in manifest.shards] == [8] * 7 + [4]


def test_val_uses_train_class_indices(tiny_shards):
    val = read_back(tiny_shards, "val")
    assert len(val) == 25
    for rel, sample in val.items():
        assert TINY_CLASSES[sample["cls"]] == rel.split("/")[0]


def test_samples_are_globally_shuffled(tiny_shards):
    manifest = load_manifest(tiny_shards, "train")
    first_shard = wds.WebDataset(str(tiny_shards / manifest.shards[0].name), shardshuffle=False).decode()
    classes_in_first = {s[LABEL_EXT] for s in first_shard}
    assert len(classes_in_first) >= 3  # sorted order would put one class (12 images) in the first 8 samples


def test_dali_reads_every_sample_once_with_our_index(tiny_shards):
    from nvidia.dali import fn, pipeline_def, types

    manifest = load_manifest(tiny_shards, "train")
    pairs = shard_files(tiny_shards, manifest)

    @pipeline_def(batch_size=7, num_threads=1, device_id=None)
    def read():
        jpg, cls, meta = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs],
            ext=[IMAGE_EXT, LABEL_EXT, META_EXT], dtypes=[types.UINT8] * 3, name="Reader", pad_last_batch=True,
        )
        return jpg, cls, meta

    pipe = read()
    pipe.build()
    size = pipe.reader_meta("Reader")["epoch_size"]
    assert size == manifest.num_samples
    seen = []
    while len(seen) < size:
        jpg, cls, meta = pipe.run()
        for i in range(len(jpg)):
            meta_i = json.loads(bytes(np.array(meta.at(i))))
            assert decode_label(bytes(np.array(cls.at(i)))) == meta_i["label"]
            seen.append(meta_i["path"])
    seen = seen[:size]  # the last batch is padded by repeating its last sample
    assert len(set(seen)) == size


def test_index_matches_dali_wds2idx(tiny_shards, tmp_path):
    manifest = load_manifest(tiny_shards, "val")
    for tar, idx in shard_files(tiny_shards, manifest):
        theirs = tmp_path / (tar.stem + ".idx")
        # DALI's wheel ships wds2idx as a module; run it with this interpreter (the venv need not be on PATH)
        subprocess.run([sys.executable, "-m", "wds2idx", str(tar), str(theirs)], check=True, capture_output=True)
        assert idx.read_bytes() == theirs.read_bytes()


def test_two_runs_are_byte_identical(tiny_imagenet, tmp_path):
    outs = []
    for name, workers in (("a", 1), ("b", 2)):
        out = tmp_path / name
        convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, seed=3, workers=workers,
                progress=False)
        outs.append(files_of(out))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 8 * 2 + 1  # tars, indexes, manifest


def test_different_seed_changes_order_not_content(tiny_imagenet, tmp_path):
    a = convert(tiny_imagenet / "val", tmp_path / "a", split="val", samples_per_shard=8, seed=0, progress=False)
    b = convert(tiny_imagenet / "val", tmp_path / "b", split="val", samples_per_shard=8, seed=1, progress=False)
    assert a.shards[0].sha256 != b.shards[0].sha256
    assert read_back(tmp_path / "a", "val").keys() == read_back(tmp_path / "b", "val").keys()


def test_killed_run_resumes_to_identical_output(tiny_imagenet, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    convert(tiny_imagenet / "train", reference, split="train", samples_per_shard=8, workers=1, progress=False)

    out = tmp_path / "resumed"
    real_prepare = write_module.prepare_image
    calls = {"n": 0}

    def dies_in_shard_four(data, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8 * 3 + 5:  # mid-way through the fourth shard
            raise KeyboardInterrupt("killed")
        return real_prepare(data, **kwargs)

    monkeypatch.setattr(write_module, "prepare_image", dies_in_shard_four)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, workers=1, progress=False)
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert finished == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not (out / manifest_name("train")).exists()
    # a half-written shard that also survived under its final name would have to be rewritten
    (out / "train-000002.tar").write_bytes((out / "train-000002.tar").read_bytes()[:1000])

    monkeypatch.setattr(write_module, "prepare_image", real_prepare)
    calls["n"] = 0
    written = []
    real_write_shard = write_module.write_shard
    monkeypatch.setattr(write_module, "write_shard",
                        lambda shard, **kw: written.append(shard.index) or real_write_shard(shard, **kw))
    convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, workers=1, progress=False)
    assert written == [2, 3, 4, 5, 6, 7]  # complete, verified shards 0 and 1 were skipped
    assert files_of(out) == files_of(reference)
    assert not list(out.glob("*.partial"))


def test_jobs_together_equal_one_job(tiny_imagenet, tmp_path):
    single = tmp_path / "single"
    convert(tiny_imagenet / "train", single, split="train", samples_per_shard=8, progress=False)
    shared = tmp_path / "shared"
    results = [
        convert(tiny_imagenet / "train", shared, split="train", samples_per_shard=8, num_jobs=3, job_index=i,
                progress=False)
        for i in (0, 2, 1)
    ]
    assert results[0] is None and results[1] is None  # only the job that completes the plan writes the manifest
    assert results[2] is not None
    assert files_of(shared) == files_of(single)
    (shared / manifest_name("train")).unlink()
    assert cli(["shards", "merge", str(shared), "--split", "train"]) == 0
    assert files_of(shared) == files_of(single)


def test_merge_with_jobs_missing_names_the_shards_and_the_jobs_to_rerun(tiny_imagenet, tmp_path, capsys):
    """`shards merge` said only "some shards of the plan are not written yet"."""
    out = tmp_path / "out"
    for index in (1, 3):  # jobs 0 and 2 of 4 never ran; 60 samples -> 8 shards, job I writes I, I+4
        convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, num_jobs=4, job_index=index,
                progress=False)
    capsys.readouterr()
    assert cli(["shards", "merge", str(out), "--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err == ("saturate shards: error: 4 of 8 train shards are not written yet (train-000000.tar, "
                   "train-000002.tar, train-000004.tar, train-000006.tar): run jobs 0, 2 of --num-jobs 4 "
                   "(the same `saturate shards convert` with --job-index 0, 2), then merge\n")
    convert(tiny_imagenet / "train", out, split="train", samples_per_shard=8, num_jobs=4, job_index=0,
            progress=False)
    assert ("train: other jobs' shards are still missing (the job that completes the plan writes the manifest): "
            "2 of 8 train shards are not written yet (train-000002.tar, train-000006.tar): run job 2 of --num-jobs "
            "4 (the same `saturate shards convert` with --job-index 2), then merge\n") in capsys.readouterr().out


def test_an_identical_complete_conversion_writes_nothing(tiny_imagenet, tmp_path, monkeypatch, capsys):
    """Converting again what is already converted, into a read-only OUT, failed writing its plan
    ("[Errno 30] Read-only file system: OUT/.parts/.train.plan.json.tmp-..."); it now has nothing to write."""
    from shards.store import LocalStore

    out = tmp_path / "out"
    argv = ["shards", "convert", str(tiny_imagenet / "train"), str(out), "--split", "train", "--samples-per-shard",
            "8", "--workers", "1", "--no-progress"]
    assert cli(argv) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(out))

    for method in ("put_bytes", "put_file", "delete"):  # not prepare: mkdir of an existing folder works read-only
        monkeypatch.setattr(LocalStore, method, read_only)
    assert cli(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"train: nothing to do: {out / 'train.manifest.json'} describes this "
                                              "conversion and its 8 shards are complete\n")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    (out / "train-000003.tar").write_bytes(b"damaged")  # not complete any more: the rerun must write, and says why
    assert cli(argv) == 2  # said at the first write, the claim, naming OUT and what it needs
    assert (f"cannot write into {out} (Read-only file system): converting needs OUT writable"
            in capsys.readouterr().err)


def make_bad_and_quirky_tree(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    cls = root / "n00000001"
    cls.mkdir(parents=True)
    (root / "n00000002").mkdir()
    paths = {}

    def save(name, img, folder=cls, **kw):
        paths[name] = folder / name
        img.save(paths[name], **kw)

    save("rgb.JPEG", tiny_image(0, 0, rng), format="JPEG", quality=90)
    save("progressive.JPEG", tiny_image(0, 1, rng), format="JPEG", progressive=True)
    save("cmyk.JPEG", tiny_image(0, 2, rng).convert("CMYK"), format="JPEG")
    save("gray.JPEG", tiny_image(0, 3, rng).convert("L"), format="JPEG")
    save("png_named.JPEG", tiny_image(0, 4, rng), format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    save("rotated.JPEG", wide, format="JPEG", exif=exif.tobytes())
    save("other.JPEG", tiny_image(1, 0, rng), folder=root / "n00000002", format="JPEG")
    paths["empty.JPEG"] = cls / "empty.JPEG"
    paths["empty.JPEG"].write_bytes(b"")
    paths["truncated.JPEG"] = cls / "truncated.JPEG"
    paths["truncated.JPEG"].write_bytes(paths["rgb.JPEG"].read_bytes()[:600])
    paths["notes.txt"] = cls / "notes.txt"
    paths["notes.txt"].write_text("not an image")
    paths["stray.JPEG"] = root / "stray.JPEG"
    paths["stray.JPEG"].write_bytes(paths["rgb.JPEG"].read_bytes())
    (cls / ".hidden.JPEG").write_bytes(b"ignored: hidden files are not part of a data set")
    return paths


def test_quirks_and_bad_files_are_converted_or_rejected_never_lost(tmp_path):
    src = tmp_path / "src"
    paths = make_bad_and_quirky_tree(src)
    manifest = convert(src, tmp_path / "out", split="train", samples_per_shard=4, progress=False)
    rejected = {r["path"]: r["reason"] for r in manifest.rejected}
    assert rejected.keys() == {"n00000001/empty.JPEG", "n00000001/truncated.JPEG", "n00000001/notes.txt",
                               "stray.JPEG"}
    assert rejected["n00000001/empty.JPEG"] == "zero-byte file"
    assert rejected["n00000001/truncated.JPEG"].startswith("truncated JPEG")
    assert rejected["n00000001/notes.txt"].startswith("not an image")
    assert rejected["stray.JPEG"] == "not inside a class folder"
    assert manifest.discovered == 11 == manifest.num_samples + len(manifest.rejected)
    assert manifest.num_samples == 7 and manifest.converted == 4

    samples = read_back(tmp_path / "out", "train")
    for name in ("rgb.JPEG", "progressive.JPEG"):  # valid RGB JPEGs pass through byte-identical
        assert samples[f"n00000001/{name}"]["jpg"] == paths[name].read_bytes()
        assert samples[f"n00000001/{name}"]["meta"]["converted"] is None
    for name, reason in (("cmyk.JPEG", "CMYK JPEG"), ("gray.JPEG", "L JPEG"), ("png_named.JPEG", "PNG source"),
                         ("rotated.JPEG", "EXIF orientation")):
        sample = samples[f"n00000001/{name}"]
        assert sample["meta"]["converted"] == reason
        img = Image.open(io.BytesIO(sample["jpg"]))
        assert (img.format, img.mode) == ("JPEG", "RGB")
    rotated = Image.open(io.BytesIO(samples["n00000001/rotated.JPEG"]["jpg"]))
    assert rotated.size == (20, 40)  # orientation 6 applied: pixels upright, tag gone
    assert rotated.getexif().get(0x0112) is None
    assert samples["n00000002/other.JPEG"]["cls"] == 1
    problems, _ = verify(tmp_path / "out", decode=True, workers=1)
    assert problems == []


def test_strict_stops_at_first_bad_file_naming_it(tmp_path):
    src = tmp_path / "src"
    make_bad_and_quirky_tree(src)
    (src / "stray.JPEG").unlink()
    # samples are shuffled, so which bad file comes first depends on the seed; the message names it
    with pytest.raises(ValueError, match=r"/n00000001/(empty|truncated)\.JPEG: .* \(--strict\)|notes\.txt: not an"):
        convert(src, tmp_path / "out", split="train", samples_per_shard=100, strict=True, progress=False)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_max_size_shrinks_and_reencodes(tmp_path):
    src = tmp_path / "src" / "n00000001"
    src.mkdir(parents=True)
    Image.new("RGB", (300, 120), (10, 200, 30)).save(src / "big.JPEG")
    Image.new("RGB", (80, 60), (10, 200, 30)).save(src / "small.JPEG")
    manifest = convert(tmp_path / "src", tmp_path / "out", split="train", max_size=100, quality=80, progress=False)
    samples = read_back(tmp_path / "out", "train")
    assert Image.open(io.BytesIO(samples["n00000001/big.JPEG"]["jpg"])).size == (100, 40)
    assert samples["n00000001/small.JPEG"]["jpg"] == (src / "small.JPEG").read_bytes()
    assert manifest.converted == 1 and manifest.options["max_size"] == 100


def test_kaggle_flat_val_with_csv_and_names(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    convert(tiny_imagenet / "train", out, split="train", samples_per_shard=64, progress=False)
    flat = tmp_path / "flat_val"
    flat.mkdir()
    rows = ["ImageId,PredictionString"]
    for i, path in enumerate(sorted((tiny_imagenet / "val").rglob("*.JPEG"))):
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        (flat / f"{image_id}.JPEG").write_bytes(path.read_bytes())
        rows.append(f"{image_id},{path.parent.name} 1 2 30 40 {path.parent.name} 5 6 7 8")
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("".join(f"{w} class number {i}, a name\n" for i, w in enumerate(TINY_CLASSES)))

    manifest = convert(flat, out, split="val", labels_csv=csv_path, names_file=names, progress=False)
    assert manifest.num_samples == 25 and manifest.wnids == TINY_CLASSES
    assert manifest.classes[2]["name"] == "class number 2, a name"
    # converted after a train split that had names, val keeps them without --names
    named = tmp_path / "named"
    convert(tiny_imagenet / "train", named, split="train", names_file=names, progress=False)
    assert convert(flat, named, split="val", labels_csv=csv_path, progress=False).classes == manifest.classes
    by_source = {}
    for path in sorted((tiny_imagenet / "val").rglob("*.JPEG")):
        by_source[path.read_bytes()] = TINY_CLASSES.index(path.parent.name)
    for sample in read_back(out, "val").values():
        assert sample["cls"] == by_source[sample["jpg"]]

    (flat / "ILSVRC2012_val_99999999.JPEG").write_bytes(b"x")
    with pytest.raises(ValueError, match="ILSVRC2012_val_99999999.JPEG is absent from"):
        convert(flat, tmp_path / "out2", split="val", labels_csv=csv_path, progress=False)


def test_clear_errors_for_bad_sources(tiny_imagenet, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist does not exist"):
        convert(tmp_path / "does-not-exist", tmp_path / "out", split="train", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        convert(tmp_path / "empty", tmp_path / "out", split="train", progress=False)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(TINY_CLASSES[:4]) + "\n")
    with pytest.raises(ValueError, match="class n00000005 .* is not in --classes"):
        convert(tiny_imagenet / "val", tmp_path / "out", split="val", classes_file=classes, progress=False)
    with pytest.raises(ValueError, match="--job-index 3"):
        convert(tiny_imagenet / "val", tmp_path / "out", split="val", num_jobs=2, job_index=3, progress=False)
    with pytest.raises(ValueError, match="--shard-size 'lots'"):
        parse_size("lots")
    assert parse_size("512MB") == 512_000_000 and parse_size("1GiB") == 2**30
    with pytest.raises(FileNotFoundError, match="plan.json not found"):
        write_manifest(tmp_path / "nothing", "train")


def test_keys_are_safe_and_unique(tmp_path):
    src = tmp_path / "src"
    for folder in ("n00000001", "n00000002"):
        (src / folder).mkdir(parents=True)
    payload = Image.new("RGB", (8, 8))
    for rel in ("n00000001/a b.c.JPEG", "n00000002/a b.c.JPEG", "n00000001/a_b-2.JPEG", "n00000001/../x.JPEG"):
        payload.save(src / rel, format="JPEG")
    manifest = convert(src, tmp_path / "out", split="train", progress=False)
    tar, _ = shard_files(tmp_path / "out", manifest)[0]
    names = subprocess.run(["tar", "-tf", str(tar)], check=True, capture_output=True, text=True).stdout.split()
    keys = sorted({n.split(".")[0] for n in names})
    assert keys == ["a_b", "a_b-2", "a_b-3"]  # the second "a b.c" takes the next free suffix
    assert [r["path"] for r in manifest.rejected] == ["x.JPEG"]  # "../x" left its class folder
    assert all("/" not in n and n.count(".") == 1 for n in names)
    assert sample_key("../../etc/passwd") == "passwd" and sample_key("\x00\x1b.JPEG") == "sample"


def test_verify_finds_corruption_and_cli_exits_nonzero(tiny_imagenet, tmp_path, capsys):
    out = tmp_path / "out"
    convert(tiny_imagenet / "val", out, split="val", samples_per_shard=8, progress=False)
    assert cli(["shards", "verify", str(out), "--decode", "--workers", "1"]) == 0
    assert "images/s per core" in capsys.readouterr().out
    tar = out / "val-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # inside the first JPEG's payload
    tar.write_bytes(bytes(data))
    problems, _ = verify(out, workers=1)
    assert any("val-000001.tar: sha256" in p for p in problems)
    (out / "val-000002.idx").write_text("v1.2 0\n")
    assert cli(["shards", "verify", str(out), "--workers", "1"]) == 1
    printed = capsys.readouterr().out
    assert "val-000002.idx: does not match" in printed and "\nFAILED (2 problems): " in printed


def test_cli_convert_end_to_end(tmp_path):
    src = write_tree(tmp_path / "src", train_per_class=2, val_per_class=1)
    out = tmp_path / "out"
    assert cli(["shards", "convert", str(src / "train"), str(out), "--split", "train", "--shard-size", "20KB",
                "--workers", "1", "--no-progress"]) == 0
    manifest = load_manifest(out, "train")
    assert manifest.num_samples == 10 and len(manifest.shards) > 1
    assert cli(["shards", "convert", str(tmp_path / "missing"), str(out), "--split", "val"]) == 2


def test_no_progress_hides_only_the_bar(tmp_path, capsys):
    """`shards convert --no-progress` printed nothing at all: the summary, the rejected files and "other jobs'
    shards are still missing" were behind the progress switch, so a Slurm log never showed a rejection."""
    src = write_tree(tmp_path / "src", train_per_class=2, val_per_class=0)
    (src / "train" / "n00000001" / "empty.JPEG").write_bytes(b"")
    out = tmp_path / "out"
    base = ["shards", "convert", str(src / "train"), str(out), "--split", "train", "--samples-per-shard", "4",
            "--workers", "1", "--no-progress"]
    assert cli([*base, "--num-jobs", "2", "--job-index", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""  # no bar
    assert "train: job 2/2 wrote 1 of 1 shards" in printed.out
    assert "train: other jobs' shards are still missing" in printed.out
    assert cli([*base, "--num-jobs", "2", "--job-index", "0"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert "train: 10 samples in 3 shards, 0 converted, 1 rejected of 11 discovered, 5 classes" in printed.out
    assert "  rejected n00000001/empty.JPEG: " in printed.out


@pytest.mark.parametrize("name,size", [("n01440764_10026.jpg", 81354), ("k.cls", 6), ("x" * 95 + ".json", 0)])
def test_fast_ustar_header_equals_tarfile(name, size):
    import tarfile

    from shards.tarshard import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert ustar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)
    with pytest.raises(ValueError, match="longer than ustar's 100 bytes"):
        ustar_header("y" * 101, 1)


def test_failed_commit_reports_the_real_error(tmp_path):
    """A commit that fails (here: the index's folder is gone) surfaces that error, not a double-close EBADF."""
    from shards.tarshard import ShardWriter

    writer = ShardWriter(tmp_path / "a.tar", tmp_path / "gone" / "a.idx")
    writer.add_sample("k", [(IMAGE_EXT, b"x" * 10)])
    with pytest.raises(FileNotFoundError):
        try:
            writer.commit()
        finally:
            writer.abort()
    assert not list(tmp_path.glob("*.partial"))
