"""The `label_map` cell: a uint8 (H, W) array of class ids as bytes, "raw" (row-major) or "png" (palette PNG)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models import flat_palette

ENCODINGS = ("raw", "png")
# The row states the map's size, and it is checked from the PNG's header before any pixel is decoded: Pillow's own
# bomb limit (89 MP warns, 179 MP refuses) would refuse the label maps of tiled 100-700 MP images (--tile).
Image.MAX_IMAGE_PIXELS = None


def encode_label_map(label: np.ndarray, encoding: str) -> bytes:
    """uint8 (H, W) class ids -> bytes: "raw" (row-major) or "png" (palette PNG, pixel value = class id)."""
    if encoding == "raw":
        return np.ascontiguousarray(label, dtype=np.uint8).tobytes()
    if encoding == "png":
        img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
        img.putpalette(flat_palette())  # mode L -> P: pixel values stay the class ids
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown label encoding {encoding!r}; use raw or png")


def decode_label_map(data: bytes, encoding: str, height: int, width: int) -> np.ndarray:
    """A `label_map` cell back to a (height, width) uint8 array of class ids."""
    if encoding == "raw":
        return np.frombuffer(data, np.uint8).reshape(height, width)
    if encoding == "png":
        img = Image.open(io.BytesIO(data))
        if img.size != (width, height):
            raise ValueError(f"PNG label map is {img.size[1]}x{img.size[0]} (height x width), expected {height}x{width}")
        arr = np.asarray(img)
        if arr.shape != (height, width):
            raise ValueError(f"PNG label map is {arr.shape}, expected {(height, width)}")
        return arr
    raise ValueError(f"unknown label encoding {encoding!r}")
