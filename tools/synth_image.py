"""One synthetic image: its class's look, its size, its pixels and its file bytes (with a quirk, if it has one).

At `scale=1` the images have ImageNet's shape as a decoder sees it: mean ~400x350 px, shorter side mostly
300-500 px with a few percent up to ~1500 px, JPEG quality 75-95, mixed chroma subsampling (4:2:0, 4:2:2,
4:4:4), and a mean file size near 110 KB (110.6 KB measured over 1,000 images). That last figure is why images
carry photo-like detail (smooth light, class stripes, soft-edged shapes, multi-octave texture, colour grain):
flat colour would decode several times faster than real photos and make every loader benchmark a lie.
Rendering costs ~10 ms of one core per image at scale 1 (~100 images/s per core), ~2 ms at scale 0.25.

Every function draws from the generator it is given; tools.synth decides how generators are seeded.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass

import numpy as np

#: Oddities real ImageNet files have, in the order they are assigned (and recorded in synth.json).
QUIRK_KINDS: tuple[str, ...] = ("cmyk", "grayscale", "png", "progressive", "exif_rotated")
EXIF_ORIENTATION_TAG = 0x0112

# --- image shape at scale 1 (ImageNet-like) -----------------------------------------------------------
_LARGE_FRACTION = 0.03  # share of images in the large tail
_SHORT_SIDE = (290.0, 300.0, 390.0)  # px, triangular (low, mode, high) of the body's shorter side
_LARGE_SHORT_SIDE = (500.0, 1000.0)  # px, uniform shorter side of the large tail
_MAX_SIDE = 1500  # px, longer side cap
_ASPECTS = (1.0, 1.0, 1.2, 1.25, 4 / 3, 4 / 3, 4 / 3, 1.5)  # longer/shorter, drawn uniformly
_LANDSCAPE_FRACTION = 0.8
_QUALITY = (75, 95)  # inclusive JPEG quality range
_SUBSAMPLING = (2, 1, 0)  # PIL codes for 4:2:0, 4:2:2, 4:4:4
_SUBSAMPLING_P = (0.55, 0.15, 0.30)

# --- texture calibration: these set the mean file size (110.6 KB over 1,000 images at scale 1) -------------
_TEXTURE_AMPLITUDE = 40.0  # grey levels per unit of octave noise, before the per-class roughness
_OCTAVES = ((16, 0.5), (8, 0.6), (4, 1.0), (2, 2.0))  # (downsampling factor, relative amplitude)
_GRAIN = 25.0  # grey levels, std of the full-resolution colour grain (uniform per channel)
_SHAPE_KINDS = ("ellipse", "rectangle", "triangle", "diamond")
_HUE_NAMES = ("red", "orange", "amber", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
              "magenta")


@dataclass(frozen=True)
class ClassLook:
    """What makes one class recognisable: every image of the class is drawn around these values."""

    palette: tuple[tuple[float, float, float], ...]  # 4 RGB colours, 0-255: 2 background, 2 shape colours
    stripe_angle: float  # radians, dominant orientation of the background stripes
    stripe_frequency: float  # cycles across the longer side
    shape: str  # one of _SHAPE_KINDS
    roughness: float  # multiplies the texture amplitude
    clutter: int  # mean number of small shapes


def class_look(rng: np.random.Generator) -> ClassLook:
    """The look of one class, drawn from `rng` (tools.synth seeds it with (seed, class))."""
    hue = rng.random()
    palette = []
    # Background pair around the class hue (one bright, one dark) + two contrasting shape colours.
    for hue_shift, saturation, value in ((0.0, 0.7, 0.75), (0.08, 0.5, 0.35), (0.5, 0.8, 0.85), (0.55, 0.3, 0.6)):
        h = (hue + hue_shift + rng.normal(0, 0.03)) % 1.0
        s = float(np.clip(saturation + rng.normal(0, 0.15), 0.1, 1.0))
        v = float(np.clip(value + rng.normal(0, 0.1), 0.15, 0.9))
        palette.append(tuple(255.0 * c for c in colorsys.hsv_to_rgb(h, s, v)))
    return ClassLook(
        palette=tuple(palette),
        stripe_angle=float(rng.uniform(0, math.pi)),
        stripe_frequency=float(math.exp(rng.uniform(math.log(2), math.log(14)))),
        shape=_SHAPE_KINDS[int(rng.integers(len(_SHAPE_KINDS)))],
        roughness=float(rng.uniform(0.6, 1.4)),
        clutter=int(rng.integers(10, 60)),
    )


def class_name(look: ClassLook) -> str:
    """A human-readable name that describes the look (`amber ellipses on 45-degree stripes`)."""
    r, g, b = (c / 255.0 for c in look.palette[0])
    hue = colorsys.rgb_to_hsv(r, g, b)[0]
    colour = _HUE_NAMES[int(round(hue * len(_HUE_NAMES))) % len(_HUE_NAMES)]
    return f"{colour} {look.shape}s on {round(math.degrees(look.stripe_angle))}-degree stripes"


# --- one image ---------------------------------------------------------------------------------------------
def image_size(rng: np.random.Generator, scale: float) -> tuple[int, int]:
    """(width, height) in px: an ImageNet-like body plus a tail of large images, times `scale`."""
    if rng.random() < _LARGE_FRACTION:
        short = rng.uniform(*_LARGE_SHORT_SIDE)
    else:
        short = rng.triangular(*_SHORT_SIDE)
    long = min(short * _ASPECTS[int(rng.integers(len(_ASPECTS)))], _MAX_SIDE)
    width, height = (long, short) if rng.random() < _LANDSCAPE_FRACTION else (short, long)
    return max(8, round(width * scale)), max(8, round(height * scale))


def _upsample(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a float32 plane to (height, width)."""
    from PIL import Image

    return np.array(Image.fromarray(plane, "F").resize((width, height), Image.Resampling.BILINEAR))


