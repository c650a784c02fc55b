"""The FCN family (Long, Shelhamer & Darrell) in pure PyTorch: models, weight surgery, checkpoints.

Names are imported lazily (PEP 562): `from models import VOID_LABEL` in a Ray Data decode task must not pay
torch's ~1.5 s import in every fresh worker process; torch loads on first use of a model-side name.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build": ["ARCHITECTURES", "ModelConfig", "build_model"],
    "checkpoint": ["Checkpoint", "CheckpointError", "build_from_state", "checkpoint_bytes", "init_from_checkpoint",
                   "from_shippable", "load_checkpoint", "load_checkpoint_bytes", "read_checkpoint_payload", "save_checkpoint",
                   "shippable"],
    "convention": ["CAFFE", "TORCHVISION", "InputConvention"],
    "layers": ["PADDINGS", "ModelConfigError", "is_bilinear", "output_knots", "upsamplers"],
    "surgery": ["BackboneError", "init_backbone", "init_from_stage", "vgg16_to_fcn"],
    "voc": ["MAX_CLASSES", "VOC_CLASSES", "VOID_LABEL", "flat_palette", "voc_palette"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
