"""The input pipelines on CPU: DALI's CPU operators (`dali-cpu`), the PyTorch/Pillow baseline and the
synthetic backend, on the session's `tiny_shards` (train 60 samples in 8 shards, val 25 in 4).

Sample identity comes from the `with_keys=True` backend option (batches are then (images, labels, keys)).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, TINY_VAL_PER_CLASS
from PIL import Image

from pipeline import BACKENDS, LoaderOptionError, ShardReadError, build_loader, constants
from shards.schema import IMAGE_EXT, LABEL_EXT, META_EXT, decode_label, load_manifest, parse_index

SIZE = 48  # pixels: small enough to be fast, below every tiny image's shorter side (64..120)
READERS = ("dali-cpu", "pytorch")
# pytorch: 2 worker processes, so the worker slicing and the round-robin resume are exercised
THREADS = {"dali-cpu": 1, "pytorch": 2}


def loader(shards, split, backend, **kwargs):
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("image_size", SIZE)
    kwargs.setdefault("num_threads", THREADS.get(backend, 1))
    kwargs.setdefault("train", split == "train")
    return build_loader(shards, split, backend=backend, **kwargs)


def read_split(shards: Path, split: str) -> dict[str, dict]:
    """key -> {"label", "jpg"} read back from the tars with tarfile, every label checked three ways:
    the .cls member, the .json member and the manifest's index of the folder (wnid) the image came from."""
    manifest = load_manifest(shards, split)
    index_of = {c["wnid"]: c["index"] for c in manifest.classes}
    samples: dict[str, dict] = {}
    for record in manifest.shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shards / record.name) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, m in members.items():
            label = decode_label(m[LABEL_EXT])
            meta = json.loads(m[META_EXT])
            assert meta["label"] == label == index_of[Path(meta["path"]).parent.name]
            samples[key] = {"label": label, "jpg": m[IMAGE_EXT]}
    assert len(samples) == manifest.num_samples
    return samples


def epoch(ldr):
    """One pass: (images, labels, keys) per batch, cloned so later batches cannot overwrite them."""
    return [(x.clone(), y.clone(), list(k)) for x, y, k in ldr]


def pil_val_reference(jpg: bytes, size: int) -> np.ndarray:
    """Val preprocessing with Pillow alone: decode, shorter side to size/0.875 (Pillow's bilinear, which is
    antialiased when it shrinks), centre crop, ImageNet normalisation -> float32 (3, H, W)."""
    image = Image.open(io.BytesIO(jpg)).convert("RGB")
    width, height = constants.val_resized_shape(image.width, image.height, size)
    image = image.resize((width, height), Image.BILINEAR)
    left, top = constants.centre_crop_offset(width, size), constants.centre_crop_offset(height, size)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / constants.PIXEL_MAX
    return ((pixels - constants.IMAGENET_MEAN) / constants.IMAGENET_STD).transpose(2, 0, 1)


# --- shapes, layout, labels ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize(("split", "order"), [("train", "sample"), ("train", "shard"), ("val", None)])
def test_batches_are_fp16_channels_last_with_exact_labels(tiny_shards, backend, split, order):
    truth = read_split(tiny_shards, split)
    ldr = loader(tiny_shards, split, backend, with_keys=True, order=order)
    assert ldr.device == torch.device("cpu") and ldr.num_classes == 5
    batches = epoch(ldr)
    assert len(batches) == len(ldr)
    for images, labels, keys in batches:
        assert images.dtype == torch.float16 and labels.dtype == torch.int64
        assert images.shape == (len(keys), 3, SIZE, SIZE) and labels.shape == (len(keys),)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert images.device == labels.device == torch.device("cpu")
        assert labels.tolist() == [truth[k]["label"] for k in keys]
    keys = [k for _, _, ks in batches for k in ks]
    assert len(set(keys)) == len(keys)
    if split == "val":
        assert sorted(keys) == sorted(truth) and ldr.num_samples == 25 and len(ldr) == 4
    else:  # 60 samples: every full batch of 8, the last partial batch dropped
        assert len(keys) == ldr.num_samples and all(len(ks) == 8 for _, _, ks in batches)
        # sample order: 60 // 8 on every backend; shard order on pytorch: 2 workers x 30 samples -> 2 x 3
        assert len(ldr) == (7 if backend == "dali-cpu" or order == "sample" else 6)


