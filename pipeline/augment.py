"""Train-time augmentation policies: one switch (`build_loader(..., augment=...)`) for every backend.

    rrc-flip        random-resized crop + horizontal flip only (the default; what every backend always does)
    autoaugment     + AutoAugment's ImageNet policy as the paper's table (Cubuk et al. 2019, 25 sub-policies,
                      10 magnitude bins): torchvision's AutoAugmentPolicy.IMAGENET, timm's "original"
    autoaugment-v0  + the "v0" ImageNet policy of TF's EfficientNet code (11 bins, SolarizeAdd, translate):
                      DALI's auto_augment_image_net, DLE's AutoaugmentImageNetPolicy, timm's "v0".
                      DALI backends only: torchvision has no v0 policy, so `pytorch` refuses it
    randaugment     + RandAugment, `randaugment_n` ops per image at magnitude `randaugment_m` of 31 bins
    trivialaugment  + TrivialAugmentWide (Mueller & Hutter 2021): one op per image at a random magnitude
    random_erasing  probability per image of erasing one rectangle (Zhong et al. 2020), with any policy

One name is one policy on every backend that runs it; a backend that cannot run a policy refuses it
(PolicyError), it never substitutes another.

The policies act on uint8 HWC images after the random-resized crop, the resize and the flip, before
normalisation; random erasing acts after normalisation and sets the rectangle to 0 (the mean pixel), like
torchvision's RandomErasing after Normalize. Val loaders never augment.

Implementations (this module holds both, so the backends only call in):
- DALI (`dali-gpu`, `dali-cpu`): `nvidia.dali.auto_aug` inside the one graph (`dali_policy`), which needs a
  pipeline with `enable_conditionals=True` (`AugmentPolicy.needs_conditionals`); erasing with `fn.erase`
  and per-sample random boxes computed in the graph (`dali_random_erasing`). `autoaugment` is a custom
  `auto_aug.core.Policy` (`dali_autoaugment_policy`): the paper's table (AUTOAUGMENT_IMAGENET) over DALI's
  augmentations with torchvision's magnitudes (`autoaugment_space`); `autoaugment-v0` is DALI's own
  ImageNet policy with DLE's translation range.
- `pytorch`: torchvision.transforms.v2 AutoAugment(IMAGENET) / RandAugment / TrivialAugmentWide on the Pillow
  image and v2.RandomErasing's own box sampler (`TorchvisionPolicy`); the box is applied on the device after
  normalisation (`erase_boxes_`). torchvision draws from torch's global RNG, so every sample runs inside
  `torch.random.fork_rng` seeded from the sample's own seed: results do not depend on worker timing, resume
  is exact, and the caller's RNG is left as it was.

Where the two backends differ (DALI's operators are not Pillow's, so pixels never match exactly):
- Parameters are set to agree: grey fill 128 for pixels that shear/rotate/translate move in (DALI's default;
  torchvision's is 0), bilinear warps, largest shift 150/331 of the side for AutoAugment/RandAugment
  (torchvision's; DALI's defaults are 1.0 and 100/224) and 32 px for TrivialAugmentWide (both libraries').
- `autoaugment`: the same 25 sub-policies, probabilities, bins and magnitudes on both (tests compare the
  tables with torchvision's): shear 0-0.3, translate 0-150/331 of the side in whole pixels (torchvision
  truncates), rotate 0-30 degrees, brightness/color/contrast/sharpness 1 +- 0-0.9, posterize 8 -> 4 bits,
  solarize threshold 255 -> 0 (as the integer pixel value from which torchvision inverts), a random sign on
  the same ops. What still differs is the operators: DALI's equalize follows OpenCV's formula, its color is
  an HSV saturation, and sharpness also filters the 1-px border that Pillow leaves alone.
- RandAugment and TrivialAugmentWide: DALI's suites have torchvision's 14 ops and ranges, except that DALI's
  solarize threshold runs 256 -> 0 (torchvision 255 -> 0), its translations are not truncated to whole
  pixels, and its TrivialAugmentWide enhance ops start at 0.01 (torchvision 0).
- The flip: torchvision's reference order is crop -> flip -> policy; DALI flips in crop_mirror_normalize,
  after the policy. Every geometric op has a random sign, so the distributions are the same.
- Random erasing: the same box distribution (area 2-33% of the image, aspect 0.3-3.3, 10 tries, the first box
  that fits, else no erasing); DALI rounds the box sides half up where Python's round() rounds half to even.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

POLICIES: tuple[str, ...] = ("rrc-flip", "autoaugment", "autoaugment-v0", "randaugment", "trivialaugment")
DEFAULT_POLICY = "rrc-flip"
#: Policies only the DALI backends run, with the reason `pytorch` refuses them.
DALI_ONLY: dict[str, str] = {
    "autoaugment-v0": "torchvision has no v0 policy (its AutoAugmentPolicy.IMAGENET is the paper's table, "
                      "augment='autoaugment'); use backend dali-gpu or dali-cpu, or augment='autoaugment'",
}
RANDAUGMENT_N = 2  # ops per image (RandAugment paper and torchvision default)
RANDAUGMENT_M = 9  # magnitude bin, 0 .. MAGNITUDE_BINS - 1
MAGNITUDE_BINS = 31  # torchvision's and DALI's default
#: Grey level (0-255) of pixels that shear, rotate and translate bring into the image.
FILL = 128
#: AutoAugment / RandAugment: largest translation as a fraction of the image side (torchvision's 150/331).
TRANSLATE_FRACTION = 150 / 331
#: TrivialAugmentWide: largest translation in pixels (torchvision's and DALI's).
TRIVIAL_TRANSLATE = 32  # pixels
#: Random erasing (torchvision's RandomErasing defaults): area fraction and aspect ratio of the box.
ERASE_SCALE: tuple[float, float] = (0.02, 1 / 3)
ERASE_RATIO: tuple[float, float] = (0.3, 3.3)
ERASE_ATTEMPTS = 10  # boxes drawn before giving up on an image (no erasing then)
NO_BOX = (0, 0, 0, 0)  # (top, left, height, width) of "nothing erased"

# --- AutoAugment's ImageNet policy (the paper's table) -----------------------------------------------------
#: Magnitude bins of the paper's table (torchvision's AutoAugment calls its augmentation space with 10).
AUTOAUGMENT_BINS = 10
#: The paper's ImageNet policy (Cubuk et al. 2019, appendix table), in torchvision's op names and order
#: (torchvision's AutoAugmentPolicy.IMAGENET; timm's "original" is the same table): 25 sub-policies of
#: (op, probability, magnitude bin); None for ops without a magnitude.
AUTOAUGMENT_IMAGENET: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
#: Posterize: bits kept per bin, torchvision's (8 - arange(10) / (9 / 4)).round().
POSTERIZE_BITS = (8, 8, 7, 7, 6, 6, 5, 5, 4, 4)
#: Solarize: per bin, the lowest pixel value (0-255) that is inverted. torchvision inverts pixels >= 255 * m
#: for m in float32 linspace(1, 0, 10); on whole pixels that is >= ceil(255 * m). float32 puts bins 3 and 6 a
#: hair above 170 and 85, hence 171 and 86 (a threshold of exactly 170 would also invert pixels of 170).
SOLARIZE_THRESHOLDS = (255, 227, 199, 171, 142, 114, 86, 57, 29, 0)
#: autoaugment-v0: largest translation in pixels, DLE's AutoaugmentImageNetPolicy (linspace(0, 250, 11) px)
#: and DALI's default for auto_augment_image_net without `shape`.
V0_TRANSLATE = 250  # pixels


class PolicyError(ValueError):
    """An augmentation setting a person has to fix; `keyword` is the build_loader argument that sets it."""

    def __init__(self, keyword: str, value: object, reason: str) -> None:
        super().__init__(f"{keyword}={value!r}: {reason}")
        self.keyword, self.value, self.reason = keyword, value, reason


@dataclass(frozen=True)
class AugmentPolicy:
    """A validated policy (build it with `make_policy`)."""

    name: str = DEFAULT_POLICY
    randaugment_n: int = RANDAUGMENT_N
    randaugment_m: int = RANDAUGMENT_M
    random_erasing: float = 0.0  # probability per image

    @property
    def spec(self) -> str:
        """One string that identifies the policy: in loader states (a resume must use the same) and logs."""
        text = self.name
        if self.name == "randaugment":
            text += f"(n={self.randaugment_n},m={self.randaugment_m})"
        if self.random_erasing > 0:
            text += f"+random_erasing({self.random_erasing:g})"
        return text

    @property
    def needs_conditionals(self) -> bool:
        """DALI's automatic augmentations run per-sample `if`s: the pipeline needs enable_conditionals."""
        return self.name != DEFAULT_POLICY

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_POLICY and self.random_erasing == 0


