"""The FCN family (Long, Shelhamer & Darrell) in pure PyTorch: models, weight surgery, checkpoints."""
from .build import ARCHITECTURES, ModelConfig, build_model
from .checkpoint import (Checkpoint, CheckpointError, build_from_state, checkpoint_bytes, init_from_checkpoint,
                         load_checkpoint, load_checkpoint_bytes, read_checkpoint_payload, save_checkpoint)
from .convention import CAFFE, TORCHVISION, InputConvention
from .surgery import BackboneError, init_backbone, init_from_stage, vgg16_to_fcn
from .voc import VOC_CLASSES, VOID_LABEL, flat_palette, voc_palette

__all__ = [
    "ARCHITECTURES", "ModelConfig", "build_model",
    "Checkpoint", "CheckpointError", "build_from_state", "checkpoint_bytes", "init_from_checkpoint", "load_checkpoint",
    "load_checkpoint_bytes", "read_checkpoint_payload", "save_checkpoint",
    "CAFFE", "TORCHVISION", "InputConvention",
    "BackboneError", "init_backbone", "init_from_stage", "vgg16_to_fcn",
    "VOC_CLASSES", "VOID_LABEL", "flat_palette", "voc_palette",
]
