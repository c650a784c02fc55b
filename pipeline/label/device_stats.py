"""Label maps and per-class statistics, computed where the logits are (the GPU, or the CPU): the logits of n
images of one size, bilinearly upsampled to their original resolution in row bands, become uint8 label maps and
a few float64 numbers per class (pixel count, sums of the max softmax probability and of the top-1 minus top-2
margin, the count of pixels below the low-confidence threshold, bounding box). Only those come back to the host
(`inference.Predictor.to_host`); an image's uncertainty figures are sums over its classes.

Every step is a function of one image's logits and size alone, so an image's labels never depend on its batch
neighbours: the band split depends on the image's size, and each band does the same arithmetic per pixel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements (classes x rows x width) of one band of one image's upsampled logits: bounds memory for large images.
# Per image, never per chunk: the band split orders the float sums, and must not depend on the neighbours.
BAND_ELEMENTS = 4_000_000

# Per-class statistics on the device, one float64 each (exact for integers below 2**53), in this order.
STATS = ("pixel_count", "confidence_sum", "x_min", "y_min", "x_max", "y_max", "margin_sum", "low_count")


@torch.inference_mode()
def labels_and_stats(scores: torch.Tensor, height: int, width: int, *, dense: bool,
                     low_confidence: float = 0.5, stride: int | None = None,
                     phase: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, C, h, w) of n images of one size -> label maps (n, height, width) uint8 and per-class
    statistics (n, C, len(STATS)) float64, on the logits' device, without a host synchronisation.

    When (h, w) != (height, width) the logits are bilinearly upsampled first (align_corners=False). Work goes
    in row bands, so memory stays bounded for large images; the band split depends on the image's size
    alone. The statistics are deterministic: `dense` per-class reductions (no float atomics: the GPU's form),
    else bincounts (sequential sums: the CPU's, the cheaper form there). A pixel is low-confidence when its max
    softmax probability is below `low_confidence`.

    `stride`: the logits are one value per stride x stride cell of the image (a tiled image's blended scores,
    pipeline.label.blend), cell j at pixel stride * j + `phase`, possibly overhanging it: the upsampling scale is
    exactly `stride`, not h / height.
    """
    n, c, h, w = scores.shape
    band_rows = max(1, min(height, BAND_ELEMENTS // max(1, c * width)))
    if stride:  # a band of fewer rows than a score cell would upsample the same source rows across again and again
        band_rows = min(height, max(band_rows, stride))
    label = torch.empty((n, height, width), dtype=torch.uint8, device=scores.device)
    stats = (DenseStats if dense else BincountStats)(n, c, height, width, scores.device)
    upsample = BandUpsampler(scores, height, width, stride, phase)
    for r0 in range(0, height, band_rows):
        r1 = min(height, r0 + band_rows)
        band = upsample(r0, r1)  # (n, C, r1 - r0, width)
        top, idx = band.max(1)
        ratio = torch.exp(band - top.unsqueeze(1))  # p_k / p_max: 1 at the argmax
        conf = ratio.sum(1).reciprocal()  # max softmax probability
        # top-1 minus top-2 probability, p1 (1 - p2 / p1): the largest ratio once the argmax's is zeroed (in place,
        # no copy; a tie keeps its other 1). Values only: the labels stay argmax's.
        margin = conf * (1 - ratio.scatter_(1, idx.unsqueeze(1), 0.0).amax(1))
        label[:, r0:r1] = idx.to(torch.uint8)
        stats.add(idx, conf, margin, conf < low_confidence, r0)
    return label, stats.result()


def _lerp_index(out_size: int, in_size: int, device: torch.device, scale: float,
                phase: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of bilinear resampling with align_corners=False (PyTorch's convention) at
    `scale` source pixels per output pixel, made on the device (a host-built index would be a blocking copy).
    With `phase`, source cell j sits at output pixel j / scale + phase instead."""
    out = torch.arange(out_size, dtype=torch.float64, device=device)
    src = (out + 0.5) * scale - 0.5 if phase is None else (out - phase) * scale
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    t = (src - i0).float()
    return i0, i1, t


def _source_rows(r0: int, r1: int, in_size: int, scale: float) -> tuple[int, int]:
    """Source rows [lo, hi) that output rows [r0, r1) interpolate from, with a row of margin on each side
    (host arithmetic: the exact indices live on the device)."""
    lo = max(0, math.floor((r0 + 0.5) * scale - 0.5) - 1)
    hi = min(in_size, math.floor((r1 - 0.5) * scale - 0.5) + 3)
    return lo, hi


class BandUpsampler:
    """Rows r0..r1 of logits (n, C, h, w) bilinearly resized to (height, width), align_corners=False: across
    with F.interpolate on just the source rows the band needs, then down by a lerp between two of those rows.
    Every band does the same arithmetic per pixel, so the band split changes no bit.

    With `stride`, logit j of each axis sits at pixel stride * j + phase (the grid may overhang the image), and
    both directions interpolate at scale 1 / stride."""

    def __init__(self, scores: torch.Tensor, height: int, width: int, stride: int | None = None, phase: float = 0.0):
        self.scores, self.height, self.width, self.stride = scores, height, width, stride
        self.h, self.w = scores.shape[-2:]
        self.scale = 1 / stride if stride else self.h / height
        if self.h != height or stride:
            self.yi0, self.yi1, self.yt = _lerp_index(height, self.h, scores.device, self.scale, phase if stride else None)
        # Across, F.interpolate's own kernel (one pass; two gathers cost more) puts cell j at stride * j +
        # (stride - 1) / 2: pixel x is its pixel x + shift, and pixels past either end repeat the end cell.
        self.shift = round((stride - 1) / 2 - phase) if stride else 0

    def _across(self, rows: torch.Tensor) -> torch.Tensor:
        if self.stride:
            wide = F.interpolate(rows, size=(rows.shape[2], self.w * self.stride), mode="bilinear", align_corners=False)
            lo, hi = self.shift, self.shift + self.width
            if lo < 0 or hi > wide.shape[3]:
                left = max(0, -lo)
                wide = F.pad(wide, (left, max(0, hi - wide.shape[3]), 0, 0), mode="replicate")
                lo, hi = lo + left, hi + left
            return wide[..., lo:hi]
        if self.w == self.width:
            return rows
        return F.interpolate(rows, size=(rows.shape[2], self.width), mode="bilinear", align_corners=False)

    def __call__(self, r0: int, r1: int) -> torch.Tensor:
        if self.h == self.height and not self.stride:
            return self._across(self.scores[:, :, r0:r1])
        lo, hi = _source_rows(r0, r1, self.h, self.scale)
        src = self._across(self.scores[:, :, lo:hi])
        a = src.index_select(2, self.yi0[r0:r1] - lo)
        b = src.index_select(2, self.yi1[r0:r1] - lo)
        return torch.lerp(a, b, self.yt[r0:r1].view(1, 1, -1, 1))


class DenseStats:
    """Per-class statistics by dense reductions over (n, C, band, width) one-hot masks: no atomics, no
    boolean indexing, no host synchronisation; deterministic on a GPU, where the extra traffic is cheap."""

    def __init__(self, n: int, c: int, height: int, width: int, dev: torch.device):
        self.height, self.width, self.dev = height, width, dev
        self.classes = torch.arange(c, device=dev).view(1, c, 1, 1)
        self.xs = torch.arange(width, device=dev)
        self.counts = torch.zeros((n, c), dtype=torch.int64, device=dev)
        self.conf_sum = torch.zeros((n, c), dtype=torch.float64, device=dev)
        self.margin_sum = torch.zeros((n, c), dtype=torch.float64, device=dev)
        self.low_count = torch.zeros((n, c), dtype=torch.int64, device=dev)
        self.y_min = torch.full((n, c), height, dtype=torch.int64, device=dev)
        self.x_min = torch.full((n, c), width, dtype=torch.int64, device=dev)
        self.y_max = torch.full((n, c), -1, dtype=torch.int64, device=dev)
        self.x_max = torch.full((n, c), -1, dtype=torch.int64, device=dev)

    def add(self, idx: torch.Tensor, conf: torch.Tensor, margin: torch.Tensor, low: torch.Tensor, r0: int) -> None:
        onehot = idx.unsqueeze(1) == self.classes  # (n, C, band, width)
        self.counts += onehot.sum((2, 3))
        self.conf_sum += torch.where(onehot, conf.unsqueeze(1).double(), 0.0).sum((2, 3))
        self.margin_sum += torch.where(onehot, margin.unsqueeze(1).double(), 0.0).sum((2, 3))
        self.low_count += (onehot & low.unsqueeze(1)).sum((2, 3))
        rows_hit, cols_hit = onehot.any(3), onehot.any(2)  # (n, C, band), (n, C, width)
        ys = torch.arange(r0, r0 + idx.shape[1], device=self.dev)
        self.y_min = torch.minimum(self.y_min, torch.where(rows_hit, ys, self.height).amin(2))
        self.y_max = torch.maximum(self.y_max, torch.where(rows_hit, ys, -1).amax(2))
        self.x_min = torch.minimum(self.x_min, torch.where(cols_hit, self.xs, self.width).amin(2))
        self.x_max = torch.maximum(self.x_max, torch.where(cols_hit, self.xs, -1).amax(2))

    def result(self) -> torch.Tensor:
        return torch.stack([self.counts.double(), self.conf_sum, self.x_min.double(), self.y_min.double(),
                            self.x_max.double(), self.y_max.double(), self.margin_sum, self.low_count.double()], dim=-1)


class BincountStats(DenseStats):
    """The same statistics from bincounts over (image, class[, row or column]) keys: one pass over the pixels
    instead of one per class (on a CPU the dense form cost ~10x the labels themselves). Sequential sums on the
    CPU: deterministic."""

    def add(self, idx: torch.Tensor, conf: torch.Tensor, margin: torch.Tensor, low: torch.Tensor, r0: int) -> None:
        n, band, width = idx.shape
        c = self.classes.shape[1]
        key = idx.long() + c * torch.arange(n, device=self.dev).view(n, 1, 1)  # (n, band, width): image, class
        flat = key.reshape(-1)
        self.counts += torch.bincount(flat, minlength=n * c).view(n, c)
        self.conf_sum += torch.bincount(flat, weights=conf.reshape(-1).double(), minlength=n * c).view(n, c)
        self.margin_sum += torch.bincount(flat, weights=margin.reshape(-1).double(), minlength=n * c).view(n, c)
        self.low_count += torch.bincount(flat, weights=low.reshape(-1).double(), minlength=n * c).view(n, c).long()
        rows_hit = torch.bincount((key * band + torch.arange(band, device=self.dev).view(1, band, 1)).reshape(-1),
                                  minlength=n * c * band).view(n, c, band) > 0
        cols_hit = torch.bincount((key * width + self.xs).reshape(-1), minlength=n * c * width).view(n, c, width) > 0
        ys = torch.arange(r0, r0 + band, device=self.dev)
        self.y_min = torch.minimum(self.y_min, torch.where(rows_hit, ys, self.height).amin(2))
        self.y_max = torch.maximum(self.y_max, torch.where(rows_hit, ys, -1).amax(2))
        self.x_min = torch.minimum(self.x_min, torch.where(cols_hit, self.xs, self.width).amin(2))
        self.x_max = torch.maximum(self.x_max, torch.where(cols_hit, self.xs, -1).amax(2))
