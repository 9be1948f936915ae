"""Every augmentation and normalisation parameter of every backend, defined once.

The DALI graphs, the PyTorch/Pillow baseline, the synthetic backend and the tests all import these, so a
change here changes all of them together and the backends stay comparable.
"""

from __future__ import annotations

import math

#: ImageNet per-channel mean and standard deviation, RGB, as fractions of full scale (torchvision's values).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Full scale of a decoded 8-bit pixel; mean/std are multiplied by it for operators that see uint8 pixels.
PIXEL_MAX = 255.0

DEFAULT_IMAGE_SIZE = 224  # pixels, side of the square the model sees

# --- train ---------------------------------------------------------------------------------------------
#: Random-resized crop: fraction of the source image area kept (Inception-style; `crop_area` overrides it).
CROP_AREA: tuple[float, float] = (0.08, 1.0)
#: Random-resized crop: width/height ratio range.
CROP_ASPECT: tuple[float, float] = (3 / 4, 4 / 3)
#: Tries at drawing a crop that fits the image before falling back to a centre crop (DALI and torchvision).
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5
#: Samples in the reader's shuffle buffer per rank. Shards are globally shuffled at write time and the shard
#: order changes every epoch, so the buffer only has to mix neighbouring shards.
SHUFFLE_BUFFER = 4096  # samples

# --- val -----------------------------------------------------------------------------------------------
#: Val resizes the shorter side to image_size / VAL_RESIZE_RATIO (224 -> 256), then centre-crops image_size.
VAL_RESIZE_RATIO = 0.875


def val_resize_size(image_size: int) -> int:
    """Shorter side (pixels) val images are resized to before the centre crop: 256 for 224."""
    return int(round(image_size / VAL_RESIZE_RATIO))


def val_resized_shape(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels after the val resize: shorter side val_resize_size(image_size), longer side
    scaled and rounded half up -- DALI's rule (torchvision truncates), so all backends crop the same pixels."""
    short = val_resize_size(image_size)
    if width <= height:
        return short, max(short, math.floor(height * short / width + 0.5))
    return max(short, math.floor(width * short / height + 0.5)), short


def centre_crop_offset(length: int, crop: int) -> int:
    """Offset (pixels) of a centred crop, halves rounded up like DALI's crop (Python's round() would round
    half to even and land one pixel off)."""
    return math.floor((length - crop) / 2 + 0.5)


# --- DALI GPU decoder (values from NVIDIA DeepLearningExamples' ImageNet pipelines) ---------------------
#: Share of JPEGs sent to the A100/H100 hardware decoder, the rest go to the CUDA decoder.
HW_DECODER_LOAD = 0.65
#: nvJPEG scratch buffers preallocated so the first large JPEGs do not trigger reallocations.
DEVICE_MEMORY_PADDING = 211_025_920  # bytes
HOST_MEMORY_PADDING = 140_544_512  # bytes
#: Largest ImageNet train image, so the hardware decoder preallocates once.
PREALLOCATE_WIDTH_HINT = 5_980  # pixels
PREALLOCATE_HEIGHT_HINT = 6_430  # pixels
