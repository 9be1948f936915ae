"""What only a GPU can show: the dali-gpu loader resumes exactly, feeds torch.compile, fp16 with its GradScaler,
progressive resizing and ImageNet-size batches; a damaged JPEG stops the GPU decoder with a named error; the
training step makes no host synchronisation. All marked `gpu`: they skip cleanly without CUDA (conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_pipeline import _overwrite_image, loader, take
from test_train_loop import final_checkpoint, tiny_config

from pipeline import ShardReadError, build_loader
from training.train import train

pytestmark = pytest.mark.gpu


def test_dali_gpu_resume_continues_at_the_next_sample(tiny_shards):
    """A dali-gpu state taken after k batches continues with exactly the batches an uninterrupted run yields
    (keys, labels, pixels), across the epoch boundary."""
    kwargs = dict(batch_size=4, seed=3, rank=1, world_size=2, with_keys=True)
    reference = loader(tiny_shards, "train", "dali-gpu", **kwargs)
    per_epoch = len(reference)
    want = take(reference, 2 * per_epoch)
    for k in (1, per_epoch, per_epoch + 1):
        first = loader(tiny_shards, "train", "dali-gpu", **kwargs)
        got = take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        got += take(loader(tiny_shards, "train", "dali-gpu", state=state, **kwargs), 2 * per_epoch - k)
        for a, b in zip(got, want, strict=True):
            assert a[2] == b[2] and torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def test_damaged_jpeg_stops_the_gpu_decoder_naming_shard_and_sample(tiny_shards, tmp_path):
    import shutil

    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    key = _overwrite_image(shards, "val-000001.tar", 2)
    with pytest.raises(ShardReadError, match=rf"val-000001\.tar.*{key}"):
        for _ in loader(shards, "val", "dali-gpu"):
            pass


def test_imagenet_size_images_at_batch_256(tmp_path):
    """`saturate synth` ImageNet-shaped JPEGs (~400x350, ~110 KB) through dali-gpu at 224 px, batch 256."""
    from shards.convert import convert
    from tools.synth import generate

    generate(tmp_path / "imagenet", classes=4, train_per_class=80, val_per_class=0, seed=0, progress=False)
    convert(tmp_path / "imagenet" / "train", tmp_path / "shards", split="train", workers=4, progress=False)
    ldr = build_loader(tmp_path / "shards", "train", train=True, batch_size=256, image_size=224,
                       backend="dali-gpu", num_threads=4)
    images, labels = next(iter(ldr))
    assert images.shape == (256, 3, 224, 224) and images.dtype == torch.float16 and images.is_cuda
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (256,) and 0 <= int(labels.min()) <= int(labels.max()) < 4
    assert -3 < float(images.float().mean()) < 3  # normalised, not raw 0-255 pixels


@pytest.mark.parametrize("precision, compile_model", [("bf16", True), ("fp16", False)])
def test_dali_gpu_feeds_compiled_and_fp16_training_with_progressive_resizing(tiny_shards, tmp_path, precision,
                                                                              compile_model):
    """Epoch 0 at 32 px, epoch 1 at 64 px: the loader is rebuilt on the GPU, compile recompiles, the fp16
    GradScaler keeps a finite scale, evaluation and checkpoints run."""
    config = tiny_config(tiny_shards, tmp_path / "run", backend="dali-gpu", precision=precision,
                         compile=compile_model, deterministic=False, epochs=2, min_res=32, image_size=64,
                         start_ramp=0, end_ramp=1, val_image_size=64)
    summary = train(config)
    assert summary["steps"] == 2 * (60 // 8) and summary["final_eval"]["total"] == 25
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["image_size"] for r in records if r["kind"] == "train"} == {32, 64}
    ckpt = final_checkpoint(tmp_path / "run")
    if precision == "fp16":
        assert ckpt["scaler"] and 0 < ckpt["scaler"]["scale"] < float("inf")
    else:
        assert ckpt["scaler"] == {}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_steps_make_no_host_sync(tiny_shards, precision):
    """The hot loop between log steps (next batch, copy, TrainStep, loss accumulation) under
    torch.cuda.set_sync_debug_mode("error"): any .item(), .cpu(), synchronize() or host-read raises."""
    from training.model import build_model
    from training.optim import build_optimizer, build_scheduler
    from training.step import TrainStep

    device = torch.device("cuda", torch.cuda.current_device())
    model = build_model("resnet18", num_classes=5).to(device)
    optimizer = build_optimizer(model, lr=0.1)
    scheduler = build_scheduler(optimizer, steps_per_epoch=7, epochs=2, warmup_epochs=1)
    step = TrainStep(model, optimizer, precision=precision, scheduler=scheduler)
    batches = iter(loader(tiny_shards, "train", "dali-gpu", batch_size=8))
    loss_sum = torch.zeros((), device=device)
    for _ in range(2):  # warm-up: cuDNN autotuning and allocator growth may sync
        images, labels = next(batches)
        loss_sum += step(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss_sum += step(images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss_sum).item()
