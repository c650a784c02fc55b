"""Weight surgery: VGG16 ImageNet weights into an FCN trunk, and staged 32s -> 16s -> 8s initialisation."""
from __future__ import annotations

import io

import torch
from torch import nn

from .convention import TORCHVISION, InputConvention
from .layers import VGG16_BLOCKS, ModelConfigError
from .storage_io import read_bytes

# Reference names of the 13 conv layers, in torchvision's `features` order.
TRUNK_CONVS = [f"conv{b}_{i}" for b, n, _ in VGG16_BLOCKS for i in range(1, n + 1)]
# Indices of those convs inside torchvision's `vgg16().features` Sequential.
TORCHVISION_FEATURE_INDEX = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


class BackboneError(RuntimeError):
    """The VGG16 backbone weights cannot be obtained or do not fit."""


def vgg16_to_fcn(vgg_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torchvision VGG16 state dict to FCN trunk names.

    The classifier's first two Linear layers become fc6 (4096x512x7x7) and fc7 (4096x4096x1x1): a Linear
    over the flattened 512x7x7 pool5 output is exactly a 7x7 convolution applied at one position.
    """
    out: dict[str, torch.Tensor] = {}
    for name, idx in zip(TRUNK_CONVS, TORCHVISION_FEATURE_INDEX, strict=True):
        out[f"{name}.weight"] = vgg_state[f"features.{idx}.weight"]
        out[f"{name}.bias"] = vgg_state[f"features.{idx}.bias"]
    fc6_w = vgg_state["classifier.0.weight"]
    out["fc6.weight"] = fc6_w.reshape(fc6_w.shape[0], -1, 7, 7)
    out["fc6.bias"] = vgg_state["classifier.0.bias"]
    fc7_w = vgg_state["classifier.3.weight"]
    out["fc7.weight"] = fc7_w.reshape(fc7_w.shape[0], fc7_w.shape[1], 1, 1)
    out["fc7.bias"] = vgg_state["classifier.3.bias"]
    return out


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    from torchvision.models import VGG16_Weights

    try:
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as e:  # noqa: BLE001 - network, proxy, checksum: any failure of the download is the user's to fix, named
        raise BackboneError(
            f"could not download torchvision's ImageNet VGG16 weights ({type(e).__name__}: {e}); "
            "download vgg16-397923af.pth elsewhere and pass it as a file (--backbone-weights PATH)"
        ) from None


def load_vgg16_state(source: str) -> dict[str, torch.Tensor]:
    """A torchvision VGG16 state dict from "imagenet" (torchvision's weights API) or a file path/URI."""
    if source == "imagenet":
        return _imagenet_state_dict()
    try:
        data = read_bytes(source)
    except FileNotFoundError:
        raise BackboneError(f"VGG16 weights file not found: {source}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a file that is not a state dict; named in the message
        raise BackboneError(f"VGG16 weights file {source} is not a readable torch state dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"VGG16 weights file {source} does not hold a state dict of tensors")
    return state


def init_backbone(model: nn.Module, source: str) -> InputConvention:
    """Initialise the trunk (conv1_1..fc7) from VGG16 ImageNet weights; score layers are untouched.

    `source`: "imagenet" (torchvision download) or a path/URI of a torchvision VGG16 state dict, or of a
    state dict already in reference names (conv1_1.weight, ..., fc7.bias). Returns the input convention the
    weights expect (torchvision's RGB/ImageNet normalisation).
    """
    if model.width_mult != 1.0:
        raise BackboneError(f"pretrained VGG16 weights need width_mult=1.0 (model has {model.width_mult})")
    state = load_vgg16_state(source)
    try:
        mapped = state if "conv1_1.weight" in state else vgg16_to_fcn(state)
    except KeyError as e:
        raise BackboneError(f"VGG16 weights {source}: missing tensor {e.args[0]!r}; is it a torchvision vgg16 state dict?") from None
    own = model.state_dict()
    for name, tensor in mapped.items():
        if name not in own:
            continue
        if own[name].shape != tensor.shape:
            raise BackboneError(f"VGG16 weights {source}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(own[name].shape)}")
    trunk = {k: v for k, v in mapped.items() if k in own}
    missing = [k for k in own if k.split(".")[0] in TRUNK_CONVS + ["fc6", "fc7"] and k not in trunk]
    if missing:
        raise BackboneError(f"VGG16 weights {source}: missing {', '.join(missing[:4])}")
    model.load_state_dict(trunk, strict=False)
    return TORCHVISION


def init_from_stage(model: nn.Module, source_state: dict[str, torch.Tensor]) -> list[str]:
    """Staged initialisation: copy every tensor the source model shares by name (trunk, score_fr, ...).

    An FCN-16s from an FCN-32s gets the trunk and score_fr; its score_pool4 stays zero and its upsamplers
    bilinear. An FCN-8s from an FCN-16s also gets score_pool4 and upscore2. Returns the copied names.
    """
    own = model.state_dict()
    shared = {k: v for k, v in source_state.items() if k in own}
    for k, v in shared.items():
        if own[k].shape != v.shape:
            raise ModelConfigError(f"cannot initialise {model.arch} from this checkpoint: {k} has shape "
                             f"{tuple(v.shape)}, expected {tuple(own[k].shape)} (same num_classes and width needed)")
    if not any(k.startswith("conv1_1") for k in shared):
        raise ModelConfigError(f"cannot initialise {model.arch} from this checkpoint: it shares no trunk layers")
    model.load_state_dict(shared, strict=False)
    return sorted(shared)
