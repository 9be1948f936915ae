"""Augmentation policies (pipeline/augment.py) on `dali-cpu` and `pytorch`, on the session's `tiny_shards`:
the batch contract holds with every policy, a policy changes pixels and is reproducible for a seed, random
erasing erases the expected share of images, and a mid-epoch resume with a policy on is exact. One name is one
policy: DALI's `autoaugment` is torchvision's table with torchvision's magnitudes, `autoaugment-v0` is DLE's
policy and is refused where torchvision would have to stand in for it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_pipeline import SIZE, THREADS, epoch, read_split, take

from pipeline import PolicyError, build_loader
from pipeline.augment import (
    AUTOAUGMENT_BINS,
    NO_BOX,
    TorchvisionPolicy,
    autoaugment_space,
    dali_autoaugment_policy,
    erase_boxes_,
    make_policy,
)

READERS = ("dali-cpu", "pytorch")
POLICIES = ("autoaugment", "autoaugment-v0", "randaugment", "trivialaugment")
#: (backend, policy) pairs that run: autoaugment-v0 exists on the DALI backends only
RUNS = [(b, p) for p in POLICIES for b in READERS if (b, p) != ("pytorch", "autoaugment-v0")]


def train_loader(shards, backend, **kwargs):
    kwargs.setdefault("batch_size", 8)
    return build_loader(shards, "train", train=True, image_size=SIZE, backend=backend,
                        num_threads=THREADS.get(backend, 2), with_keys=True, **kwargs)


def one_epoch(shards, backend, **kwargs) -> list:
    """One epoch of (images, labels, keys), the loader closed after: a test process holding many DALI
    pipelines reserves many GB of address space, and the pytorch backend's fork() may then be refused."""
    with train_loader(shards, backend, **kwargs) as ldr:
        return epoch(ldr)


def erased_boxes(images: torch.Tensor) -> list[tuple[int, int] | None]:
    """Per image, (height, width) of the zeroed rectangle, or None. A normalised pixel is exactly 0 in every
    channel only where erasing set it: no 8-bit value equals the ImageNet mean."""
    boxes = []
    for image in images:
        zero = (image == 0).all(dim=0)
        if not zero.any():
            boxes.append(None)
            continue
        rows, cols = zero.any(dim=1).nonzero().flatten(), zero.any(dim=0).nonzero().flatten()
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert zero[top:bottom, left:right].all(), "the erased pixels are not one rectangle"
        assert int(zero.sum()) == (bottom - top) * (right - left)
        boxes.append((bottom - top, right - left))
    return boxes


# --- every policy keeps the contract, changes pixels, and is reproducible ---------------------------------
@pytest.mark.parametrize(("backend", "policy"), RUNS)
def test_policy_keeps_the_contract_and_is_reproducible(tiny_shards, backend, policy):
    truth = read_split(tiny_shards, "train")
    options = dict(seed=7, augment=policy, randaugment_n=2, randaugment_m=9)
    first = one_epoch(tiny_shards, backend, **options)
    again = one_epoch(tiny_shards, backend, **options)
    plain = one_epoch(tiny_shards, backend, seed=7)
    assert len(first) == len(plain) == 7  # 60 // 8 in sample order, on every backend
    for (images, labels, keys), (same, _, same_keys), (_, _, base_keys) in zip(first, again, plain, strict=True):
        assert images.dtype == torch.float16 and images.shape == (8, 3, SIZE, SIZE)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.tolist() == [truth[k]["label"] for k in keys]
        assert keys == same_keys == base_keys  # the policy changes pixels, never which samples come
        assert torch.equal(images, same)  # same seed, same pixels
    changed = sum(not torch.equal(a, b) for (x, _, _), (y, _, _) in zip(first, plain, strict=True)
                  for a, b in zip(x, y, strict=True))
    # every policy leaves an image untouched now and then (AutoAugment's sub-policy probabilities, the
    # identity op of RandAugment/TrivialAugment), so not all, but most images differ from rrc-flip's
    assert changed >= len(first) * 8 // 2, changed


@pytest.mark.parametrize("backend", READERS)
def test_randaugment_magnitude_changes_pixels(tiny_shards, backend):
    low = one_epoch(tiny_shards, backend, seed=1, augment="randaugment", randaugment_m=1)
    high = one_epoch(tiny_shards, backend, seed=1, augment="randaugment", randaugment_m=20)
    assert [k for *_, k in low] == [k for *_, k in high]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(low, high, strict=True))


