"""Input conventions: how uint8 RGB pixels become the tensor a set of weights expects."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .layers import ModelConfigError


@dataclass(frozen=True)
class InputConvention:
    """value = (pixel * scale - mean) / std, per channel, channels in `channel_order`.

    `mean` and `std` are given in `channel_order`. Pixels come in as RGB 0..255.
    """

    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ModelConfigError(f"channel_order must be RGB or BGR, got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ModelConfigError("mean and std need three values, std non-zero")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @staticmethod
    def from_dict(d: dict) -> "InputConvention":
        return InputConvention(str(d["channel_order"]), float(d["scale"]),
                               tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) or (3, H, W) RGB pixels (uint8 or float, 0..255) -> normalised float tensor."""
        return self.normalizer(rgb.device)(rgb)

    def normalizer(self, device: torch.device | str) -> "Normalizer":
        """`normalize` with its constants made once on `device`: building them per call from Python floats is
        a blocking host-to-device copy on a GPU, a synchronisation every batch."""
        return Normalizer(self, torch.device(device))


class Normalizer:
    """value = (pixel * scale - mean) / std with mean and std already on the device (see InputConvention)."""

    def __init__(self, convention: InputConvention, device: torch.device):
        self.bgr = convention.channel_order == "BGR"
        self.scale = convention.scale
        self.mean = torch.tensor(convention.mean, dtype=torch.float64, device=device).view(3, 1, 1)
        self.std = torch.tensor(convention.std, dtype=torch.float64, device=device).view(3, 1, 1)

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        # In float64, rounded once to float32 at the end: as the reference ports do (numpy float64, then
        # .float()), so published weights see the very inputs they were converted with.
        x = rgb.double()
        if self.bgr:
            x = x.flip(-3)
        return ((x * self.scale - self.mean) / self.std).float()


# torchvision's ImageNet VGG16 weights.
TORCHVISION = InputConvention()
# The original Caffe FCN / VGG16 weights: BGR, 0..255, mean subtracted.
CAFFE = InputConvention("BGR", 1.0, (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0))
