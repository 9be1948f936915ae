"""A real learning test: scikit-learn's bundled handwritten digits (no download) as JPEG class folders ->
shards.convert -> DALI CPU with TrivialAugmentWide -> the trainer with an EMA of the weights, to >= 95% val
top-1 for both, with labels checked through the whole chain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DIGIT_SIDE = 32  # pixels; the 8x8 digits are upscaled to this
VAL_EVERY = 5  # every 5th digit goes to val: 360 of 1797


def write_digit_folders(root: Path) -> dict[str, dict[str, int]]:
    """root/{train,val}/d<k>/<n>.JPEG; returns {split: {file stem: digit}} to check labels against."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    truth: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for n, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        split = "val" if n % VAL_EVERY == 0 else "train"
        pixels = (image * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 8-bit grey
        picture = Image.fromarray(pixels, "L").resize((DIGIT_SIDE, DIGIT_SIDE), Image.BICUBIC).convert("RGB")
        folder = root / split / f"d{target}"
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"digit{n:04d}.JPEG", quality=95)
        truth[split][f"digit{n:04d}"] = int(target)
    return truth


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> tuple[Path, dict]:
    from shards.convert import convert

    root = tmp_path_factory.mktemp("digits")
    truth = write_digit_folders(root / "folders")
    out = root / "shards"
    for split in ("train", "val"):
        convert(root / "folders" / split, out, split=split, samples_per_shard=256, seed=0, workers=1,
                progress=False)
    return out, truth


def test_digit_labels_survive_shards_and_dali(digit_shards):
    """Every val sample comes out of the dali-cpu loader once, with the class index of its folder d<k>."""
    from pipeline import build_loader
    from shards.schema import load_manifest

    shards, truth = digit_shards
    manifest = load_manifest(shards, "val")
    assert manifest.wnids == [f"d{k}" for k in range(10)]
    loader = build_loader(shards, "val", train=False, batch_size=64, image_size=DIGIT_SIDE, backend="dali-cpu",
                          num_threads=1, with_keys=True)
    seen = {}
    for _images, labels, keys in loader:
        seen.update(zip(keys, labels.tolist(), strict=True))
    loader.close()
    assert seen == truth["val"]


@pytest.mark.slow
def test_resnet18_learns_digits_to_95_percent_with_trivialaugment_and_ema(digit_shards, tmp_path):
    from training.config import build_config
    from training.train import train

    shards, truth = digit_shards
    config = build_config(overrides=dict(
        data=str(shards), backend="dali-cpu", arch="resnet18", image_size=DIGIT_SIDE,
        # 8x8-derived digits fill the frame: an ImageNet-style 8% crop often keeps no digit at all, so the crop
        # keeps at least half the image (the flip stays: the pipeline's train graph always flips)
        crop_area=(0.5, 1.0),
        # the policy in the DALI graph (conditionals on); its shifts of up to 32 px are the whole 32 px digit,
        # so it needs 12 epochs where rrc-flip alone reaches 97% in 8. Over seeds 0, 1, 2: 96.9, 97.2, 95.8%
        # (EMA 97.2, 97.2, 95.8%).
        augment="trivialaugment", ema_decay=0.98,  # the EMA spans ~50 of the 528 steps
        precision="fp32",  # bf16 autocast on CPU is emulated and slow
        batch_size=32, base_lr=0.8, warmup_epochs=1, epochs=12,  # peak LR 0.1, 44 steps/epoch
        num_threads=1, log_every=11, throughput_warmup_steps=11, eval_every=6,
        run_dir=str(tmp_path / "run"), progress=False, checkpoint_minutes=0,
    ))
    summary = train(config)
    final = summary["final_eval"]
    assert final["total"] == len(truth["val"]) == 360
    assert final["top1"] >= 95.0, final
    assert final["ema_top1"] >= 95.0 and summary["final_ema_top1"] == final["ema_top1"], final
    # the files a user reads after a run
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["final_top1"] == final["top1"]
    assert on_disk["config"]["crop_area"] == [0.5, 1.0] and on_disk["config"]["augment"] == "trivialaugment"
    assert on_disk["best_ema_top1"] >= on_disk["final_ema_top1"]
    assert (run / "curves.png").stat().st_size > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [6, 12] and all(0 <= r["ema_top5"] <= 100 for r in evals)
    steps_per_epoch = (1797 - 360) // 32
    assert records[-1]["step"] == summary["steps"] == 12 * steps_per_epoch
    assert summary["best_top1"] >= final["top1"]
