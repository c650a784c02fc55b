"""Decoding encoded images and masks into arrays, with one clear reason when a file cannot be used.

Images become RGB uint8 (H, W, 3) whatever the input: EXIF orientation applied; grayscale, palette, RGBA,
CMYK and 16-bit inputs converted. Masks stay integer class ids (H, W) uint8. Images over a pixel limit are
rejected from their header, before any pixel is decoded.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# 64 MP: a 8000x8000 photo is fine, a decompression bomb is not.
DEFAULT_MAX_PIXELS = 64_000_000
_EXIF_ORIENTATION = 0x0112

# We check sizes ourselves (with a clearer message); Pillow's own bomb check must not fire first.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """The bytes are not a usable image or mask; the message says why."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except Exception as e:  # damaged headers raise all kinds of errors inside Pillow's plugins
        raise DecodeError(f"truncated or corrupt image header ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise DecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise DecodeError(f"image is {w}x{h} ({w * h / 1e6:.1f} MP), over the {max_pixels / 1e6:.1f} MP limit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
    except Exception as e:
        raise DecodeError(f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
    return img


def _orient(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not cost the image
        return img
    return ImageOps.exif_transpose(img) if orientation not in (None, 1) else img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """High bit-depth or float single-channel data scaled to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    # 16-bit integer data ("I;16*", or "I" holding 16-bit values): keep the high byte.
    return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 array (H, W, 3), EXIF orientation applied."""
    img = _orient(_open(data, max_pixels))
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode.startswith("I") or mode == "F":
        gray = _to_uint8(np.asarray(img))
        arr = np.repeat(gray[:, :, None], 3, axis=2)
    else:  # L, 1, P, PA, LA, RGBA, CMYK, YCbCr, LAB, HSV ...
        try:
            arr = np.asarray(img.convert("RGB"))
        except Exception as e:
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
