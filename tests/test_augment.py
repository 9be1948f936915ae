"""Augmentation policies (pipeline/augment.py) on `dali-cpu` and `pytorch`, on the session's `tiny_shards`:
the batch contract holds with every policy, a policy changes pixels and is reproducible for a seed, random
erasing erases the expected share of images, and a mid-epoch resume with a policy on is exact."""

from __future__ import annotations

import math

import pytest
import torch
from test_pipeline import SIZE, THREADS, epoch, read_split, take

from pipeline import PolicyError, build_loader
from pipeline.augment import NO_BOX, TorchvisionPolicy, erase_boxes_, make_policy

READERS = ("dali-cpu", "pytorch")
POLICIES = ("autoaugment", "randaugment", "trivialaugment")


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
@pytest.mark.parametrize("backend", READERS)
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_keeps_the_contract_and_is_reproducible(tiny_shards, backend, policy):
    truth = read_split(tiny_shards, "train")
    options = dict(seed=7, augment=policy, randaugment_n=2, randaugment_m=9)
    first = one_epoch(tiny_shards, backend, **options)
    again = one_epoch(tiny_shards, backend, **options)
    plain = one_epoch(tiny_shards, backend, seed=7)
    assert len(first) == len(plain) == (7 if backend == "dali-cpu" else 6)
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
@pytest.mark.parametrize("backend", READERS)
def test_resume_with_a_policy_continues_exactly(tiny_shards, backend):
    """DALI's checkpoint covers the conditional graph of nvidia.dali.auto_aug; the pytorch backend seeds the
    torchvision ops per sample. Either way a state taken mid-epoch continues with the same pixels."""
    options = dict(batch_size=4, seed=3, augment="trivialaugment", random_erasing=0.5)
    with train_loader(tiny_shards, backend, **options) as ldr:
        per_epoch = len(ldr)
        total = per_epoch + 3  # into the second epoch
        reference = take(ldr, total)
    for k in (2, per_epoch + 1):
        first = train_loader(tiny_shards, backend, **options)
        consumed = take(first, k)
        state = first.state_dict()
        first.close()
        assert state["augment"] == "trivialaugment+random_erasing(0.5)"
        with train_loader(tiny_shards, backend, state=state, **options) as resumed:
            rest = take(resumed, total - k)
        for got, want in zip(consumed + rest, reference, strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


def test_a_state_from_another_policy_is_refused(tiny_shards):
    with train_loader(tiny_shards, "dali-cpu", augment="randaugment") as ldr:
        next(iter(ldr))
        state = ldr.state_dict()
    with pytest.raises(ValueError, match=r"augment='randaugment\(n=2,m=9\)', this loader has augment='rrc-flip'"):
        train_loader(tiny_shards, "dali-cpu", state=state)
    with train_loader(tiny_shards, "pytorch") as ldr:
        old = {k: v for k, v in ldr.state_dict().items() if k != "augment"}
    train_loader(tiny_shards, "pytorch", state=old).close()  # states saved before the key existed: rrc-flip


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
