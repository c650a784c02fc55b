"""TrainConfig: every option of a training run, with the defaults `jobs/train.py --help` shows."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from models import MAX_CLASSES

from ..amp import AMP_CHOICES
from ..errors import CPU_QUANTUM, UsageError, check_name, check_number

OPTIMIZERS = ("sgd", "adam")
GRAD_COMPRESSIONS = ("none", "bf16")
# torch.compile modes of --compile (no CUDA-graph modes: DDP's all-reduce hooks and the optimizer run outside them).
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
# --seed: torch.manual_seed takes 64 bits, and each worker adds its rank times 1,000,003; 32 bits leave room.
MAX_SEED = 2**32 - 1
MAX_SCALE = 8.0  # scale augmentation: a crop of 1/8 of the image, or 8x it


@dataclass
class TrainConfig:
    data: str
    storage: str
    name: str
    model: str = "fcn8s"
    num_classes: int | None = None   # None: the dataset's classes.txt, else 21 (VOC)
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
    # The reference keeps the upsamplers at the bilinear kernel (Caffe lr_mult=0); True trains them (the paper's
    # learned variant). See pipeline/train/step.py.
    learn_upsampling: bool = False
    # Optimiser: torchvision's segmentation reference (SGD, momentum 0.9, weight decay, poly schedule 0.9)
    # scaled to the FCN paper's VGG setting; see docs/training.md.
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    amp: str = "bf16"                # one of AMP_CHOICES; GPU only, CPU workers always train in fp32
    grad_accum: int = 1              # batches whose gradients are summed before one all-reduce and step
    grad_compression: str = "none"   # one of GRAD_COMPRESSIONS: the dtype of the gradient all-reduce
    # Speed of the training step (results unchanged up to rounding); each is recorded in the run's metrics.
    compile: str = "off"             # one of COMPILE_MODES: torch.compile of the model for the training step
    cudnn_benchmark: bool = True     # GPU: cuDNN autotuning inside the training step only (fixed crop)
    fused_optimizer: bool = True     # PyTorch's fused optimizer kernels (GPU and CPU), else foreach
    num_workers: int = 1
    use_gpu: bool = False
    accelerator_type: str | None = None  # GPU type the workers need (e.g. L40S): picks cluster.yaml's training nodes
    cpus_per_worker: float = 1.0
    data_cpus: float = 1.0           # CPUs per Ray Data decode/augment task
    keep_best: int = 3               # best K checkpoints by mean IU are kept, plus the latest
    max_failures: int = 3
    max_pixels: int = 64_000_000
    wait_for_resources: float | None = None  # seconds; None: 600 on a joined cluster, 0 on a local Ray
    stall_timeout: float = 900.0      # seconds without a training batch before the run fails with a clear error
    seed: int = 0
    progress: bool | None = None     # Ray Data progress bars; None: when stderr is a terminal
    train_split: str = "train"
    val_split: str = "val"

    def validate(self) -> None:
        """Option values alone (no I/O); raises UsageError (a ValueError) naming the flag. Every number is checked
        here, NaN and inf included (argparse's float reads them), so a bad value fails before Ray starts."""
        for name, value in [("epochs", self.epochs), ("batch-size", self.batch_size), ("crop-size", self.crop_size),
                            ("num-workers", self.num_workers), ("grad-accum", self.grad_accum),
                            ("keep-best", self.keep_best), ("max-pixels", self.max_pixels)]:
            check_number(f"--{name}", value, at_least=1)
        check_number("--num-classes", self.num_classes, at_least=1, at_most=MAX_CLASSES)
        check_number("--max-failures", self.max_failures, at_least=0)
        check_number("--seed", self.seed, at_least=0, at_most=MAX_SEED)
        check_number("--width-mult", self.width_mult, at_least=1 / 64, at_most=1.0)  # 1/64: one channel
        check_number("--dropout", self.dropout, at_least=0.0, below=1.0)
        check_number("--min-scale", self.min_scale, above=0.0, at_most=MAX_SCALE)
        check_number("--max-scale", self.max_scale, above=0.0, at_most=MAX_SCALE)
        if self.max_scale < self.min_scale:
            raise UsageError(f"--max-scale must be >= --min-scale ({self.min_scale!r}), got {self.max_scale!r}")
        check_number("--lr", self.lr, above=0.0, at_most=10.0)
        check_number("--momentum", self.momentum, at_least=0.0, below=1.0)
        for name, value in [("weight-decay", self.weight_decay), ("poly-power", self.poly_power)]:
            check_number(f"--{name}", value, at_least=0.0)
        for name, value in [("cpus-per-worker", self.cpus_per_worker), ("data-cpus", self.data_cpus)]:
            check_number(f"--{name}", value, at_least=CPU_QUANTUM)
        check_number("--wait-for-resources", self.wait_for_resources, at_least=0.0, unit="seconds")
        check_number("--stall-timeout", self.stall_timeout, at_least=1.0, below=1e9, unit="seconds")
        if self.amp not in AMP_CHOICES:
            raise UsageError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.grad_compression not in GRAD_COMPRESSIONS:
            raise UsageError(f"--grad-compression must be one of {', '.join(GRAD_COMPRESSIONS)}, "
                             f"got {self.grad_compression!r}")
        if self.compile not in COMPILE_MODES:
            raise UsageError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check_name("--name", self.name, "run name")  # STORAGE/NAME: '..' would write beside --storage
        check_name("--train-split", self.train_split, "split name")  # ImageSets/Segmentation/<split>.txt
        check_name("--val-split", self.val_split, "split name")

    def to_dict(self) -> dict:
        return asdict(self)
