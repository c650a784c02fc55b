"""FCN-32s: VGG16 trunk, one score layer, a single 32x bilinear upsampling."""
from __future__ import annotations

import torch
from torch import nn

from .layers import VGG16Trunk, crop_like, fp32_head, init_trunk_weights, same_crop, upsampler, zero_init

# Reference (conv1_1 padding 100) crop offset of the final output.
REFERENCE_CROP = 19


class FCN32s(VGG16Trunk):
    arch = "fcn32s"

    def __init__(self, num_classes: int = 21, *, width_mult: float = 1.0, padding: str = "reference",
                 dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self._build_trunk(width_mult, padding, dropout)
        init_trunk_weights(self)
        self.score_fr = zero_init(nn.Conv2d(self.fc_channels, num_classes, 1))
        self.upscore = upsampler(num_classes, 32)
        self.crop = REFERENCE_CROP if padding == "reference" else same_crop(32)

    def final_upsampling(self) -> tuple[str, int]:
        """The last upsampler's name and the crop of its output (layers.output_knots)."""
        return "upscore", self.crop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h = self.trunk(x)
        fp32, (h,) = fp32_head(h)
        with fp32:
            h = self.upscore(self.score_fr(h))
            return crop_like(h, self.crop, x).contiguous()
