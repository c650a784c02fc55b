"""Building blocks shared by the FCN family: the VGG16 trunk, bilinear kernels, crops.

Layer names follow the reference FCN port (conv1_1 ... fc7) so reference checkpoints load by name.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

PADDINGS = ("reference", "same")


class ModelConfigError(ValueError):
    """An architecture, padding, width, class count or input convention that cannot be built or used."""

# VGG16 configuration: (block index, number of 3x3 convs, output channels at width 1.0).
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
FC_WIDTH = 4096
# conv1_1's padding in the reference net: makes the output alignable with any input size.
REFERENCE_PAD = 100


def scaled(channels: int, width_mult: float) -> int:
    """Channel count at a width multiplier (at least one channel)."""
    return max(1, int(round(channels * width_mult)))


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Transposed-conv weight (channels, channels, k, k) doing bilinear upsampling per class.

    Reference formula: factor = (k+1)//2; center = factor-1 if k is odd else factor-0.5;
    w[c, c, i, j] = (1 - |i-center|/factor) * (1 - |j-center|/factor), zero off the class diagonal.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=torch.float64)
    weight[range(channels), range(channels)] = filt
    return weight.float()


def upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Bias-free transposed conv (kernel 2*factor, stride factor) initialised to bilinear."""
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, bias=False)
    if layer.weight.is_meta:  # built to receive loaded weights (see init_trunk_weights)
        return layer
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return layer


def upsamplers(model: nn.Module) -> dict[str, nn.ConvTranspose2d]:
    """The model's upsampling layers by name (upscore2, upscore_pool4, upscore8 / upscore16 / upscore)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)}


def output_knots(model: nn.Module) -> tuple[int, float] | None:
    """(factor, phase) where the model's output is exactly a bilinear interpolation of a stride-`factor` map whose
    cells sit at output pixels factor * k + phase (in its interior): the last upsampler holds the bilinear kernel
    (size 2f, stride f: cell k's centre lands at f * k + f - 1/2, less the crop). None when it does not (learned
    upsampling) or the model says nothing of its last upsampler. Tiled labeling samples these cells exactly."""
    final = getattr(model, "final_upsampling", None)
    if final is None:
        return None
    name, crop = final()
    layer = model.get_submodule(name)
    if not is_bilinear(layer):
        return None
    factor = layer.stride[0]
    return factor, (factor - 0.5 - crop) % factor


def is_bilinear(layer: nn.ConvTranspose2d) -> bool:
    """Whether the layer's weight is exactly (bit for bit) the reference bilinear kernel on the class diagonal,
    as in published weights and in checkpoints trained with frozen upsampling."""
    w = layer.weight
    if w.is_meta or w.dim() != 4 or w.shape[0] != w.shape[1] or w.shape[2] != w.shape[3]:
        return False
    return bool(torch.equal(w.detach().float().cpu(), bilinear_kernel(w.shape[0], w.shape[2])))


def crop_like(x: torch.Tensor, offset: int, like: torch.Tensor | tuple[int, int]) -> torch.Tensor:
    """Crop x spatially to the size of `like`, starting at (offset, offset), as Caffe's Crop layer."""
    h, w = like.shape[-2:] if isinstance(like, torch.Tensor) else like
    return x[:, :, offset:offset + h, offset:offset + w]


def same_crop(factor: int) -> int:
    """Crop offset that aligns a bilinear upsampler of this factor in the 'same' padding variant.

    With 3x3/pad-1 convs and 2x2 ceil-mode pools, cell j of a stride-s map is centred on input pixel
    s*j + (s-1)/2; the k=2f, stride-f transposed conv puts input cell i's centre at output f*i + f - 1/2,
    so the output is aligned with the finer map after dropping f/2 leading pixels.
    """
    return factor // 2


class VGG16Trunk(nn.Module):
    """VGG16 conv trunk plus fc6/fc7 as convolutions, with the reference layer names.

    Subclasses call `self.trunk(x)` and get (pool3, pool4, fc7-output) back.
    """

    def _build_trunk(self, width_mult: float, padding: str, dropout: float = 0.5) -> None:
        if padding not in PADDINGS:
            raise ModelConfigError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if not (0 < width_mult <= 1):
            raise ModelConfigError(f"width_mult must be in (0, 1], got {width_mult}")
        self.width_mult = width_mult
        self.padding = padding
        in_ch = 3
        for block, n_convs, out in VGG16_BLOCKS:
            out_ch = scaled(out, width_mult)
            for i in range(1, n_convs + 1):
                pad = REFERENCE_PAD if (padding == "reference" and block == 1 and i == 1) else 1
                setattr(self, f"conv{block}_{i}", nn.Conv2d(in_ch, out_ch, 3, padding=pad))
                setattr(self, f"relu{block}_{i}", nn.ReLU(inplace=True))
                in_ch = out_ch
            # Caffe rounds pooling output sizes up.
            setattr(self, f"pool{block}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        fc = scaled(FC_WIDTH, width_mult)
        self.fc6 = nn.Conv2d(in_ch, fc, 7, padding=0 if padding == "reference" else 3)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d(dropout)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d(dropout)
        self.fc_channels = fc
        self.pool3_channels = scaled(256, width_mult)
        self.pool4_channels = scaled(512, width_mult)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = x
        pools = {}
        for block, n_convs, _ in VGG16_BLOCKS:
            for i in range(1, n_convs + 1):
                h = getattr(self, f"relu{block}_{i}")(getattr(self, f"conv{block}_{i}")(h))
            h = getattr(self, f"pool{block}")(h)
            pools[block] = h
        h = self.drop6(self.relu6(self.fc6(h)))
        h = self.drop7(self.relu7(self.fc7(h)))
        return pools[3], pools[4], h


def fp32_head(*features: torch.Tensor):
    """The score layers, skip additions and upsamplers run in fp32 even under autocast: they are under 1% of
    the FLOPs, and in bf16 the logits keep 8 bits (near-ties become ties that favour class 0, and the at-once
    net's `pool3 * 0.0001` skip is largely rounded away). Returns (autocast-off context, features as fp32);
    without autocast the features are fp32 already and `.float()` returns them unchanged."""
    device_type = features[0].device.type
    try:
        active = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta: FLOP counting)
        active = False
    off = torch.autocast(device_type, enabled=False) if active else nullcontext()
    return off, tuple(f.float() for f in features)


def zero_init(layer: nn.Conv2d) -> nn.Conv2d:
    """Score layers start at zero, as in the reference (the net starts from the previous stage's output)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def init_trunk_weights(module: nn.Module) -> None:
    """Default init for a trunk trained from scratch: Kaiming-normal convs, zero biases."""
    for name, m in module.named_children():
        if isinstance(m, nn.Conv2d) and (name.startswith("conv") or name.startswith("fc")):
            # Built on the meta device to receive loaded weights: nothing to initialise, and normal_/arange
            # on meta would import torch._dynamo (~1 s in every fresh process).
            if m.weight.is_meta:
                continue
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


