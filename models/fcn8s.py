"""FCN-8s (staged) and FCN-8s "at-once": pool4 and pool3 skips fused at strides 16 and 8."""
from __future__ import annotations

import torch
from torch import nn

from .layers import VGG16Trunk, crop_like, fp32_head, init_trunk_weights, same_crop, upsampler, zero_init

# Reference crop offsets: score_pool4 against upscore2, score_pool3 against upscore_pool4, final output.
REFERENCE_CROP_POOL4 = 5
REFERENCE_CROP_POOL3 = 9
REFERENCE_CROP = 31


class FCN8s(VGG16Trunk):
    arch = "fcn8s"
    # Fixed input scaling of the skip branches; 1.0 for the staged net, see FCN8sAtOnce.
    pool4_scale = 1.0
    pool3_scale = 1.0

    def __init__(self, num_classes: int = 21, *, width_mult: float = 1.0, padding: str = "reference",
                 dropout: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        self._build_trunk(width_mult, padding, dropout)
        init_trunk_weights(self)
        self.score_fr = zero_init(nn.Conv2d(self.fc_channels, num_classes, 1))
        self.score_pool4 = zero_init(nn.Conv2d(self.pool4_channels, num_classes, 1))
        self.score_pool3 = zero_init(nn.Conv2d(self.pool3_channels, num_classes, 1))
        self.upscore2 = upsampler(num_classes, 2)
        self.upscore_pool4 = upsampler(num_classes, 2)
        self.upscore8 = upsampler(num_classes, 8)

    def final_upsampling(self) -> tuple[str, int]:
        """The last upsampler's name and the crop of its output (layers.output_knots)."""
        return "upscore8", REFERENCE_CROP if self.padding == "reference" else same_crop(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3, pool4, h = self.trunk(x)
        fp32, (pool3, pool4, h) = fp32_head(pool3, pool4, h)
        with fp32:
            upscore2 = self.upscore2(self.score_fr(h))
            score_pool4 = self.score_pool4(pool4 * self.pool4_scale if self.pool4_scale != 1.0 else pool4)
            score_pool3 = self.score_pool3(pool3 * self.pool3_scale if self.pool3_scale != 1.0 else pool3)
            if self.padding == "reference":
                upscore_pool4 = self.upscore_pool4(upscore2 + crop_like(score_pool4, REFERENCE_CROP_POOL4, upscore2))
                h = upscore_pool4 + crop_like(score_pool3, REFERENCE_CROP_POOL3, upscore_pool4)
                h = crop_like(self.upscore8(h), REFERENCE_CROP, x)
            else:
                h = crop_like(upscore2, same_crop(2), score_pool4) + score_pool4
                h = crop_like(self.upscore_pool4(h), same_crop(2), score_pool3) + score_pool3
                h = crop_like(self.upscore8(h), same_crop(8), x)
            return h.contiguous()


class FCN8sAtOnce(FCN8s):
    """FCN-8s trained in one stage: skip inputs scaled by fixed 0.01 (pool4) and 0.0001 (pool3)."""

    arch = "fcn8s-atonce"
    pool4_scale = 0.01
    pool3_scale = 0.0001
