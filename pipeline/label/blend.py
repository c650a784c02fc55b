"""Blending a tiled image's tiles (pipeline.label.tiling) on the device, at the score resolution.

Each tile's logits (C, T, T) are sampled once per SCORE_STRIDE x SCORE_STRIDE cell and added, weighted by the
tiling's window, into the image's running sums; the blended logits are the sums over the weights. The state is
C x H x W / 64 floats (about 131 MB for 100 MP and 21 classes) plus the weights, never C x H x W.

An FCN's output is a bilinear interpolation of its coarsest fused scores (stride 8, 16 or 32) whose cells sit at
known pixel positions (models.output_knots): sampled there, by linear extrapolation from two pixels of one linear
piece, the cells are exactly the model's, and the band upsampler, interpolating between them at the same
positions, gives back exactly the model's output away from tile borders (a whole 2048x2048 image: 100.00 % of
labels equal). A model without that structure is sampled at the cells' centres (each cell's four central
pixels): measured 98.9 % equal, the loss of resampling.

The tiles of an image are added in its grid's order whatever batches they rode in, so the float sums, and the
labels, do not depend on the batch neighbours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tiling import SCORE_STRIDE, Tiling

CELL_CENTRE = (SCORE_STRIDE - 1) / 2  # align_corners=False's position of a cell, without knots to follow


def score_cells(logits: torch.Tensor, phase: float | None) -> torch.Tensor:
    """(k, C, T, T) tile logits -> (k, C, T / SCORE_STRIDE, T / SCORE_STRIDE): the value at pixel
    SCORE_STRIDE * j + phase of each axis, `phase` a knot of the output's bilinear pieces (a half-integer), by
    linear extrapolation from the two pixels beside it on its roomier side of the cell, which lie on one piece.
    None: each cell's centre value (bilinear, align_corners=False)."""
    if phase is None:
        cells = logits.shape[-1] // SCORE_STRIDE
        return F.interpolate(logits, size=(cells, cells), mode="bilinear", align_corners=False)
    p = int(phase)  # phase = p + 1/2
    near, far = (p + 1, p + 2) if phase < SCORE_STRIDE / 2 else (p, p - 1)
    rows = 1.5 * logits[..., near::SCORE_STRIDE, :] - 0.5 * logits[..., far::SCORE_STRIDE, :]
    return 1.5 * rows[..., near::SCORE_STRIDE] - 0.5 * rows[..., far::SCORE_STRIDE]


class TileBlender:
    """One tiled image's blending state: weighted sums of its tiles' score cells, and of the weights."""

    def __init__(self, tiling: Tiling, height: int, width: int, classes: int, device: torch.device,
                 window: torch.Tensor | None = None):
        self.height, self.width = height, width
        self.tiles = tiling.count(height, width)
        self.h, self.w = tiling.score_shape(height, width)
        self.sums = torch.zeros((1, classes, self.h, self.w), dtype=torch.float32, device=device)
        self.weights = torch.zeros((self.h, self.w), dtype=torch.float32, device=device)
        self.window = tile_window(tiling, device) if window is None else window
        self.added = 0
        self._scores: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return self.added == self.tiles

    def add(self, cells: torch.Tensor, y0: int, x0: int) -> None:
        """The score cells (C, t, t) of the tile at (y0, x0), added in grid order (the sums' order); cells past the
        image's score grid are dropped."""
        cy, cx = y0 // SCORE_STRIDE, x0 // SCORE_STRIDE
        rows, cols = min(cells.shape[1], self.h - cy), min(cells.shape[2], self.w - cx)
        weight = self.window[:rows, :cols]
        self.sums[0, :, cy:cy + rows, cx:cx + cols].addcmul_(cells[:, :rows, :cols], weight)
        self.weights[cy:cy + rows, cx:cx + cols] += weight
        self.added += 1

    def scores(self) -> torch.Tensor:
        """The blended logits (1, C, h, w), once every tile is in (in place, once: the sums become the scores)."""
        if not self.complete:
            raise RuntimeError(f"{self.added} of {self.tiles} tiles blended")
        if self._scores is None:
            self._scores = self.sums.div_(self.weights)
        return self._scores


def tile_window(tiling: Tiling, device: torch.device) -> torch.Tensor:
    """A tile's 2-D blending weights (t, t) on the device: the outer product of the tiling's window."""
    window = torch.from_numpy(tiling.window()).to(device)
    return window[:, None] * window[None, :]
