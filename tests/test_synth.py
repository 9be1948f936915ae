"""`saturate synth`: layout, determinism, quirks that really are quirks, Kaggle val, ImageNet-like sizes."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from tools import synth, synth_cmd, synth_image

WNID = re.compile(r"^n\d{8}$")
SMALL = dict(classes=3, train_per_class=4, val_per_class=2, quirks=True, seed=1, scale=0.25, progress=False)


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def synth_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saturate")
    synth_cmd.register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "imagenet"
    return out, synth.generate(out, workers=2, **SMALL)


def test_layout_and_counts(small_tree):
    out, summary = small_tree
    mapping = [line.split(" ", 1) for line in (out / synth.SYNSET_MAPPING).read_text().splitlines()]
    wnids = [wnid for wnid, _ in mapping]
    assert len(wnids) == 3 and wnids == sorted(set(wnids)) and all(WNID.match(w) for w in wnids)
    assert all(name.strip() for _, name in mapping)
    for split, per_class in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == wnids
        for wnid in wnids:
            names = sorted(p.name for p in (out / split / wnid).iterdir())
            assert names == sorted(f"{wnid}_{n}.JPEG" for n in range(1, per_class + 1))
    assert sorted(p.name for p in out.iterdir()) == sorted(["train", "val", synth.SYNSET_MAPPING, synth.SYNTH_JSON])
    assert (summary["images"], summary["train_images"], summary["val_images"]) == (18, 12, 6)

    record = json.loads((out / synth.SYNTH_JSON).read_text())
    assert record["parameters"] == {"classes": 3, "train_per_class": 4, "val_per_class": 2, "quirks": True,
                                    "kaggle_val": False, "seed": 1, "scale": 0.25}
    # The summary is measured from the files themselves (stored size, file bytes).
    files = sorted(out.glob("*/*/*.JPEG"))
    assert len(files) == 18
    sizes = [Image.open(f).size for f in files]
    assert record["summary"]["mean_bytes"] == pytest.approx(np.mean([f.stat().st_size for f in files]))
    assert record["summary"]["mean_width"] == pytest.approx(np.mean([w for w, _ in sizes]))
    assert record["summary"]["mean_height"] == pytest.approx(np.mean([h for _, h in sizes]))


def test_same_arguments_give_identical_bytes_whatever_the_workers(small_tree, tmp_path):
    out, _ = small_tree
    again = synth.generate(tmp_path / "again", workers=1, **SMALL)
    assert again["workers"] == 1
    assert tree_digest(tmp_path / "again") == tree_digest(out)


def test_different_seed_differs(small_tree, tmp_path):
    out, _ = small_tree
    synth.generate(tmp_path / "other", workers=1, **{**SMALL, "seed": 2})
    first, other = tree_digest(out), tree_digest(tmp_path / "other")
    assert len(other) == len(first)
    images = [d for name, d in first.items() if name.endswith(".JPEG")]
    assert not set(images) & {d for name, d in other.items() if name.endswith(".JPEG")}
    assert (tmp_path / "other" / synth.SYNSET_MAPPING).read_text() != (out / synth.SYNSET_MAPPING).read_text()


def test_every_quirk_exists_and_has_its_property(small_tree):
    out, summary = small_tree
    quirks = json.loads((out / synth.SYNTH_JSON).read_text())["quirks"]
    assert sorted(quirks) == sorted(synth.QUIRK_KINDS)
    for kind, paths in quirks.items():
        # One per kind per split here (12 train and 6 val images, ~1% rounds up to one).
        assert [p.split("/")[0] for p in paths] == ["train", "val"], kind
        assert summary["quirks"][kind] == 2
        for path in paths:
            with Image.open(out / path) as img:
                assert path.endswith(".JPEG")
                if kind == "cmyk":
                    assert (img.format, img.mode) == ("JPEG", "CMYK")
                elif kind == "grayscale":
                    assert (img.format, img.mode) == ("JPEG", "L")
                elif kind == "png":
                    assert img.format == "PNG" and img.mode == "RGB"
                elif kind == "progressive":
                    assert img.format == "JPEG" and img.info.get("progressive") == 1
                elif kind == "exif_rotated":
                    assert img.format == "JPEG" and img.getexif().get(synth_image.EXIF_ORIENTATION_TAG) in (6, 8)
                    assert ImageOps.exif_transpose(img).size == img.size[::-1]
    quirky = {p for paths in quirks.values() for p in paths}
    plain = [f for f in sorted(out.glob("*/*/*.JPEG")) if str(f.relative_to(out)) not in quirky]
    assert len(plain) == 18 - 10
    for f in plain:
        with Image.open(f) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")
            assert "progressive" not in img.info and synth_image.EXIF_ORIENTATION_TAG not in img.getexif()


def test_quirk_share_is_one_percent_per_kind():
    quirks = synth.assign_quirks(0, "train", 1000)
    assert {kind: quirks.count(kind) for kind in synth.QUIRK_KINDS} == dict.fromkeys(synth.QUIRK_KINDS, 10)
    assert quirks.count(None) == 950
    assert synth.assign_quirks(0, "train", 1000) == quirks  # deterministic
    assert synth.assign_quirks(0, "val", 3).count(None) == 0  # fewer images than kinds: as many as fit


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_box_maps_to_the_stored_pixels(orientation):
    """The Kaggle box of an EXIF-rotated image is given in the stored (unrotated) pixels' frame."""
    width, height, box = 40, 30, (5, 7, 18, 12)
    upright = Image.new("L", (width, height), 0)
    upright.paste(255, box)
    stored = upright.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    x0, y0, x1, y1 = synth_image.stored_box(box, width, height, orientation)
    pixels = np.asarray(stored)
    assert pixels[y0:y1, x0:x1].min() == 255 and pixels.sum() == 255 * (x1 - x0) * (y1 - y0)