def make_policy(
    *,
    augment: str = DEFAULT_POLICY,
    randaugment_n: int = RANDAUGMENT_N,
    randaugment_m: int = RANDAUGMENT_M,
    random_erasing: float = 0.0,
) -> AugmentPolicy:
    """The one place augmentation settings are checked; a bad one raises PolicyError naming the keyword.
    randaugment_n/m are checked whatever the policy (a sweep passes them through) and used by randaugment."""
    if augment not in POLICIES:
        raise PolicyError("augment", augment, f"unknown policy; choose one of {', '.join(POLICIES)}")
    if isinstance(randaugment_n, bool) or not isinstance(randaugment_n, int) or randaugment_n < 1:
        raise PolicyError("randaugment_n", randaugment_n, "must be an integer >= 1 (ops per image)")
    if isinstance(randaugment_m, bool) or not isinstance(randaugment_m, int) or not (
        0 <= randaugment_m < MAGNITUDE_BINS
    ):
        raise PolicyError("randaugment_m", randaugment_m, f"must be an integer magnitude bin in [0, {MAGNITUDE_BINS})")
    if isinstance(random_erasing, bool) or not isinstance(random_erasing, (int, float)) or not (
        0.0 <= random_erasing <= 1.0
    ):
        raise PolicyError("random_erasing", random_erasing, "must be a probability in [0, 1]")
    return AugmentPolicy(augment, randaugment_n, randaugment_m, float(random_erasing))


