"""FCN-16s: FCN-32s plus a pool4 skip, fused at stride 16, then a 16x bilinear upsampling."""
from __future__ import annotations

import torch
from torch import nn

from .layers import VGG16Trunk, crop_like, fp32_head, init_trunk_weights, same_crop, upsampler, zero_init

# Reference crop offsets: score_pool4 against upscore2, and the final output.
REFERENCE_CROP_POOL4 = 5
REFERENCE_CROP = 27


class FCN16s(VGG16Trunk):
    arch = "fcn16s"

    def __init__(self, num_classes: int = 21, *, width_mult: float = 1.0, padding: str = "reference",
                 dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self._build_trunk(width_mult, padding, dropout)
        init_trunk_weights(self)
        self.score_fr = zero_init(nn.Conv2d(self.fc_channels, num_classes, 1))
        self.score_pool4 = zero_init(nn.Conv2d(self.pool4_channels, num_classes, 1))
        self.upscore2 = upsampler(num_classes, 2)
        self.upscore16 = upsampler(num_classes, 16)

    def final_upsampling(self) -> tuple[str, int]:
        """The last upsampler's name and the crop of its output (layers.output_knots)."""
        return "upscore16", REFERENCE_CROP if self.padding == "reference" else same_crop(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, pool4, h = self.trunk(x)
        fp32, (h, pool4) = fp32_head(h, pool4)
        with fp32:
            upscore2 = self.upscore2(self.score_fr(h))
            score_pool4 = self.score_pool4(pool4)
            if self.padding == "reference":
                h = upscore2 + crop_like(score_pool4, REFERENCE_CROP_POOL4, upscore2)
                h = crop_like(self.upscore16(h), REFERENCE_CROP, x)
            else:
                h = crop_like(upscore2, same_crop(2), score_pool4) + score_pool4
                h = crop_like(self.upscore16(h), same_crop(16), x)
            return h.contiguous()
