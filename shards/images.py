"""Deciding, per source file, whether its bytes can go into a shard untouched, must become RGB JPEG, or are rejected.

The fast path is the common one: an RGB JPEG with an end-of-image marker and no EXIF rotation is packed
byte-identical after a marker scan of its header (microseconds) and, by default (`check="decode"`), a strict
decode: libjpeg-turbo (through `simplejpeg`) decodes the whole entropy-coded stream at 1/8 scale and any
libjpeg warning is an error. A JPEG whose data is corrupt mid-file ("Corrupt JPEG data: premature end of data
segment", bytes flipped by a bad disk or a broken download) decodes with only a warning in Pillow, DALI's CPU
decoder and torchvision, and would be trained on as grey blocks; it is rejected here instead. `check="header"`
skips that decode (about 1 ms per image; see docs/benchmarks.md) for trusted sources.

A header whose width x height exceeds `max_pixels` is rejected before anything is decoded (a decompression
bomb: a few KB that claims 60000 x 60000 pixels would stop a loader mid-epoch or exhaust its memory).

Everything else is decoded with Pillow (or Pillow-SIMD when installed: same API) and re-encoded, and the
reason is recorded:

- CMYK / grayscale JPEGs, PNG or any other format -> RGB JPEG (DALI's and Pillow's decoders then agree).
- EXIF Orientation != 1 -> pixels rotated upright and the tag dropped. DALI applies EXIF orientation when it
  decodes and plain Pillow does not, so leaving the tag in would make the `dali-*` and `pytorch` backends
  see different images.
- `max_size`: a longer side above it is shrunk (like FFCV's max_resolution).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

_EOI = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112
# Bytes allowed after the end-of-image marker (some encoders pad) before a JPEG counts as suspicious.
_EOI_TAIL = 32  # bytes

#: Largest width x height packed by default: Pillow's own decompression-bomb limit (about 9459 x 9459).
#: ImageNet-1k's largest image has 38 megapixels; `--max-pixels` raises it for data sets with larger images.
DEFAULT_MAX_PIXELS = 89_478_485  # pixels
CHECKS = ("decode", "header")  # what the converter checks of a pass-through JPEG: strict decode, or header only


class RejectedImage(Exception):
    """This file cannot be packed; `str(err)` is the reason recorded in the manifest."""


def _ends_with_eoi(data: bytes) -> bool:
    return _EOI in data[-_EOI_TAIL:]


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame; not DHT, JPG, DAC


def plain_rgb_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) if `data` is an 8-bit, 3-component JPEG without an EXIF orientation other than 1 that
    ends with its end-of-image marker; None for anything else (which then takes Pillow's full path).

    A marker walk up to the first frame header: ~5 us instead of Pillow's ~70 us `Image.open`, which was the
    largest Python cost per image when packing at `tar` speed.
    """
    if data[:2] != b"\xff\xd8" or not _ends_with_eoi(data):
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        segment = data[pos + 4 : pos + 2 + length]
        if marker in _SOF_MARKERS:
            if len(segment) < 6 or segment[0] != 8 or segment[5] != 3:
                return None
            return int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big")
        if marker == 0xE1 and segment[:6] == b"Exif\0\0" and _exif_orientation(segment[6:]) not in (0, 1):
            return None
        if marker == 0xDA:  # start of scan before any frame header: malformed, let Pillow decide
            return None
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 when absent, -1 when unreadable."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return -1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return -1
    for i in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        if len(entry) < 12:
            return -1
        if int.from_bytes(entry[0:2], order) == _EXIF_ORIENTATION:
            return int.from_bytes(entry[8:10], order)
    return 1


def strict_decode_problem(data: bytes) -> tuple[str, str] | None:
    """None if libjpeg-turbo decodes all of `data` without a single warning; else (kind, libjpeg's message) with
    kind "corrupt" (it decodes, but only with warnings: damaged entropy-coded data) or "unsupported" (the
    TurboJPEG API cannot read it at all, e.g. an unusual chroma subsampling; Pillow may still).

    Decoding at 1/8 scale still reads and Huffman-decodes every byte of the scan, so corruption is found, and
    costs about a third of a full decode.
    """
    try:
        import simplejpeg
    except ImportError:  # a dependency, but machines assembled by hand (a GPU node) may lack it
        raise RuntimeError("the strict JPEG check (--check decode, verify --decode) needs the simplejpeg package: "
                           "pip install simplejpeg, or convert with --check header") from None
    try:
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
        return None
    except ValueError as strict_error:
        try:
            simplejpeg.decode_jpeg(data, strict=False, min_height=1, min_width=1)
        except ValueError:
            return "unsupported", str(strict_error)
        return "corrupt", str(strict_error)


