"""Inference-time rewrites of a loaded FCN that keep its function: fewer bytes moved and fewer FLOPs per forward.

- `cast_trunk`: the VGG16 trunk's weights (conv1_1 ... fc7, 99 % of the parameters) stored in the autocast dtype
  once, so autocast does not cast 134 M weights on every forward (~0.8 GB of traffic per forward on a GPU). Under
  autocast the convolutions run in that dtype anyway, so the logits are bit-identical; the fp32 head
  (`layers.fp32_head`) keeps its own fp32 weights.
- `group_upsamplers`: an upsampler that holds the reference bilinear kernel on the class diagonal (published
  weights; checkpoints trained with frozen upsampling) is a per-class operation: a grouped transposed conv
  (groups = classes, weight C x 1 x k x k) does 1/C of the dense layer's work and equals it to float rounding
  (the dense layer also adds the off-diagonal zeros). A layer whose weights were learned stays dense.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import is_bilinear, upsamplers

# Trunk layer names: every conv of the VGG16 blocks and fc6/fc7 (see layers.VGG16Trunk).
TRUNK_PREFIXES = ("conv", "fc")


def cast_trunk(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Store the trunk's conv weights and biases in `dtype`, in place; returns the layer names cast.

    Only for inference under autocast to `dtype`: without autocast the trunk would get fp32 inputs and fail."""
    cast = []
    for name, m in model.named_children():
        if isinstance(m, nn.Conv2d) and name.startswith(TRUNK_PREFIXES):
            m.to(dtype)
            cast.append(name)
    return cast


def group_upsamplers(model: nn.Module) -> dict[str, bool]:
    """Replace every upsampler holding the exact bilinear kernel by its grouped equivalent, in place.

    Returns {layer name: grouped?} for every upsampler: False means its weights are not the bilinear kernel
    (learned upsampling) and it stays dense."""
    done = {}
    for name, layer in upsamplers(model).items():
        if layer.groups != 1 or not is_bilinear(layer):
            done[name] = layer.groups != 1
            continue
        c, k = layer.weight.shape[0], layer.weight.shape[2]
        grouped = nn.ConvTranspose2d(c, c, k, stride=layer.stride, padding=layer.padding, groups=c, bias=False,
                                     device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            grouped.weight.copy_(layer.weight[range(c), range(c)].unsqueeze(1))
        grouped.requires_grad_(layer.weight.requires_grad)
        _set_submodule(model, name, grouped)
        done[name] = True
    return done


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