# --- random erasing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", READERS)
def test_random_erasing_erases_the_expected_share(tiny_shards, backend):
    """p = 0.5 over 3 epochs (168 or 144 images): the erased count lies within 4.5 sigma of Binomial(n, 0.5);
    each erased region is one rectangle of 2-33% of the image (a little either side after rounding its
    sides), set to exactly 0. p = 1 erases every image, p = 0 none."""
    with train_loader(tiny_shards, backend, random_erasing=0.5, seed=2) as ldr:
        boxes = [box for _ in range(3) for images, *_ in ldr for box in erased_boxes(images)]
    erased = [b for b in boxes if b is not None]
    assert abs(len(erased) - len(boxes) / 2) < 4.5 * math.sqrt(len(boxes) / 4), (len(erased), len(boxes))
    for height, width in erased:
        assert 0.015 <= height * width / SIZE**2 <= 0.36 and height < SIZE and width < SIZE
    every = one_epoch(tiny_shards, backend, random_erasing=1.0)
    assert None not in [b for images, *_ in every for b in erased_boxes(images)]
    assert {b for images, *_ in one_epoch(tiny_shards, backend) for b in erased_boxes(images)} == {None}


def test_erase_boxes_zeroes_exactly_the_boxes():
    images = torch.ones(3, 2, 5, 6)
    erase_boxes_(images, torch.tensor([[1, 2, 3, 4], list(NO_BOX), [0, 0, 5, 1]]))
    want = torch.ones(3, 2, 5, 6)
    want[0, :, 1:4, 2:6] = 0
    want[2, :, :, 0:1] = 0
    assert torch.equal(images, want)


def test_torchvision_policy_is_seeded_per_sample_and_leaves_the_global_rng_alone():
    from PIL import Image

    image = Image.linear_gradient("L").convert("RGB").resize((SIZE, SIZE))
    policy = TorchvisionPolicy(make_policy(augment="randaugment", random_erasing=1.0))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    one, box_one = policy(image, seed=5)
    two, box_two = policy(image, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert one.tobytes() == two.tobytes() and box_one == box_two != NO_BOX
    assert [policy(image, seed=s)[1] for s in range(6)] != [box_one] * 6


# --- resume -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "policy"), [*((b, "trivialaugment") for b in READERS),
                                                  ("dali-cpu", "autoaugment")])
