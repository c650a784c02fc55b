"""Published FCN weights with the reference layer names (conv1_1 ... fc7, score_fr, score_pool4, score_pool3,
upscore2, upscore_pool4, upscore8), e.g. the PyTorch FCN port's `fcn8s_from_caffe.pth`, as this project's models.

The layer names are the reference port's, so a state dict loads by name; the width is read from the weights
(conv1_1's output channels over 64) and the number of classes from score_fr's.
"""
from __future__ import annotations

import hashlib
import io

import torch
from torch import nn

from .build import ModelConfig
from .checkpoint import CheckpointError, build_from_state, read_model_file


def read_state_dict(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict of tensors from a local path or URI (also one wrapped as {"state_dict": ...} or
    {"model_state_dict": ...}), and the file's md5. Raises CheckpointError naming the file and the problem."""
    data = read_model_file(uri, "weights file")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is one message
        raise CheckpointError(f"weights file {uri} is not a readable torch state dict ({type(e).__name__})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {uri} does not hold a state dict of tensors")
    # Saved from DataParallel/DDP: "module." prefixes.
    return {k.removeprefix("module."): v for k, v in state.items()}, hashlib.md5(data).hexdigest()


def model_from_reference(state: dict[str, torch.Tensor], arch: str, num_classes: int, *, padding: str = "reference",
                         uri: str = "<state dict>") -> nn.Module:
    """The `arch` model holding reference-named weights. Missing, unexpected or mis-shaped tensors are named in
    one CheckpointError."""
    conv1 = state.get("conv1_1.weight")
    if conv1 is None or conv1.ndim != 4:
        raise CheckpointError(f"weights file {uri}: no conv1_1.weight; is it a state dict with the reference FCN "
                              f"layer names (conv1_1 ... fc7, score_fr, upscore...)?")
    score = state.get("score_fr.weight")
    if score is not None and score.shape[0] != num_classes:
        raise CheckpointError(f"weights file {uri} predicts {score.shape[0]} classes, but --classes gives {num_classes}")
    config = ModelConfig(arch, num_classes, conv1.shape[0] / 64, padding)
    return build_from_state(config, state, uri).eval()