def check_policy_use(policy: AugmentPolicy, *, train: bool, backend: str) -> None:
    """Augmentation belongs to train loaders of real backends that implement the policy; anything else is
    refused, not ignored or replaced by a look-alike."""
    if policy.is_default:
        return
    keyword, value = ("augment", policy.name) if policy.name != DEFAULT_POLICY else (
        "random_erasing", policy.random_erasing)
    if not train:
        raise PolicyError(keyword, value, "augmentation applies to train=True loaders only; val is never augmented")
    if backend == "synthetic":
        raise PolicyError(keyword, value, "backend 'synthetic' yields random tensors, there is nothing to augment; "
                          "use dali-gpu, dali-cpu or pytorch")
    if policy.name in DALI_ONLY and backend not in ("dali-gpu", "dali-cpu"):
        raise PolicyError("augment", policy.name, f"backend {backend!r}: {DALI_ONLY[policy.name]}")


# --- DALI -------------------------------------------------------------------------------------------------
def autoaugment_space(image_size: int) -> dict[str, tuple[tuple[float, ...] | None, bool]]:
    """op -> (its magnitude in each of the AUTOAUGMENT_BINS bins, whether a random sign applies): torchvision's
    AutoAugment augmentation space for `image_size` squares, which `autoaugment` uses on every backend.
    Shear is the shear factor, translate whole pixels (torchvision truncates), rotate degrees, the enhance ops
    the factor's distance from 1, posterize bits kept, solarize the first inverted pixel value."""
    bins = AUTOAUGMENT_BINS

    def ramp(top: float) -> tuple[float, ...]:
        return tuple(top * i / (bins - 1) for i in range(bins))

    shift = tuple(float(int(TRANSLATE_FRACTION * image_size * i / (bins - 1))) for i in range(bins))  # pixels
    return {
        "ShearX": (ramp(0.3), True),
        "ShearY": (ramp(0.3), True),
        "TranslateX": (shift, True),
        "TranslateY": (shift, True),
        "Rotate": (ramp(30.0), True),  # degrees
        "Brightness": (ramp(0.9), True),
        "Color": (ramp(0.9), True),
        "Contrast": (ramp(0.9), True),
        "Sharpness": (ramp(0.9), True),
        "Posterize": (tuple(map(float, POSTERIZE_BITS)), False),
        "Solarize": (tuple(map(float, SOLARIZE_THRESHOLDS)), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
        "Invert": (None, False),
    }


def dali_autoaugment_policy(name: str, *, image_size: int) -> Any:
    """The `nvidia.dali.auto_aug.core.Policy` of `autoaugment` or `autoaugment-v0` for `image_size` squares.

    autoaugment: AUTOAUGMENT_IMAGENET over DALI's augmentations, each given torchvision's magnitudes
    (`autoaugment_space`) as explicit per-bin values; DALI's own parameter mappings turn them into the
    operator's argument (shear factor, offset in pixels, angle, 1 + m for the enhance ops, posterize's bit
    mask, solarize's threshold). autoaugment-v0: DALI's ImageNet policy (the TF/EfficientNet "v0" table)
    with translations up to V0_TRANSLATE pixels, DLE's range.
    """
    import warnings

    import numpy as np
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug import auto_augment
    from nvidia.dali.auto_aug.core import Policy

    if name == "autoaugment-v0":
        return auto_augment.get_image_net_policy(use_shape=False, max_translate_abs=V0_TRANSLATE)
    dali_ops = {
        "ShearX": a.shear_x, "ShearY": a.shear_y,
        "TranslateX": a.translate_x_no_shape, "TranslateY": a.translate_y_no_shape,  # offsets in pixels
        "Rotate": a.rotate, "Brightness": a.brightness, "Color": a.color, "Contrast": a.contrast,
        "Sharpness": a.sharpness, "Posterize": a.posterize, "Solarize": a.solarize,
        "AutoContrast": a.auto_contrast, "Equalize": a.equalize, "Invert": a.invert,
    }
    ops = {
        op: dali_ops[op].augmentation(name=op) if magnitudes is None else dali_ops[op].augmentation(
            mag_range=np.array(magnitudes, dtype=np.float32), randomly_negate=signed, name=op)
        for op, (magnitudes, signed) in autoaugment_space(image_size).items()
    }
    with warnings.catch_warnings():  # the paper's table has an Equalize with probability 0; DALI warns
        warnings.filterwarnings("ignore", message=".* is used with probability 0")
        return Policy(
            name="AutoAugmentImageNet",
            num_magnitude_bins=AUTOAUGMENT_BINS,
            sub_policies=[[(ops[op], p, magnitude) for op, p, magnitude in sub] for sub in AUTOAUGMENT_IMAGENET],
        )


def dali_policy(images: Any, policy: AugmentPolicy, *, image_size: int) -> Any:
    """The policy on a batch of uint8 HWC `image_size` squares inside a DALI graph (CPU or GPU operators)."""
    if policy.name == DEFAULT_POLICY:
        return images
    # DALI 2.4's own suites still call fn.experimental.equalize/filter: building the graph prints two
    # DeprecationWarnings that DALI forces past warning filters. Harmless; nothing for us to change.
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    if policy.name in ("autoaugment", "autoaugment-v0"):
        return auto_augment.apply_auto_augment(
            dali_autoaugment_policy(policy.name, image_size=image_size), images, fill_value=FILL)
    if policy.name == "randaugment":
        return rand_augment.rand_augment(
            images, n=policy.randaugment_n, m=policy.randaugment_m, num_magnitude_bins=MAGNITUDE_BINS,
            shape=(image_size, image_size), fill_value=FILL, max_translate_rel=TRANSLATE_FRACTION)
    return trivial_augment.trivial_augment_wide(
        images, num_magnitude_bins=MAGNITUDE_BINS, fill_value=FILL, max_translate_abs=TRIVIAL_TRANSLATE)


def dali_random_erasing(images: Any, policy: AugmentPolicy, *, image_size: int) -> Any:
    """Erase one box per image with probability `policy.random_erasing`, on normalised HWC `image_size`
    squares: torchvision's sampler written as DALI arithmetic. All ERASE_ATTEMPTS boxes are drawn at once;
    the first that fits (both sides < image_size) is used, none fitting means no erasing."""
    if policy.random_erasing == 0:
        return images
    import numpy as np
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    side, tries = image_size, ERASE_ATTEMPTS
    area = fn.random.uniform(range=list(ERASE_SCALE), shape=[tries]) * float(side * side)  # pixels
    aspect = dmath.exp(fn.random.uniform(range=[math.log(r) for r in ERASE_RATIO], shape=[tries]))
    height = dmath.floor(dmath.sqrt(area * aspect) + 0.5)
    width = dmath.floor(dmath.sqrt(area / aspect) + 0.5)
    fits = fn.cast((height < side) & (width < side), dtype=types.FLOAT)
    # index of the first box that fits, `tries` when none does (no argmax in DALI: a min over the indices)
    first = fn.reductions.min(types.Constant(np.arange(tries, dtype=np.float32)) + tries * (1 - fits))
    pick = fn.cast(dmath.min(first, tries - 1), dtype=types.INT32)
    erase = fn.random.coin_flip(probability=policy.random_erasing, dtype=types.BOOL) & (first < tries)
    box = fn.stack(height[pick], width[pick]) * fn.cast(erase, dtype=types.FLOAT)  # (h, w); (0, 0) erases nothing
    # top-left corner uniform over the positions where the box fits: floor(u * (side - h + 1)), u in [0, 1)
    anchor = dmath.floor(fn.random.uniform(range=[0.0, 1.0], shape=[2]) * (side - box + 1))
    return fn.erase(images, anchor=anchor, shape=box, axis_names="HW", fill_value=0.0)


# --- pytorch (torchvision.transforms.v2) ------------------------------------------------------------------
class TorchvisionPolicy:
    """The policy for Pillow images, one sample at a time: `(image, seed) -> (image, erase box)`.

    The box is (top, left, height, width) in pixels, NO_BOX when nothing is erased; the loader zeroes it on the
    device after normalisation (`erase_boxes_`), so erased pixels are exactly 0 like torchvision's
    RandomErasing(value=0) after Normalize.
    """

    def __init__(self, policy: AugmentPolicy) -> None:
        from torchvision.transforms import InterpolationMode, v2

        self.policy = policy
        warp = dict(interpolation=InterpolationMode.BILINEAR, fill=FILL)
        self.op: Any = None
        if policy.name == "autoaugment":
            self.op = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, **warp)
        elif policy.name == "randaugment":
            self.op = v2.RandAugment(num_ops=policy.randaugment_n, magnitude=policy.randaugment_m,
                                     num_magnitude_bins=MAGNITUDE_BINS, **warp)
        elif policy.name == "trivialaugment":
            self.op = v2.TrivialAugmentWide(num_magnitude_bins=MAGNITUDE_BINS, **warp)
        elif policy.name != DEFAULT_POLICY:  # never a look-alike in its place
            raise PolicyError("augment", policy.name, DALI_ONLY.get(policy.name, "torchvision has no such policy"))
        self.erasing = (v2.RandomErasing(p=1.0, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0)
                        if policy.random_erasing > 0 else None)

    def __call__(self, image: Any, seed: int) -> tuple[Any, tuple[int, int, int, int]]:
        import torch

        box = NO_BOX
        with seeded_cpu_rng(seed):  # torchvision uses the global RNG
            if self.op is not None:
                image = self.op(image)
            # RandomErasing's own coin (its forward: skip when torch.rand(1) >= p), then its own box sampler
            if self.erasing is not None and torch.rand(1).item() < self.policy.random_erasing:
                params = self.erasing.make_params([image])
                if params["v"] is not None:  # None: no box fitted in ERASE_ATTEMPTS tries
                    box = (params["i"], params["j"], params["h"], params["w"])
        return image, box


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """torch's global CPU RNG seeded with `seed` inside, the caller's restored after: torchvision's transforms
    (policies here, mixup/cutmix in training.mix) draw from it. CPU only: torch.manual_seed would reseed every
    CUDA generator too."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def erase_boxes_(images: Any, boxes: Any) -> Any:
    """Set box `(top, left, height, width)` of each image of an (N, C, H, W) batch to 0, in place, on its
    device and without a host sync (one mask for the batch, no per-image loop)."""
    import torch

    top, left, height, width = boxes.to(images.device, non_blocking=True).unbind(1)
    rows = torch.arange(images.shape[2], device=images.device)
    cols = torch.arange(images.shape[3], device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])  # (N, W)
    return images.masked_fill_(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0)