def _strict_check(data: bytes) -> str | None:
    """None when the strict decode passes; raises RejectedImage for corrupt data; else the "unsupported" reason."""
    problem = strict_decode_problem(data)
    if problem is None:
        return None
    kind, message = problem
    if kind == "corrupt":
        raise RejectedImage(f"corrupt JPEG data ({message})")
    return message


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise RejectedImage(f"header claims {width}x{height} = {width * height} pixels, above --max-pixels "
                            f"{max_pixels} (decompression bomb?)")


def prepare_image(
    data: bytes, *, max_size: int | None = None, quality: int = 90, check: str = "decode",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[bytes, str | None]:
    """Return (JPEG bytes to pack, reason it was converted or None if packed untouched).

    Raises RejectedImage with the reason for zero-byte, non-image, truncated, corrupt, undecodable or
    oversized (`max_pixels`) input. `check="decode"` strictly decodes every pass-through JPEG (see the module
    docstring); `"header"` trusts a well-formed header.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if not data:
        raise RejectedImage("zero-byte file")
    size = plain_rgb_jpeg_size(data)
    problem = None  # what the strict decode found, once it ran
    if size is not None:
        _check_pixels(*size, max_pixels)
        if max_size is None or max(size) <= max_size:
            if check == "header" or (problem := _strict_check(data)) is None:
                return data, None
            # the TurboJPEG API cannot read it: Pillow decides below, and re-encodes what it can read
    previous = Image.MAX_IMAGE_PIXELS  # Pillow's own bomb check reads this global: set it for this open only
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RejectedImage(f"above --max-pixels {max_pixels} (decompression bomb? {err})") from None
    except UnidentifiedImageError as err:
        raise RejectedImage(f"not an image ({type(err).__name__})") from None
    except (OSError, SyntaxError, ValueError) as err:
        kind = "JPEG" if data[:2] == b"\xff\xd8" else "image"
        reason = "truncated" if "runcated" in str(err) else "unreadable header of"
        raise RejectedImage(f"{reason} {kind} ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    _check_pixels(*img.size, max_pixels)

    reasons = []
    if img.format != "JPEG":
        reasons.append(f"{img.format} source")
    elif img.mode != "RGB":
        reasons.append(f"{img.mode} JPEG")
    if _orientation(img) not in (0, 1):
        reasons.append("EXIF orientation")
    if max_size is not None and max(img.size) > max_size:
        reasons.append(f"longer side {max(img.size)} > {max_size}")

    if img.format == "JPEG" and check == "decode":
        # Every JPEG source, also one that is converted (grayscale, CMYK, rotated, shrunk): Pillow would decode
        # damaged data with only a warning and the re-encoded JPEG would carry the damage as clean pixels.
        if problem is None:  # not checked yet (the header said not plain RGB, or too large for --max-size)
            problem = _strict_check(data)  # raises RejectedImage for corrupt data
        if problem is not None and not reasons:
            reasons.append(f"JPEG the TurboJPEG API cannot read ({problem})")
    if not reasons:
        if check == "decode" or not _ends_with_eoi(data):
            _decode(img)  # raises RejectedImage for truncated/undecodable data
        return data, None

    img = _decode(img)
    img = ImageOps.exif_transpose(img)
    if max_size is not None and max(img.size) > max_size:
        img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    if img.mode != "RGB":
        # Palette/alpha sources are flattened onto white (what a browser shows), not onto black.
        if img.mode in ("RGBA", "LA", "P", "PA"):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        elif img.mode.startswith("I"):
            # 16-bit grayscale (PNG "I;16", or "I" holding 16-bit values): Pillow's convert("RGB") clips at 255
            # and the image comes out nearly all white; keep the top 8 bits instead
            import numpy as np

            pixels = (np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, "L").convert("RGB")
        else:
            img = img.convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, optimize=False)
    return out.getvalue(), ", ".join(reasons)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF is common in scraped data and must not reject the image
        return 1


def _decode(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except OSError as err:
        reason = "truncated" if "truncated" in str(err) else "undecodable"
        raise RejectedImage(f"{reason} {img.format or 'image'} ({err})") from None
    except (SyntaxError, ValueError) as err:
        raise RejectedImage(f"undecodable {img.format or 'image'} ({err})") from None
    return img