@pytest.mark.parametrize("backend", READERS)
def test_val_matches_a_pillow_reference(tiny_shards, backend):
    """Mean absolute error per image against decode+resize+centre-crop+normalise done with Pillow alone, in
    normalised units (1.0 = one standard deviation = about 57 grey levels). The pytorch backend *is* Pillow:
    only float16 rounding (half an ulp, < 0.002 here) separates them. DALI decodes with libjpeg-turbo too
    but resizes with its own antialiased linear filter and rounds its 8-bit result: on these images the
    mean error is 0.003-0.008 (under half a grey level), so 0.02 (about one grey level) is the bound. Every
    real mistake is far above it: a one-pixel crop shift on these noisy images gives ~0.07, a flip ~0.3,
    swapped channels or a wrong mean/std > 0.5. Output geometry (resized size, crop offset) follows one
    rule for all backends (constants.val_resized_shape, centre_crop_offset)."""
    truth = read_split(tiny_shards, "val")
    tolerance = {"pytorch": 0.002, "dali-cpu": 0.02}[backend]
    errors = []
    for images, _, keys in epoch(loader(tiny_shards, "val", backend, with_keys=True)):
        for image, key in zip(images, keys, strict=True):
            errors.append(np.abs(image.float().numpy() - pil_val_reference(truth[key]["jpg"], SIZE)).mean())
    assert len(errors) == 25
    assert max(errors) < tolerance, f"worst mean abs error {max(errors):.4f}"


# --- augmentation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", READERS)
def test_train_flips_half_the_images(tiny_shards, backend):
    """Every tiny image brightens left to right (+50 grey levels across); a flipped crop darkens instead.
    Over 4 epochs (224 or 192 crops) the flip count must lie within 4.5 sigma of Binomial(n, 0.5)."""
    ldr = loader(tiny_shards, "train", backend, crop_area=(0.25, 1.0))
    flipped = total = 0
    for _ in range(4):
        for images, _ in ldr:
            profile = images.float().mean(dim=(1, 2))  # (N, W): brightness per column
            half = SIZE // 2
            flipped += int((profile[:, half:].mean(1) < profile[:, :half].mean(1)).sum())
            total += len(images)
    assert abs(flipped - total / 2) < 4.5 * math.sqrt(total / 4), (flipped, total)


@pytest.mark.parametrize("backend", READERS)
def test_same_seed_same_batches_other_seed_other_batches(tiny_shards, backend):
    first = epoch(loader(tiny_shards, "train", backend, seed=7, with_keys=True))
    again = epoch(loader(tiny_shards, "train", backend, seed=7, with_keys=True))
    other = epoch(loader(tiny_shards, "train", backend, seed=8, with_keys=True))
    assert [k for *_, k in first] == [k for *_, k in again]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert [k for *_, k in first] != [k for *_, k in other]


@pytest.mark.parametrize("backend", READERS)
def test_train_epochs_reshuffle(tiny_shards, backend):
    ldr = loader(tiny_shards, "train", backend, with_keys=True)
    one, two = ([k for *_, ks in epoch(ldr) for k in ks] for _ in range(2))
    assert one != two
    assert ldr.epoch == 2