def test_kaggle_val_layout(tmp_path):
    out = tmp_path / "kaggle"
    synth.generate(out, classes=3, train_per_class=2, val_per_class=3, kaggle_val=True, quirks=True, seed=0,
                   scale=0.25, workers=1, progress=False)
    wnids = [line.split()[0] for line in (out / synth.SYNSET_MAPPING).read_text().splitlines()]
    files = sorted(p.name for p in (out / "val").iterdir())
    assert files == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 10)]
    with open(out / synth.VAL_SOLUTION, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "PredictionString"]
    assert [r[0] for r in rows[1:]] == [name[: -len(".JPEG")] for name in files]
    labels = []
    for image_id, prediction in rows[1:]:
        wnid, *box = prediction.split()
        assert wnid in wnids and len(box) == 4
        x0, y0, x1, y1 = map(int, box)
        with Image.open(out / "val" / f"{image_id}.JPEG") as img:
            assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
        labels.append(wnid)
    assert sorted(labels) == sorted(wnids * 3)
    assert sorted(p.name for p in (out / "train").iterdir()) == wnids


def test_scale_one_looks_like_imagenet(tmp_path):
    """Property, not timing: at scale 1, file sizes and image sizes land near ImageNet's."""
    summary = synth.generate(tmp_path / "full", classes=2, train_per_class=15, val_per_class=0, seed=0,
                             workers=2, progress=False)
    assert summary["images"] == 30
    assert 60_000 <= summary["mean_bytes"] <= 180_000
    assert 340 <= summary["mean_width"] <= 460 and 300 <= summary["mean_height"] <= 400
    qualities = []
    for f in sorted((tmp_path / "full").glob("train/*/*.JPEG")):
        with Image.open(f) as img:
            assert 200 <= min(img.size) and max(img.size) <= 1500
            # DC step of libjpeg's luminance table: 16 * (200 - 2q) / 100, so 8 at q=75 and 2 at q=95
            qualities.append(img.quantization[0][0])
    assert 2 <= min(qualities) and max(qualities) <= 8 and len(set(qualities)) > 1


def test_image_size_distribution_is_imagenet_like():
    rng = np.random.default_rng(0)
    sizes = np.array([synth_image.image_size(rng, 1.0) for _ in range(5000)])
    shorter, longer = sizes.min(axis=1), sizes.max(axis=1)
    assert abs(sizes[:, 0].mean() - 400) < 20 and abs(sizes[:, 1].mean() - 350) < 20
    assert 0.8 <= np.mean((shorter >= 300) & (shorter <= 500)) <= 0.95
    assert 0.01 <= np.mean(longer > 700) <= 0.06 and longer.max() <= 1500
    half = np.array([synth_image.image_size(np.random.default_rng(i), 0.25) for i in range(200)])
    full = np.array([synth_image.image_size(np.random.default_rng(i), 1.0) for i in range(200)])
    assert np.abs(half - np.round(full * 0.25)).max() <= 1