def _draw_shape(draw, kind: str, cx: float, cy: float, w: float, h: float, colour: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if kind == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif kind == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif kind == "triangle":
        draw.polygon(((cx, y0), (x1, y1), (x0, y1)), fill=colour)
    else:
        draw.polygon(((cx, y0), (x1, cy), (cx, y1), (x0, cy)), fill=colour)


def _offset_lut(gain: float) -> list[int]:
    """A 256-entry lookup table that scales a value's distance from 128 by `gain` (clipped to 0-255)."""
    return np.clip(np.rint(128.0 + (np.arange(256) - 128.0) * gain), 0, 255).astype(np.uint8).tolist()


def _colour(rgb: tuple[float, float, float], gain: float) -> tuple[int, int, int]:
    return tuple(int(min(255.0, max(0.0, c * gain))) for c in rgb)


def render(rng: np.random.Generator, look: ClassLook, width: int, height: int):
    """An upright RGB image of the class and the box (x0, y0, x1, y1) in px of its main object.

    Everything but the grain is built at half resolution or below (a quarter of the pixels), then one resize
    and one add in PIL's C code finish it: smooth light and class stripes at 1/8, shapes and texture octaves
    (1/16 to 1/2) at 1/2, colour grain at full resolution. Half-resolution shapes get soft edges, like a photo.
    """
    from PIL import Image, ImageChops, ImageDraw

    longer = float(max(width, height))
    half_w, half_h = max(2, width // 2), max(2, height // 2)
    low_w, low_h = max(2, math.ceil(width / 8)), max(2, math.ceil(height / 8))
    x = np.linspace(0, width / longer, low_w, dtype=np.float32)[None, :]
    y = np.linspace(0, height / longer, low_h, dtype=np.float32)[:, None]

    angle = look.stripe_angle + rng.normal(0, 0.15)
    frequency = look.stripe_frequency * rng.uniform(0.8, 1.25)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * frequency * (x * math.cos(angle) + y * math.sin(angle)) + phase)
    # Smooth structure: four slow waves in random directions (0.3-1.5 cycles across the longer side).
    wave_angle = rng.uniform(0, 2 * math.pi, 4)
    wave_freq = rng.uniform(0.3, 1.5, 4)
    wave_phase = rng.uniform(0, 2 * math.pi, 4)
    smooth = sum(
        np.cos(2 * np.pi * f * (x * math.cos(a) + y * math.sin(a)) + p)
        for a, f, p in zip(wave_angle, wave_freq, wave_phase, strict=True)
    ) / 4.0
    light = 0.75 + 0.3 * smooth + rng.uniform(-0.2, 0.2) * (x - 0.5)
    mix = (0.7 * stripes + 0.15 * (1.0 + smooth))[..., None]
    palette = np.asarray(look.palette, dtype=np.float32)
    base = (palette[0] * (1.0 - mix) + palette[1] * mix) * light[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    image = image.resize((half_w, half_h), Image.Resampling.BICUBIC)

    # Shapes, in full-resolution coordinates drawn at half scale: class-shaped clutter, then 1-3 big objects.
    draw = ImageDraw.Draw(image)
    to_half = half_w / width, half_h / height
    clutter = int(rng.integers(look.clutter // 2, look.clutter * 3 // 2 + 1))
    for i, (px, py, ps, pa, pg) in enumerate(rng.random((clutter, 5))):
        side = (0.02 + 0.06 * ps) * longer
        _draw_shape(draw, look.shape, px * half_w, py * half_h, side * to_half[0], side * (0.5 + pa) * to_half[1],
                    _colour(look.palette[2 + i % 2], 0.6 + 0.6 * pg))
    box = (0, 0, width, height)
    for i in range(int(rng.integers(1, 4))):
        w, h = rng.uniform(0.15, 0.5) * width, rng.uniform(0.15, 0.5) * height
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        _draw_shape(draw, look.shape, cx * to_half[0], cy * to_half[1], w * to_half[0], h * to_half[1],
                    _colour(look.palette[2 + i % 2], rng.uniform(0.7, 1.1)))
        if i == 0:  # the main object: the first shape drawn big, as a Kaggle-style box
            box = (max(0, math.floor(cx - w / 2)), max(0, math.floor(cy - h / 2)),
                   min(width, math.ceil(cx + w / 2)), min(height, math.ceil(cy + h / 2)))

    # Texture: octaves of noise, coarse to fine, each upsampled into the next; strongest where the smooth
    # field is bright so an image has both detailed and calm regions, like a photo. A per-image tint makes it
    # move chroma as well as luminance.
    div0 = _OCTAVES[0][0]
    texture = rng.standard_normal((max(2, height // div0), max(2, width // div0)), dtype=np.float32)
    for div, amplitude in _OCTAVES[1:]:
        oct_h, oct_w = (half_h, half_w) if div == 2 else (max(2, height // div), max(2, width // div))
        texture = _upsample(texture, oct_w, oct_h)
        texture += amplitude * rng.standard_normal((oct_h, oct_w), dtype=np.float32)
    mask = _upsample(np.clip(0.8 * (1.0 + smooth) - 0.3, 0.05, 1.0).astype(np.float32), half_w, half_h)
    texture *= mask * np.float32(_TEXTURE_AMPLITUDE * look.roughness * rng.lognormal(0.0, 0.25))
    tint = rng.uniform(0.6, 1.4, 3).astype(np.float32)
    detailed = np.asarray(image, dtype=np.float32) + texture[..., None] * tint
    image = Image.fromarray(np.clip(detailed, 0, 255, out=detailed).astype(np.uint8), "RGB")
    image = image.resize((width, height), Image.Resampling.BILINEAR)

    # Sensor-like colour grain, uniform in +-amplitude per channel: cheap uint8 draws, mapped by a LUT.
    grain_gain = _GRAIN * math.sqrt(3.0) * rng.lognormal(0.0, 0.3) / 128.0
    grain = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    grain = grain.point(_offset_lut(grain_gain) * 3)
    return ImageChops.add(image, grain, scale=1.0, offset=-128), box


def encode(image, rng: np.random.Generator, quirk: str | None) -> tuple[bytes, tuple[int, int], int]:
    """File bytes for `image` with its quirk, the stored (width, height) in px, and the EXIF orientation (1
    when the pixels are stored upright)."""
    from PIL import Image, ImageFile

    quality = int(rng.integers(_QUALITY[0], _QUALITY[1] + 1))
    subsampling = int(rng.choice(_SUBSAMPLING, p=_SUBSAMPLING_P))
    options: dict = {"format": "JPEG", "quality": quality, "subsampling": subsampling}
    orientation = 1
    if quirk == "cmyk":
        image = image.convert("CMYK")
    elif quirk == "grayscale":
        image = image.convert("L")
    elif quirk == "png":
        options = {"format": "PNG", "compress_level": 1}  # level 1: PNG is the slow path, size is not the point
    elif quirk == "progressive":
        options["progressive"] = True
    elif quirk == "exif_rotated":
        # Like a camera held sideways: pixels stored as the sensor saw them, the tag says how to turn them
        # (6: rotate 90 degrees clockwise to view, 8: counter-clockwise). exif_transpose() gives back `image`.
        orientation = int(rng.choice((6, 8)))
        image = image.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        options["exif"] = exif.tobytes()
    elif quirk is not None:
        raise ValueError(f"unknown quirk {quirk!r}; expected one of {QUIRK_KINDS}")
    buffer = io.BytesIO()
    # Pillow sizes a progressive encode's whole-image buffer at width*height bytes, and grainy 4:4:4 images at
    # high quality exceed it ("Suspension not allowed here"). Its floor is ImageFile.MAXBLOCK; the buffer size
    # does not change the bytes written.
    saved_maxblock = ImageFile.MAXBLOCK
    ImageFile.MAXBLOCK = max(saved_maxblock, 3 * image.size[0] * image.size[1] + 65536)
    try:
        image.save(buffer, **options)
    finally:
        ImageFile.MAXBLOCK = saved_maxblock
    return buffer.getvalue(), image.size, orientation


def stored_box(box: tuple[int, int, int, int], width: int, height: int, orientation: int):
    """The upright box (x0, y0, x1, y1) of a (width x height) image in the stored pixels' frame."""
    x0, y0, x1, y1 = box
    if orientation == 6:  # stored = upright turned 90 degrees counter-clockwise
        return y0, width - x1, y1, width - x0
    if orientation == 8:  # stored = upright turned 90 degrees clockwise
        return height - y1, x0, height - y0, x1
    return box