# --- sharding across ranks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_sees_every_sample_exactly_once_across_ranks(tiny_shards, backend, world_size):
    truth = read_split(tiny_shards, "val")
    seen, shares = [], []
    for rank in range(world_size):
        ldr = loader(tiny_shards, "val", backend, batch_size=4, rank=rank, world_size=world_size, with_keys=True)
        keys = [k for *_, ks in epoch(ldr) for k in ks]
        assert len(keys) == ldr.num_samples
        assert [k for *_, ks in epoch(ldr) for k in ks] == keys  # the next epoch: the same share again
        seen += keys
        shares.append(ldr.num_samples)
    assert sorted(seen) == sorted(truth)  # union is everything, no duplicates from padding
    assert shares == [25 * (r + 1) // world_size - 25 * r // world_size for r in range(world_size)]


@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("order", ["sample", "shard"])
def test_train_ranks_read_disjoint_shares_of_equal_length(tiny_shards, backend, order):
    """Every epoch the three ranks read disjoint samples (one global order per epoch) and yield the same
    number of batches, so DDP never waits on a batch another rank does not have."""
    keys, lengths = [[], []], []
    for rank in range(3):
        ldr = loader(tiny_shards, "train", backend, batch_size=4, rank=rank, world_size=3, with_keys=True,
                     order=order)
        for e in range(2):
            batches = epoch(ldr)
            assert len(batches) == len(ldr)
            lengths.append(len(batches))
            keys[e] += [k for *_, ks in batches for k in ks]
    # sample order: 60 // 12; shard order: 20 samples per rank, and pytorch's 2 workers each drop their last
    # partial batch (10 samples -> 2 x 4)
    assert lengths == [5 if backend == "dali-cpu" or order == "sample" else 4] * 6
    for epoch_keys in keys:
        assert len(set(epoch_keys)) == len(epoch_keys) == 3 * 4 * lengths[0]


def test_uneven_train_shares_never_repeat_a_sample(tiny_shards):
    """60 samples over 7 ranks (shares of 8 and 9) at batch 4: DALI pads the shorter shares' last batch; that
    padding must never reach a later epoch as duplicates (it did with LastBatchPolicy.DROP)."""
    for rank in (0, 6):
        ldr = loader(tiny_shards, "train", "dali-cpu", batch_size=4, rank=rank, world_size=7, with_keys=True,
                     order="shard")
        for _ in range(3):
            keys = [k for *_, ks in epoch(ldr) for k in ks]
            assert len(keys) == 8 and len(set(keys)) == 8
        ldr.close()


def test_pytorch_state_from_another_worker_count_is_refused(tiny_shards):
    """Shard order: worker slices and skip counts depend on the worker count, so resuming with another would
    repeat samples. Sample order: the batches do not depend on it, and the rest is the same, pixels included."""
    ldr = loader(tiny_shards, "train", "pytorch", batch_size=4, num_threads=2, order="shard")
    next(iter(ldr))
    state = ldr.state_dict()
    ldr.close()
    with pytest.raises(ValueError, match="num_threads=2, this loader has num_threads=1"):
        loader(tiny_shards, "train", "pytorch", batch_size=4, num_threads=1, state=state, order="shard")
    ldr = loader(tiny_shards, "train", "pytorch", batch_size=4, num_threads=2, with_keys=True)
    whole = epoch(ldr)
    ldr = loader(tiny_shards, "train", "pytorch", batch_size=4, num_threads=2, with_keys=True)
    passes = iter(ldr)
    first = [next(passes) for _ in range(3)]
    state = ldr.state_dict()
    rest = epoch(loader(tiny_shards, "train", "pytorch", batch_size=4, num_threads=0, with_keys=True, state=state))
    assert [k for *_, k in first] + [k for *_, k in rest] == [k for *_, k in whole]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[0:1] + rest, whole[0:1] + whole[3:], strict=True))


# --- resume -----------------------------------------------------------------------------------------------
def take(ldr, count):
    """The first `count` batches, crossing epoch boundaries like a training loop would."""
    batches, passes = [], iter(ldr)
    while len(batches) < count:
        try:
            batch = next(passes)
        except StopIteration:
            passes = iter(ldr)
            continue
        batches.append((batch[0].clone(), batch[1].clone(), *batch[2:]))
    return batches


