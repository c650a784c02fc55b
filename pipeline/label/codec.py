"""The `label_map` cell: a uint8 (H, W) array of class ids as bytes, "raw" (row-major) or "png" (palette PNG)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from models import flat_palette

ENCODINGS = ("raw", "png")


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
        arr = np.asarray(Image.open(io.BytesIO(data)))
        if arr.shape != (height, width):
            raise ValueError(f"PNG label map is {arr.shape}, expected {(height, width)}")
        return arr
    raise ValueError(f"unknown label encoding {encoding!r}")
