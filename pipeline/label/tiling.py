"""Tiled labeling of large images (--tile): which images are tiled, where their tiles sit, and the blending
weights. numpy only: the decode tasks decide here whether an image is tiled, the actors use the same rules.

An image whose long side exceeds the tile size is labeled at its own resolution (up to --max-pixels) in
overlapping square tiles of that size, each a canvas like a whole image's, so tiles share the ordinary
fixed-slot batches. Their logits are blended at the *score resolution*, one value per SCORE_STRIDE x
SCORE_STRIDE block (pipeline.label.blend), so an image's blending state is C x H x W / 64 floats, never
C x H x W; the blended scores are upsampled back in row bands as a shrunk image's are.

Tile origins are multiples of SCORE_STRIDE (each tile's score cells fall on the image's grid), spread evenly: the
last tile of a row or column ends at the border rounded up to the grid, so it overhangs by at most
SCORE_STRIDE - 1 edge-padded pixels; a side shorter than a tile is edge-padded to it, like a canvas (a 1 x N strip
costs a full tile per tile step: say so to users of strips).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError, check_number

BLENDS = ("gaussian", "cosine", "mean")
# Chosen by measurement (bench/tiling_bench.py, docs/labeling.md "Large images").
DEFAULT_OVERLAP = 0.25
DEFAULT_BLEND = "gaussian"
MAX_OVERLAP = 0.9
# One blended value per 8 x 8 pixels: FCN-8s's finest score stride, so the blend keeps what the model resolves
# (its output is a bilinear upsampling of stride-8 scores; FCN-16s/32s are smoother still).
SCORE_STRIDE = 8
# The FCN trunk's coarsest stride is 32 (pool5); a tile must hold at least two pool5 cells a side, else its fc
# layers see little but padding.
MIN_TILE = 64
# A tile is a full canvas whatever the image (edge-padded where the image is shorter): past this, memory, not detail.
MAX_TILE = 8192
# MONAI's sliding_window_inference default (sigma_scale=0.125): sigma as a share of the tile side.
GAUSSIAN_SIGMA = 0.125


def check_tiling(tile: int | None, overlap: float, blend: str, canvas_multiple: int) -> None:
    """The rules of the tiling flags; raises UsageError naming the flag (exit 2 before Ray starts)."""
    check_number("--tile-overlap", overlap, at_least=0.0, below=MAX_OVERLAP)
    if blend not in BLENDS:
        raise UsageError(f"--tile-blend must be one of {', '.join(BLENDS)}, got {blend!r}")
    if tile is None:
        return
    check_number("--tile", tile)  # a number; the bounds below say why
    if tile < MIN_TILE:
        raise UsageError(f"--tile {tile} is smaller than the model can take: at least {MIN_TILE} pixels (two cells "
                         "of the FCN's stride-32 pool5 a side; leave --tile out to label every image whole)")
    if tile > MAX_TILE:
        raise UsageError(f"--tile {tile} is over {MAX_TILE}: every tile is a full canvas of that size, so larger tiles "
                         "cost memory, not detail (--max-side 0 labels an image whole at its own size)")
    multiple = math.lcm(canvas_multiple, SCORE_STRIDE)
    if tile % multiple:
        why = (f"the canvas multiple {canvas_multiple} (--canvas-multiple; 128 with --compile)"
               if tile % canvas_multiple else f"{SCORE_STRIDE}, the blending's score stride")
        raise UsageError(f"--tile {tile} is not a multiple of {why}: try {math.ceil(tile / multiple) * multiple}")


@dataclass(frozen=True)
class Tiling:
    """The tile size (pixels, a multiple of SCORE_STRIDE), the share of a tile its neighbour overlaps, and the
    weights tiles are blended with (`window`)."""

    size: int
    overlap: float = DEFAULT_OVERLAP
    blend: str = DEFAULT_BLEND

    def applies(self, height: int, width: int) -> bool:
        """Whether an image of this size is tiled: its long side exceeds a tile (others take the whole-image path)."""
        return max(height, width) > self.size

    @property
    def step(self) -> int:
        """The most pixels from one tile's origin to the next: the tile less at least the overlap, on the score grid."""
        return max(SCORE_STRIDE, math.floor(self.size * (1 - self.overlap) / SCORE_STRIDE) * SCORE_STRIDE)

    def origins(self, length: int) -> list[int]:
        """Tile origins along a side of `length` pixels (see the module docstring): as few tiles as the step allows,
        spread evenly from 0 to the last (no near-duplicate tile at the end), each step at most `step`."""
        if length <= self.size:
            return [0]
        last = math.ceil((length - self.size) / SCORE_STRIDE) * SCORE_STRIDE
        gaps = math.ceil(last / self.step)
        return [round(i * last / gaps / SCORE_STRIDE) * SCORE_STRIDE for i in range(gaps + 1)]

    def grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """(y0, x0) of every tile of an image, row by row: the order its tiles are blended in, always."""
        return [(y, x) for y in self.origins(height) for x in self.origins(width)]

    def count(self, height: int, width: int) -> int:
        return len(self.origins(height)) * len(self.origins(width))

    @staticmethod
    def score_shape(height: int, width: int) -> tuple[int, int]:
        """Rows and columns of an image's blended scores: the score cells that start inside it (the tiles cover
        them all; the band upsampler clamps at the last, as align_corners=False does at any border)."""
        return math.ceil(height / SCORE_STRIDE), math.ceil(width / SCORE_STRIDE)

    def window(self) -> np.ndarray:
        """The 1-D blending weights over a tile's score cells (float32, all > 0, so every pixel has weight);
        a tile's 2-D weights are the outer product. Cell j's centre lies at (j + 0.5) / cells of the tile side."""
        cells = self.size // SCORE_STRIDE
        u = (np.arange(cells, dtype=np.float64) + 0.5) / cells
        if self.blend == "mean":
            w = np.ones(cells)
        elif self.blend == "cosine":  # Hann: torchgeo's and TerraTorch's
            w = np.sin(np.pi * u) ** 2
        else:  # gaussian: MONAI's
            w = np.exp(-((u - 0.5) ** 2) / (2 * GAUSSIAN_SIGMA ** 2))
        return (w / w.max()).astype(np.float32)

    def near_borders(self, height: int, width: int, px: int = 16) -> np.ndarray:
        """(height, width) bool: the pixels within `px` of an edge of a tile that lies inside the image, where seams
        would show (the agreement checks of tests/test_tiling.py and bench/tiling_bench.py)."""
        def along(length: int) -> np.ndarray:
            near = np.zeros(length, bool)
            for origin in self.origins(length):
                for edge in (origin, origin + self.size):
                    if 0 < edge < length:
                        near[max(0, edge - px):edge + px] = True
            return near
        return along(height)[:, None] | along(width)[None, :]

    def tile_canvas(self, rgb: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """The (size, size, 3) canvas of the tile at (y0, x0): a view of the image, or an edge-padded copy where the
        tile overhangs it."""
        tile = rgb[y0:y0 + self.size, x0:x0 + self.size]
        h, w = tile.shape[:2]
        if (h, w) == (self.size, self.size):
            return tile
        return np.pad(tile, ((0, self.size - h), (0, self.size - w), (0, 0)), mode="edge")

    def to_dict(self) -> dict:
        return {"tile": self.size, "tile_overlap": self.overlap, "tile_blend": self.blend, "tile_step": self.step,
                "score_stride": SCORE_STRIDE}