@pytest.mark.parametrize("backend", READERS + ("synthetic",))
@pytest.mark.parametrize("split", ["train", "val"])
def test_resume_continues_at_the_next_sample(tiny_shards, backend, split):
    """State after k batches, rebuilt: the rest of the epoch and the next epoch equal an uninterrupted run
    (keys, labels and pixels, i.e. position and random state), also at and across the epoch boundary."""
    options = {"with_keys": True} if backend != "synthetic" else {"num_samples": 30}
    kwargs = dict(batch_size=4, seed=3, rank=1, world_size=2, **options)
    ldr = loader(tiny_shards, split, backend, **kwargs)
    per_epoch = len(ldr)
    reference = take(ldr, 2 * per_epoch)
    assert per_epoch >= 3
    for k in (1, per_epoch - 1, per_epoch, per_epoch + 1):
        first = loader(tiny_shards, split, backend, **kwargs)
        consumed = take(first, k)
        state = first.state_dict()
        assert json.loads(json.dumps(state)) == state  # plain Python types only
        first.close()
        resumed = loader(tiny_shards, split, backend, state=state, **kwargs)
        assert (resumed.epoch, resumed.batch_in_epoch) == divmod(k, per_epoch)
        assert len(resumed) == per_epoch - k % per_epoch
        combined = consumed + take(resumed, 2 * per_epoch - k)
        assert (resumed.epoch, resumed.batch_in_epoch) == (1, per_epoch)  # the last batch of epoch 1 was yielded
        for got, want in zip(combined, reference, strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert got[2:] == want[2:]


def test_resume_refuses_a_state_from_another_configuration(tiny_shards):
    ldr = loader(tiny_shards, "val", "dali-cpu")
    state = ldr.state_dict()
    with pytest.raises(ValueError, match="batch_size=8.*batch_size=4"):
        loader(tiny_shards, "val", "dali-cpu", batch_size=4, state=state)
    with pytest.raises(ValueError, match="backend"):
        loader(tiny_shards, "val", "pytorch", state=state)


# --- synthetic ----------------------------------------------------------------------------------------------
def test_synthetic_batches_have_the_real_shape_dtype_and_layout():
    ldr = build_loader(None, "train", train=True, batch_size=6, image_size=SIZE, backend="synthetic",
                       num_classes=10, num_samples=40, rank=0, world_size=2)
    batches = list(ldr)
    assert len(batches) == len(ldr) == 3 and ldr.num_samples == 18 and ldr.num_classes == 10
    for images, labels in batches:
        assert images.shape == (6, 3, SIZE, SIZE) and images.dtype == torch.float16
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (6,) and 0 <= labels.min() <= labels.max() < 10
    assert batches[0][0].data_ptr() == batches[1][0].data_ptr()  # generated once, reused
    val = build_loader(None, "val", train=False, batch_size=6, image_size=SIZE, backend="synthetic", num_samples=25,
                       world_size=3, rank=2)
    assert [len(y) for _, y in val] == [6, 3] and val.num_samples == 9


# --- errors -------------------------------------------------------------------------------------------------
@pytest.fixture()
def damaged_copy(tiny_shards, tmp_path):
    """A private copy of the shards that a test may break."""
    return Path(shutil.copytree(tiny_shards, tmp_path / "shards"))


def test_bad_flags_are_named(tiny_shards):
    with pytest.raises(ValueError, match="unknown backend 'dali'.*dali-gpu"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="dali")
    with pytest.raises(ValueError, match="split '../val': a split name is letters"):
        build_loader(tiny_shards, "../val", train=False, batch_size=4, backend="dali-cpu")
    with pytest.raises(FileNotFoundError, match="test.manifest.json not found"):
        build_loader(tiny_shards, "test", train=False, batch_size=4, backend="dali-cpu")
    with pytest.raises(TypeError, match="train must be True"):
        build_loader(tiny_shards, "val", train="val", batch_size=4, backend="dali-cpu")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            build_loader(tiny_shards, "val", train=False, batch_size=bad, backend="dali-cpu")
    with pytest.raises(ValueError, match="rank must be in"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="dali-cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="crop_area"):
        build_loader(tiny_shards, "train", train=True, batch_size=4, backend="dali-cpu", crop_area=(0.5, 0.1))
    with pytest.raises(TypeError, match="no option.*hw_decoder_lod"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="dali-cpu", hw_decoder_lod=0.5)
    with pytest.raises(ValueError, match="too few"):
        build_loader(tiny_shards, "train", train=True, batch_size=64, backend="dali-cpu")
    assert BACKENDS == ("dali-gpu", "dali-cpu", "pytorch", "synthetic")


def test_speed_knobs_are_refused_by_backends_without_them(tiny_shards):
    """prefetch_depth and hw_decoder_load are build_loader keywords; a backend that lacks one refuses a value
    instead of ignoring it, and a value out of range names the keyword."""
    cases = [("dali-cpu", {"hw_decoder_load": 0.5}, "hw_decoder_load=0.5: backend 'dali-cpu' has no such knob"),
             ("pytorch", {"hw_decoder_load": 1.0}, "hw_decoder_load=1.0: backend 'pytorch' has no such knob"),
             ("synthetic", {"prefetch_depth": 3}, "prefetch_depth=3: backend 'synthetic' has no such knob"),
             ("dali-cpu", {"prefetch_depth": 0}, r"prefetch_depth=0: must be an integer >= 1 \(batches\)"),
             ("dali-gpu", {"hw_decoder_load": 1.5}, r"hw_decoder_load=1.5: must be a fraction in \[0, 1\]")]
    for backend, knobs, message in cases:
        with pytest.raises(LoaderOptionError, match=message) as caught:
            build_loader(tiny_shards, "val", train=False, batch_size=4, backend=backend, **knobs)
        assert caught.value.keyword == next(iter(knobs))
    for backend in ("dali-cpu", "pytorch"):  # a depth the backend has is taken: a state says where it read
        with build_loader(tiny_shards, "val", train=False, batch_size=4, backend=backend, num_threads=1,
                          prefetch_depth=1) as loader:
            assert sum(int(labels.shape[0]) for _, labels in loader) == len(TINY_CLASSES) * TINY_VAL_PER_CLASS


@pytest.mark.parametrize("backend", READERS)
def test_missing_directory_and_index_are_named(tiny_shards, damaged_copy, tmp_path, backend):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        loader(tmp_path / "nowhere", "val", backend)
    (damaged_copy / "val-000002.idx").unlink()
    with pytest.raises(FileNotFoundError, match="val-000002.idx"):
        loader(damaged_copy, "val", backend)


def _overwrite_image(shards: Path, shard: str, sample: int) -> str:
    """Replace one sample's JPEG bytes with garbage of the same length; returns its key."""
    member = parse_index((shards / shard.replace(".tar", ".idx")).read_text())[sample][0]
    data = bytearray((shards / shard).read_bytes())
    data[member.offset : member.offset + member.size] = b"\x5a" * member.size
    (shards / shard).write_bytes(bytes(data))
    return member.name.split(".")[0]


@pytest.mark.parametrize("backend", READERS)
def test_undecodable_jpeg_fails_naming_shard_and_sample(damaged_copy, backend):
    key = _overwrite_image(damaged_copy, "val-000001.tar", 2)
    with pytest.raises(ShardReadError, match=rf"val-000001\.tar.*{key}"):
        for _ in loader(damaged_copy, "val", backend):
            pass


def test_a_failed_read_is_diagnosed_as_damage_only_when_a_shard_is_damaged(damaged_copy):
    """DALI's decoder and S3 reader name no sample: the loader checks the shards and says what it found. Sound
    shards must not be blamed (an S3 key DALI could not fetch once read 'Re-convert the damaged shard')."""
    from pipeline.base import diagnose_shards

    sound = diagnose_shards(damaged_copy, load_manifest(damaged_copy, "val"))
    assert sound.startswith("all 4 shards of the val split pass `shards verify --decode`, so the shards are sound")
    assert "re-convert" not in sound
    key = _overwrite_image(damaged_copy, "val-000001.tar", 2)
    damaged = diagnose_shards(damaged_copy, load_manifest(damaged_copy, "val"))
    assert damaged.startswith("damaged: ") and key in damaged and damaged.endswith("; re-convert the damaged shard")


@pytest.mark.parametrize("backend", READERS)
def test_truncated_tar_fails_naming_the_shard(damaged_copy, backend):
    tar = damaged_copy / "val-000002.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(ShardReadError, match=r"val-000002\.tar"):
        for _ in loader(damaged_copy, "val", backend):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_gpu_backend_without_gpu_is_a_clear_error(tiny_shards):
    with pytest.raises(RuntimeError, match="dali-gpu.*needs a CUDA GPU.*dali-cpu"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="dali-gpu")


# --- GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["dali-gpu", "pytorch", "synthetic"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_gpu_batches_live_on_the_device(tiny_shards, backend, split):
    truth = read_split(tiny_shards, split)
    options = {"with_keys": True} if backend != "synthetic" else {"num_samples": 60}
    ldr = build_loader(tiny_shards, split, train=split == "train", batch_size=8, image_size=SIZE, backend=backend,
                       num_threads=2, **options)
    assert ldr.device.type == "cuda"
    for images, labels, *keys in ldr:
        assert images.device.type == labels.device.type == "cuda"
        assert images.dtype == torch.float16 and images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
        if keys:
            assert labels.tolist() == [truth[k]["label"] for k in keys[0]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dali_gpu_val_matches_dali_cpu(tiny_shards):
    """Same graph, other decoder: nvJPEG and libjpeg-turbo differ in chroma upsampling only slightly."""
    cpu = {k: x for images, _, ks in epoch(loader(tiny_shards, "val", "dali-cpu", with_keys=True))
           for k, x in zip(ks, images, strict=True)}
    for images, _, keys in loader(tiny_shards, "val", "dali-gpu", with_keys=True):
        for key, image in zip(keys, images.cpu(), strict=True):
            assert (image.float() - cpu[key].float()).abs().mean() < 0.03


def test_dataloader_resume_plan_follows_round_robin():
    """torch's DataLoader takes worker batches round-robin, skipping exhausted workers."""
    from pipeline.pytorch_loader import round_robin, units_for_range

    assert round_robin([3, 1, 2], 10) == [0, 1, 2, 0, 2, 0]
    assert round_robin([3, 1, 2], 4) == [0, 1, 2, 0]
    # shards of 8, 8, 4 samples read in order 2, 0, 1: positions 2..13 are shard 2 [2:4] and shard 0 [0:10]
    assert units_for_range([8, 8, 4], [2, 0, 1], 2, 14) == [(2, 2, 2), (0, 0, 8), (1, 0, 2)]