def test_resume_with_a_policy_continues_exactly(tiny_shards, backend, policy):
    """DALI's checkpoint covers the conditional graph of nvidia.dali.auto_aug (its own policies and our
    AutoAugment Policy); the pytorch backend seeds the torchvision ops per sample. Either way a state taken
    mid-epoch continues with the same pixels."""
    options = dict(batch_size=4, seed=3, augment=policy, random_erasing=0.5)
    with train_loader(tiny_shards, backend, **options) as ldr:
        per_epoch = len(ldr)
        total = per_epoch + 3  # into the second epoch
        reference = take(ldr, total)
    for k in (2, per_epoch + 1):
        first = train_loader(tiny_shards, backend, **options)
        consumed = take(first, k)
        state = first.state_dict()
        first.close()
        assert state["augment"] == f"{policy}+random_erasing(0.5)"
        with train_loader(tiny_shards, backend, state=state, **options) as resumed:
            rest = take(resumed, total - k)
        for got, want in zip(consumed + rest, reference, strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_a_state_from_another_policy_is_refused(tiny_shards):
    """Shard order: a state carries its policy's random state, so another policy is refused. Sample order: the
    order does not depend on the policy, so the position is kept and the new policy draws afresh."""
    with train_loader(tiny_shards, "dali-cpu", augment="randaugment", order="shard") as ldr:
        next(iter(ldr))
        state = ldr.state_dict()
    with pytest.raises(ValueError, match=r"augment='randaugment\(n=2,m=9\)', this loader has augment='rrc-flip'"):
        train_loader(tiny_shards, "dali-cpu", state=state, order="shard")
    with train_loader(tiny_shards, "pytorch", order="shard") as ldr:
        old = {k: v for k, v in ldr.state_dict().items() if k != "augment"}
    train_loader(tiny_shards, "pytorch", state=old, order="shard").close()  # saved before the key: rrc-flip
    with train_loader(tiny_shards, "dali-cpu", augment="randaugment") as ldr:
        next(iter(ldr))
        state = ldr.state_dict()
    with train_loader(tiny_shards, "dali-cpu", state=state) as ldr:
        assert (ldr.epoch, ldr.batch_in_epoch, len(ldr)) == (0, 1, 6)


# --- one name, one policy -----------------------------------------------------------------------------------
def torchvision_autoaugment():
    """torchvision's ImageNet AutoAugment as the pytorch backend runs it: its sub-policy table and its
    augmentation space (op -> (magnitudes(bins, height, width), signed)); private attributes, read only here
    so that a torchvision release that changes them fails this comparison instead of drifting silently."""
    from torchvision.transforms import v2

    op = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    return op._policies, op._AUGMENTATION_SPACE


def table(policy) -> list[list[tuple]]:
    """A DALI Policy's sub-policies as (op name, probability, bin) lists."""
    return [[(aug.name, p, m) for aug, p, m in sub] for sub in policy.sub_policies]


@pytest.mark.parametrize("side", [32, 224, 331])
def test_autoaugment_magnitudes_are_torchvisions(side):
    """autoaugment_space (what the DALI policy is built from) equals torchvision's AutoAugment space at 10
    bins, op by op: the same ops, the same random signs, the same magnitudes (float32 precision for the
    continuous ones; exactly what the pixels see for the discrete ones: whole-pixel shifts, bits kept, and the
    first pixel value solarize inverts)."""
    _, space = torchvision_autoaugment()
    ours = autoaugment_space(side)
    assert sorted(ours) == sorted(space)
    for op, (magnitudes_of, signed) in space.items():
        want = magnitudes_of(AUTOAUGMENT_BINS, side, side)
        got, got_signed = ours[op]
        assert got_signed == signed, op
        if want is None:
            assert got is None, op
            continue
        want = [float(m) for m in want]
        if op.startswith("Translate"):
            assert got == tuple(float(int(m)) for m in want), op  # torchvision's translate=[int(magnitude), 0]
        elif op == "Posterize":
            assert got == tuple(want), op
        elif op == "Solarize":  # torchvision (Pillow) inverts pixel values v >= 255 * m
            assert [sum(v >= 255.0 * m for v in range(256)) for m in want] == [256 - t for t in got], op
        else:
            assert np.allclose(got, want, rtol=1e-6, atol=0), op


def test_dali_autoaugment_is_the_table_torchvision_runs():
    """The DALI policy behind augment='autoaugment': torchvision's 25 sub-policies (op, probability, bin),
    each op a DALI augmentation carrying autoaugment_space's per-bin magnitudes and torchvision's sign rule."""
    policy = dali_autoaugment_policy("autoaugment", image_size=224)
    assert policy.num_magnitude_bins == AUTOAUGMENT_BINS == 10
    assert table(policy) == [list(sub) for sub in torchvision_autoaugment()[0]]
    space = autoaugment_space(224)
    for name, aug in policy.augmentations.items():
        magnitudes, signed = space[name]
        assert aug.randomly_negate == signed, name
        want = None if magnitudes is None else np.array(magnitudes, dtype=np.float32)  # what DALI's ops take
        assert (aug.mag_range is None) if want is None else np.array_equal(aug.mag_range, want), name


def test_dali_posterize_and_solarize_give_torchvisions_pixels():
    """The discrete ops end to end: every pixel value 0-255 through DALI's Posterize/Solarize of the
    autoaugment policy at each of the 10 bins equals torchvision's (Pillow's) result at that bin's magnitude,
    computed as torchvision's AutoAugment does (bits=int(m); threshold=255 * m)."""
    from nvidia.dali import fn, pipeline_def
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    _, space = torchvision_autoaugment()
    pixels = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)  # every value once
    policy = dali_autoaugment_policy("autoaugment", image_size=16)

    @pipeline_def(batch_size=AUTOAUGMENT_BINS, num_threads=1, device_id=None)
    def ops():
        images = fn.external_source(source=lambda: [pixels] * AUTOAUGMENT_BINS, batch=True, layout="HWC")
        bins = fn.external_source(source=lambda: [np.int32(b) for b in range(AUTOAUGMENT_BINS)], batch=True)
        return tuple(policy.augmentations[op](images, magnitude_bin=bins, num_magnitude_bins=AUTOAUGMENT_BINS)
                     for op in ("Posterize", "Solarize"))

    pipe = ops()
    pipe.build()
    posterized, solarized = (out.as_array() for out in pipe.run())
    image = Image.fromarray(pixels)
    for b, (bits, level) in enumerate(zip(space["Posterize"][0](10, 16, 16), space["Solarize"][0](10, 16, 16),
                                          strict=True)):
        assert np.array_equal(posterized[b], np.asarray(F.posterize(image, bits=int(bits)))), b
        assert np.array_equal(solarized[b], np.asarray(F.solarize(image, threshold=255.0 * float(level)))), b


