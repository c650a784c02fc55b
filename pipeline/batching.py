"""Fixed-slot batches of equal-shape images, and the device input made of them: the one way both jobs feed a
model (labeling's Predictor, training's validation and evaluate.py, the training step).

Every forward pass for one image shape has the same number of slots (unused ones zero): convolution kernels are
chosen per shape, so a fixed shape keeps an image's arithmetic the same whatever its batch neighbours.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.convention import Normalizer


def fixed_slot_batch(images: Sequence[np.ndarray], slots: int, *, pin: bool = False) -> torch.Tensor:
    """n <= slots equal-shape RGB uint8 (H, W, 3) images (views are fine) -> one (slots, H, W, 3) uint8 host
    tensor, each image copied once, slots n..slots-1 zero; pinned (for a non-blocking copy) when `pin`."""
    n = len(images)
    if n > slots:
        raise ValueError(f"{n} images for a batch of {slots}")
    h, w = images[0].shape[:2]
    host = torch.empty((slots, h, w, 3), dtype=torch.uint8, pin_memory=pin)
    arr = host.numpy()
    for i, image in enumerate(images):
        arr[i] = image
    arr[n:] = 0
    return host


def to_input(images: torch.Tensor, normalize: Normalizer, device: torch.device,
             channels_last: bool = False) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> normalised (N, 3, H, W) float on `device`, normalised there by
    `convention.normalizer(device)` (its constants made once, not per batch). NHWC memory seen as NCHW is
    channels-last already, and uint8 is 4x less to copy than float."""
    x = normalize(images.to(device, non_blocking=True).permute(0, 3, 1, 2))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
