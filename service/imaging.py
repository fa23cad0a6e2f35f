"""Decode uploaded images into the model's input: uint8 RGB [3, 32, 32].

How an upload becomes an input (documented in the README):

1. Only PNG, JPEG and WebP are opened (anything else is 415). The header is read first; an image
   over ``max_image_pixels`` (width x height) is refused with 413 before its pixels are decoded,
   and Pillow's own decompression-bomb guard is set to the same limit.
2. The EXIF orientation is applied (photos from phones come out upright).
3. The mode becomes RGB: transparency is composited over white, palettes are expanded, greyscale
   is replicated, 16-bit and CMYK images use Pillow's conversions.
4. If it is not 32x32 already, the whole image is resized to 32x32 with Pillow's anti-aliased
   bicubic filter (no crop, the aspect ratio is not kept). 32x32 images pass untouched, so a PNG of
   a CIFAR-10 test image gives exactly the offline model's input.

These functions are CPU-bound and run in a thread pool, never on the event loop.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import BadImage, PayloadTooLarge, UnsupportedMediaType

__all__ = ["ALLOWED_FORMATS", "IMAGE_MEDIA_TYPES", "MEDIA_ALIASES", "decode_image", "encode_png"]

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
MEDIA_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}
"""Content types clients send for the same formats (not in the OpenAPI schema)."""
SIZE = 32


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def decode_image(data: bytes, part: str, *, max_pixels: int) -> np.ndarray:
    """One encoded image -> uint8 [3, 32, 32]; errors name the ``part`` they came from."""
    if not data:
        raise BadImage(f"{part}: empty image", part=part)
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise PayloadTooLarge(
                        f"{part}: image is {w}x{h} = {w * h} pixels, over the limit of "
                        f"{max_pixels}",
                        part=part,
                    )
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
                if rgb.size != (SIZE, SIZE):
                    rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
                arr = np.asarray(rgb, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's message cites twice the limit past that point: name the limit enforced
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{size.group(1)} pixels" if size else "too many pixels"
        raise PayloadTooLarge(
            f"{part}: image is {pixels}, over the limit of {max_pixels} (decompression-bomb guard)",
            part=part,
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"{part}: not a PNG, JPEG or WebP image (could not identify the format)", part=part
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"{part}: image does not decode: {exc}", part=part) from None
    if arr.shape != (SIZE, SIZE, 3):
        raise BadImage(f"{part}: decoded to an unexpected shape {arr.shape}", part=part)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def encode_png(chw: np.ndarray) -> bytes:
    """uint8 [3, H, W] -> PNG bytes (lossless; used by tests, examples and the benchmark)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(buf, format="PNG")
    return buf.getvalue()