# DLE's AutoaugmentImageNetPolicy (DeepLearningExamples @ 729963dd, PyTorch/Classification/ConvNets/
# image_classification/autoaugment.py): SubPolicy(p1, op1, bin1, p2, op2, bin2), 11 bins, in DALI's op names.
DLE_V0 = [
    (0.8, "equalize", 1, 0.8, "shear_y", 4), (0.4, "color", 9, 0.6, "equalize", 3),
    (0.4, "color", 1, 0.6, "rotate", 8), (0.8, "solarize", 3, 0.4, "equalize", 7),
    (0.4, "solarize", 2, 0.6, "solarize", 2), (0.2, "color", 0, 0.8, "equalize", 8),
    (0.4, "equalize", 8, 0.8, "solarize_add", 3), (0.2, "shear_x", 9, 0.6, "rotate", 8),
    (0.6, "color", 1, 1.0, "equalize", 2), (0.4, "invert", 9, 0.6, "rotate", 0),
    (1.0, "equalize", 9, 0.6, "shear_y", 3), (0.4, "color", 7, 0.6, "equalize", 0),
    (0.4, "posterize", 6, 0.4, "auto_contrast", 7), (0.6, "solarize", 8, 0.6, "color", 9),
    (0.2, "solarize", 4, 0.8, "rotate", 9), (1.0, "rotate", 7, 0.8, "translate_y", 9),
    (0.0, "shear_x", 0, 0.8, "solarize", 4), (0.8, "shear_y", 0, 0.6, "color", 4),
    (1.0, "color", 0, 0.6, "rotate", 2), (0.8, "equalize", 4, 0.0, "equalize", 8),
    (1.0, "equalize", 4, 0.6, "auto_contrast", 2), (0.4, "shear_y", 7, 0.6, "solarize_add", 7),
    (0.8, "posterize", 2, 0.6, "solarize", 10), (0.6, "solarize", 8, 0.6, "equalize", 1),
    (0.8, "color", 6, 0.4, "rotate", 5),
]
#: DLE's magnitude ranges (OperationFactory.ranges, np.linspace(lo, hi, 11)) of the ops v0 uses
DLE_RANGES = {"shear_x": (0, 0.3), "shear_y": (0, 0.3), "translate_y": (0, 250), "rotate": (0, 30),
              "color": (0.1, 1.9), "posterize": (0, 4), "solarize": (0, 256), "solarize_add": (0, 110)}


def dle_v0_table() -> list[list[tuple]]:
    """DLE_V0 as (DALI op name, probability, bin) sub-policies; ops DLE runs with probability 0 left out."""
    return [[(op, p, m if op in DLE_RANGES else None) for p, op, m in (row[:3], row[3:]) if p > 0] for row in DLE_V0]


def test_autoaugment_v0_is_dles_policy():
    """augment='autoaugment-v0' on DALI is DLE's AutoaugmentImageNetPolicy: its 25 sub-policies, 11 bins, and
    its ranges, translations included (DLE: 0-250 px, not a fraction of the image)."""
    policy = dali_autoaugment_policy("autoaugment-v0", image_size=224)
    assert policy.num_magnitude_bins == 11 and table(policy) == dle_v0_table()
    for name, aug in policy.augmentations.items():
        assert (aug.mag_range is None) if name not in DLE_RANGES else (tuple(aug.mag_range) == DLE_RANGES[name])


