"""TrainConfig: every option of a training run, with the defaults `jobs/train.py --help` shows."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainConfig:
    data: str
    storage: str
    name: str
    model: str = "fcn8s"
    num_classes: int = 21
    padding: str = "reference"
    width_mult: float = 1.0
    backbone_weights: str = "none"  # FILE/URI of a torchvision VGG16 state dict, "imagenet", or "none"
    init_from: str | None = None     # checkpoint URI of the previous stage (staged 32s -> 16s -> 8s)
    epochs: int = 50
    batch_size: int = 8              # per worker
    crop_size: int = 320
    min_scale: float = 0.5
    max_scale: float = 2.0
    flip: bool = True
    dropout: float = 0.5
    # Optimiser: torchvision's segmentation reference (SGD, momentum 0.9, weight decay, poly schedule 0.9)
    # scaled to the FCN paper's VGG setting; see README "Training".
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    amp: str = "bf16"                # GPU only; CPU workers always train in fp32
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_cpus: float = 1.0           # CPUs per Ray Data decode/augment task
    keep_best: int = 3               # best K checkpoints by mean IU are kept, plus the latest
    max_failures: int = 3
    max_pixels: int = 64_000_000
    seed: int = 0
    train_split: str = "train"
    val_split: str = "val"

    def to_dict(self) -> dict:
        return asdict(self)
