"""`build_model`: the FCN family by name, and the config that describes a built model."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .fcn8s import FCN8s, FCN8sAtOnce
from .fcn16s import FCN16s
from .fcn32s import FCN32s
from .layers import PADDINGS, ModelConfigError

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "fcn32s": FCN32s,
    "fcn16s": FCN16s,
    "fcn8s": FCN8s,
    "fcn8s-atonce": FCN8sAtOnce,
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild an FCN's architecture (weights aside)."""

    arch: str
    num_classes: int
    width_mult: float = 1.0
    padding: str = "reference"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelConfigError(f"unknown model {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.padding not in PADDINGS:
            raise ModelConfigError(f"unknown padding {self.padding!r}; choose one of {', '.join(PADDINGS)}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ModelConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if not (0 < float(self.width_mult) <= 1):
            raise ModelConfigError(f"width_mult must be in (0, 1], got {self.width_mult}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def of(model: nn.Module) -> "ModelConfig":
        return ModelConfig(model.arch, model.num_classes, model.width_mult, model.padding)


def build_model(name: str, num_classes: int, *, width_mult: float = 1.0, padding: str = "reference",
                dropout: float = 0.5) -> nn.Module:
    """Build an FCN (`fcn32s`, `fcn16s`, `fcn8s`, `fcn8s-atonce`) with a freshly initialised trunk.

    Output is (N, num_classes, H, W) for any input of at least 1x1. `padding="same"` is the compute-lean
    variant without conv1_1's 100-pixel padding; `width_mult` < 1 narrows every trunk and fc layer.
    `dropout` is fc6/fc7's drop probability in training (0.5 in the paper).
    """
    cfg = ModelConfig(name, num_classes, float(width_mult), padding)
    return ARCHITECTURES[cfg.arch](cfg.num_classes, width_mult=cfg.width_mult, padding=cfg.padding, dropout=dropout)