@pytest.mark.parametrize("policy", ["autoaugment", "autoaugment-v0"])
def test_the_dali_graph_runs_the_policy_its_name_says(tiny_shards, monkeypatch, policy):
    """What the dali-cpu loader's graph applies: torchvision's table for 'autoaugment', DLE's for
    'autoaugment-v0' (nvidia.dali.auto_aug's apply_auto_augment is watched while the graph is built). Shard
    order builds one pipeline; sample order one per segment, the next one while the current one runs."""
    from nvidia.dali.auto_aug import auto_augment

    applied, apply = [], auto_augment.apply_auto_augment
    monkeypatch.setattr(auto_augment, "apply_auto_augment", lambda p, *a, **k: applied.append(p) or apply(p, *a, **k))
    want = [list(s) for s in torchvision_autoaugment()[0]] if policy == "autoaugment" else dle_v0_table()
    with train_loader(tiny_shards, "dali-cpu", augment=policy, order="shard") as ldr:
        images, labels, _ = next(iter(ldr))
    assert len(applied) == 1 and images.shape == (8, 3, SIZE, SIZE)
    assert table(applied[0]) == want
    applied.clear()
    with train_loader(tiny_shards, "dali-cpu", augment=policy) as ldr:
        images, labels, _ = next(iter(ldr))
    assert 1 <= len(applied) <= 2 and images.shape == (8, 3, SIZE, SIZE)
    assert all(table(p) == want for p in applied)


def test_autoaugment_v0_is_refused_where_torchvision_would_stand_in(tiny_shards):
    """torchvision has no v0 policy: the pytorch backend says so instead of running its paper table."""
    with pytest.raises(PolicyError, match="augment='autoaugment-v0': backend 'pytorch': torchvision has no v0"):
        train_loader(tiny_shards, "pytorch", augment="autoaugment-v0")
    with pytest.raises(PolicyError, match="torchvision has no v0 policy"):
        TorchvisionPolicy(make_policy(augment="autoaugment-v0"))


# --- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_dali_gpu_runs_each_policy_on_the_device(tiny_shards, policy):
    """The same graph with GPU operators (mixed decoder, auto_aug and fn.erase on the GPU): the contract holds,
    erasing happens, a seed gives the same pixels, and a mid-epoch state continues exactly."""
    truth = read_split(tiny_shards, "train")
    options = dict(batch_size=4, seed=7, augment=policy, random_erasing=0.5)
    first, again = one_epoch(tiny_shards, "dali-gpu", **options), one_epoch(tiny_shards, "dali-gpu", **options)
    for (images, labels, keys), (same, _, same_keys) in zip(first, again, strict=True):
        assert images.is_cuda and images.dtype == torch.float16 and images.shape == (4, 3, SIZE, SIZE)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.tolist() == [truth[k]["label"] for k in keys] and keys == same_keys
        assert torch.equal(images, same)
    assert any(b is not None for images, *_ in first for b in erased_boxes(images.cpu()))
    with train_loader(tiny_shards, "dali-gpu", **options) as ldr:
        consumed = take(ldr, 3)
        state = ldr.state_dict()
    with train_loader(tiny_shards, "dali-gpu", state=state, **options) as resumed:
        rest = take(resumed, 4)
    for got, want in zip(consumed + rest, first[:7], strict=True):
        assert torch.equal(got[0], want[0]) and got[2] == want[2]


# --- bad settings -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(augment="autoaug"), "augment='autoaug': unknown policy; choose one of rrc-flip, autoaugment, "),
        (dict(augment="randaugment", randaugment_n=0), "randaugment_n=0: must be an integer >= 1"),
        (dict(randaugment_m=31), r"randaugment_m=31: must be an integer magnitude bin in \[0, 31\)"),
        (dict(random_erasing=1.5), r"random_erasing=1.5: must be a probability in \[0, 1\]"),
        (dict(train=False, augment="trivialaugment"), "augment='trivialaugment': augmentation applies to train=True"),
        (dict(train=False, random_erasing=0.1), "random_erasing=0.1: augmentation applies to train=True"),
        (dict(backend="synthetic", augment="randaugment"), "backend 'synthetic' yields random tensors"),
    ],
)
def test_bad_policy_settings_name_their_keyword(tiny_shards, kwargs, message):
    kwargs = {"train": True, "backend": "dali-cpu", **kwargs}
    with pytest.raises(PolicyError, match=message):
        build_loader(tiny_shards, "train" if kwargs["train"] else "val", batch_size=4, **kwargs)
