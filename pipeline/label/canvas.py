"""Preprocessing for labeling that depends on the image alone: resize the long side to at most `max_side`
(aspect kept, Pillow bilinear with antialias), then edge-pad bottom/right to a canvas whose sides are the next
multiples of `canvas_multiple` (see pipeline.label.inference for why).

numpy and Pillow only: the decode tasks that run this must not pay torch's import in every fresh worker.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .tiling import Tiling


def target_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(h, w) the model sees: the long side at most `max_side`, aspect ratio kept."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def canvas_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


@dataclass
class Prepared:
    """A preprocessed image: uint8 canvas (Hc, Wc, 3) holding the image resized to (resized_h, resized_w)
    at the top left; (height, width) is its original size, at which label maps come back."""

    canvas: np.ndarray
    resized_h: int
    resized_w: int
    height: int
    width: int


def preprocess(rgb: np.ndarray, max_side: int | None, canvas_multiple: int, tiling: Tiling | None = None) -> Prepared:
    """RGB uint8 (H, W, 3) -> canvas, as a function of the image alone (see the module docstring). An image that
    `tiling` applies to keeps its own size: its "canvas" is the image itself, cut into tiles by the actor."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    if tiling is not None and tiling.applies(height, width):
        return Prepared(np.ascontiguousarray(rgb), height, width, height, width)
    h, w = target_size(height, width, max_side)
    if (h, w) != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    ch, cw = canvas_size(h, w, canvas_multiple)
    if (ch, cw) != (h, w):
        rgb = np.pad(rgb, ((0, ch - h), (0, cw - w), (0, 0)), mode="edge")
    return Prepared(np.ascontiguousarray(rgb), h, w, height, width)