def test_classes_are_separable(tmp_path):
    """Each class has its own look: nearest class centroid of a 64-bin colour histogram already tells val
    images apart (a CNN also gets stripe orientation, frequency and shape kind)."""
    out = tmp_path / "learn"
    synth.generate(out, classes=6, train_per_class=10, val_per_class=5, seed=3, scale=0.25, workers=2,
                   progress=False)

    def histograms(split):
        xs, ys = [], []
        for label, folder in enumerate(sorted((out / split).iterdir())):
            for f in sorted(folder.iterdir()):
                with Image.open(f) as img:
                    bins = np.asarray(img.convert("RGB"), np.int64) // 64  # 4 levels per channel
                index = (bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).ravel()
                xs.append(np.bincount(index, minlength=64) / index.size)
                ys.append(label)
        return np.stack(xs), np.array(ys)

    train_x, train_y = histograms("train")
    val_x, val_y = histograms("val")
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(6)])
    predicted = np.argmin(((val_x[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert np.mean(predicted == val_y) >= 0.9  # chance is 1/6


def test_bad_values_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="--classes must be a positive integer, got 0"):
        synth.generate(tmp_path / "a", classes=0, train_per_class=1, val_per_class=1)
    with pytest.raises(ValueError, match="--scale"):
        synth.generate(tmp_path / "a", classes=1, train_per_class=1, val_per_class=1, scale=0)
    with pytest.raises(ValueError, match="--quirks needs at least 5 train images"):
        synth.generate(tmp_path / "a", classes=2, train_per_class=2, val_per_class=0, quirks=True)
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as exit_info:
        synth_parser().parse_args(["synth", str(tmp_path / "a"), "--classes", "0", "--train-per-class", "1",
                                   "--val-per-class", "1"])
    assert exit_info.value.code == 2
    assert "argument --classes: must be a positive integer, got 0" in capsys.readouterr().err


def test_non_empty_out_is_refused_unless_overwrite(tmp_path):
    args = dict(classes=2, train_per_class=2, val_per_class=1, scale=0.25, workers=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(synth.OutputNotEmptyError, match="is not empty; pick an empty directory or pass --overwrite"):
        synth.generate(foreign, **args)
    with pytest.raises(ValueError, match="no synth.json"):  # --overwrite never deletes what synth did not write
        synth.generate(foreign, overwrite=True, **args)
    assert (foreign / "keep.txt").read_text() == "not ours"

    out = tmp_path / "ours"
    synth.generate(out, **{**args, "classes": 3})
    with pytest.raises(ValueError, match=str(out)):
        synth.generate(out, **args)
    synth.generate(out, overwrite=True, **args)  # fewer classes: nothing stale may remain
    assert len(list(out.glob("train/*/*.JPEG"))) == 4 and len(list(out.glob("val/*/*.JPEG"))) == 2


def test_cli_prints_one_line_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    args = synth_parser().parse_args(["synth", str(out), "--classes", "2", "--train-per-class", "3",
                                      "--val-per-class", "1", "--scale", "0.25", "--workers", "1",
                                      "--no-progress", "--kaggle-val"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert re.match(r"synth: 8 images \(6 train, 2 val, 2 classes\) in .*, mean [\d.]+ KB, mean \d+x\d+ px", lines[0])
    assert (out / synth.VAL_SOLUTION).is_file()


def test_progressive_quirk_encodes_grainy_large_images():
    """Pillow's default progressive buffer (width*height bytes) is too small for noisy high-quality images."""
    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    for seed in range(4):  # several draws of quality/subsampling, 4:4:4 at q95 among them
        data, size, orientation = synth_image.encode(Image.fromarray(noise), np.random.default_rng(seed), "progressive")
        with Image.open(io.BytesIO(data)) as img:
            assert img.info.get("progressive") and img.size == size == (800, 600) and orientation == 1
            img.load()
