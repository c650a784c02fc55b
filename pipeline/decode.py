"""Decoding encoded images and masks into arrays, with one clear reason when a file cannot be used.

Images become RGB uint8 (H, W, 3) whatever the input: EXIF orientation applied; grayscale, palette, RGBA,
CMYK, 16-bit, 32-bit integer and float inputs converted (scaled to 0..255, or rejected with their value range).
Masks stay integer class ids (H, W) uint8. Images over a pixel limit are rejected from their header, before any
pixel is decoded. Only the raster formats below are ever opened: a PostScript or PDF file named `.jpg` is "not a
recognised image format" and never reaches an external interpreter (Ghostscript).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Pillow plugins tried on any file (JPEG opens multi-picture MPO files too; GIF: palette masks).
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
# 64 MP: a 8000x8000 photo is fine, a decompression bomb is not.
DEFAULT_MAX_PIXELS = 64_000_000
_EXIF_ORIENTATION = 0x0112

# We check sizes ourselves (with a clearer message); Pillow's own bomb check must not fire first.
Image.MAX_IMAGE_PIXELS = None
Image.init()  # register every plugin now, so that `formats=` names only ones Pillow knows


class DecodeError(ValueError):
    """The bytes are not a usable image or mask; the message says why."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise any type on damaged headers: one errors/ row, the type named
        raise DecodeError(f"truncated or corrupt image header ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise DecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise DecodeError(f"image is {w}x{h} ({w * h / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP limit (--max-pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise any type on damaged data: one errors/ row, the type named
        raise DecodeError(f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
    return img


def _orient(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image
        return img
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel data of a mode other than L scaled to 0..255:

    - "F" (float): 0..1 is scaled by 255, 0..255 is kept; any other range (or NaN) is rejected;
    - "I;16*" (16-bit): the high byte;
    - "I" (32-bit integer): 0..255 is kept, 0..65535 (16-bit data) keeps the high byte, anything else is rejected.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        return arr.astype(np.uint8)
    low, high = arr.min(), arr.max()
    if mode == "F":
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255:
            raise DecodeError(f"float image values range {low:g}..{high:g}; expected 0..1 or 0..255")
        return np.rint(arr * 255.0 if high <= 1.0 else arr).astype(np.uint8)
    if low < 0 or high > 65535:
        raise DecodeError(f"{mode} image values range {low}..{high}; expected 0..255 or 0..65535")
    if mode == "I" and high <= 255:
        return arr.astype(np.uint8)
    return (arr.astype(np.uint32) >> 8).astype(np.uint8)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 array (H, W, 3), EXIF orientation applied."""
    img = _orient(_open(data, max_pixels))
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode.startswith("I") or mode == "F":
        gray = _to_uint8(np.asarray(img), mode)
        arr = np.repeat(gray[:, :, None], 3, axis=2)
    else:  # L, 1, P, PA, LA, RGBA, CMYK, YCbCr, LAB, HSV ...
        try:
            arr = np.asarray(img.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - a mode Pillow cannot convert: one errors/ row, the reason named
            raise DecodeError(f"unsupported image mode {mode} ({e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DecodeError(f"unsupported image mode {mode} (decoded to {arr.dtype} {arr.shape})")
    return np.ascontiguousarray(arr)


def decode_mask(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded mask bytes -> class ids (H, W) uint8. Palette indices are class ids, as in VOC."""
    img = _orient(_open(data, max_pixels))
    mode = img.mode
    if mode in ("P", "L"):
        arr = np.asarray(img)
    elif mode == "1":
        arr = np.asarray(img).astype(np.uint8)
    elif mode.startswith("I"):
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise DecodeError(f"mask values range {values.min()}..{values.max()}; class ids must fit 0..255")
        arr = values.astype(np.uint8)
    else:
        raise DecodeError(f"mask has mode {mode}; masks must be single-channel class ids (palette or grayscale PNG)")
    return np.ascontiguousarray(arr)
