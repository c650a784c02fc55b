"""Joint image/mask transforms: images resized bilinearly, masks always nearest-neighbour.

Arrays are uint8 HWC images and HW masks; normalisation to the model's input convention happens on the
training device (models.InputConvention.normalize), so the data pipeline moves 4x fewer bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from models import VOID_LABEL

from ..errors import UsageError


@dataclass(frozen=True)
class TrainTransform:
    """Random scale, random crop to `crop_size` (mask padded with void), random horizontal flip."""

    crop_size: int = 320
    min_scale: float = 0.5
    max_scale: float = 2.0
    flip: bool = True
    image_fill: int = 0
    mask_fill: int = VOID_LABEL

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise UsageError(f"crop size must be >= 1, got {self.crop_size}")
        if not (0 < self.min_scale <= self.max_scale):
            raise UsageError(f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = mask.shape
        scale = rng.uniform(self.min_scale, self.max_scale)
        nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
        if (nw, nh) != (w, h):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
        c = self.crop_size
        pad_h, pad_w = max(0, c - nh), max(0, c - nw)
        if pad_h or pad_w:  # pad bottom/right; padded mask pixels are void, so they carry no loss
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=self.image_fill)
            mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=self.mask_fill)
        top = int(rng.integers(0, mask.shape[0] - c + 1))
        left = int(rng.integers(0, mask.shape[1] - c + 1))
        image = image[top:top + c, left:left + c]
        mask = mask[top:top + c, left:left + c]
        if self.flip and rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)
