"""Train an FCN data-parallel on Ray Train: `python jobs/train.py --data URI --storage URI --name RUN ...`

Rerunning the same command with the same --storage/--name resumes after the last completed epoch. The
last stdout line is one JSON summary (best/latest checkpoint, metrics, images/s).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from models import ARCHITECTURES, PADDINGS  # noqa: E402
from pipeline.amp import AMP_CHOICES  # noqa: E402
from pipeline.cli import JobArgumentParser, path_arg, path_or_keyword, print_summary, run_job  # noqa: E402
from pipeline.train.config import COMPILE_MODES, GRAD_COMPRESSIONS, OPTIMIZERS, TrainConfig  # noqa: E402

DEFAULTS = TrainConfig(data="", storage="", name="")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = JobArgumentParser(prog="train.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Train FCN-32s/16s/8s data-parallel on Ray Train (DDP). Checkpoints go to "
                            "STORAGE/NAME/epoch_NNNN/model.pt; rerun with the same name to resume.")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="dataset: VOC-layout directory/prefix or a .csv/.parquet manifest, local or s3:// (required)")
    g.add_argument("--storage", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="where runs are stored: a local directory (shared by all nodes) or s3:// prefix (required)")
    g.add_argument("--name", required=True, default=argparse.SUPPRESS, help="run name; reuse it to resume (required)")
    g.add_argument("--train-split", default=d.train_split, help="split used for training")
    g.add_argument("--val-split", default=d.val_split, help="split evaluated after every epoch")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, choices=list(ARCHITECTURES), help="architecture")
    g.add_argument("--num-classes", type=int, default=argparse.SUPPRESS,
                   help="classes including background (default: the number of lines of the dataset's classes.txt, "
                        "else 21, the VOC classes)")
    g.add_argument("--padding", default=d.padding, choices=PADDINGS,
                   help="'reference' = the paper's conv1_1 padding 100; 'same' = 0.6x the FLOPs")
    g.add_argument("--width-mult", type=float, default=d.width_mult, help="channel width multiplier (<1 for CPU runs)")
    g.add_argument("--backbone-weights", default=d.backbone_weights, type=path_or_keyword("none", "imagenet"),
                   help="VGG16 init: a torchvision vgg16 state-dict FILE/URI, 'imagenet' (downloads), or 'none'")
    g.add_argument("--init-from", default=d.init_from, type=path_arg,
                   help="checkpoint URI of the previous stage (fcn32s -> fcn16s -> fcn8s)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="fc6/fc7 dropout probability")
    g.add_argument("--learn-upsampling", action="store_true", default=d.learn_upsampling,
                   help="train the upsampling layers (the paper's learned variant); by default they stay at the "
                        "bilinear kernel, as the reference trains (see docs/training.md, 'Frozen upsampling')")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="total epochs of the run")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker per step")
    g.add_argument("--crop-size", type=int, default=d.crop_size, help="training crop side (pixels)")
    g.add_argument("--min-scale", type=float, default=d.min_scale, help="smallest random scale")
    g.add_argument("--max-scale", type=float, default=d.max_scale, help="largest random scale")
    g.add_argument("--no-flip", dest="flip", action="store_false", default=argparse.SUPPRESS,
                   help="turn off the random horizontal flips (on by default)")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="optimiser")
    g.add_argument("--lr", type=float, default=d.lr, help="base learning rate (poly schedule to 0)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--poly-power", type=float, default=d.poly_power, help="poly learning-rate schedule power")
    g.add_argument("--amp", default=d.amp, choices=AMP_CHOICES, help="mixed precision on GPU (CPU: always fp32)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="N",
                   help="sum the gradients of N batches before one all-reduce and optimizer step (an effective "
                        "batch of N x --batch-size x --num-workers; see docs/operations.md, 'Scaling')")
    g.add_argument("--grad-compression", default=d.grad_compression, choices=GRAD_COMPRESSIONS,
                   help="all-reduce gradients in this dtype across workers (bf16 halves the bytes)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed of the initialisation")
    g = p.add_argument_group("speed of the training step (same results up to rounding)")
    g.add_argument("--compile", nargs="?", const="default", default=d.compile, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the model for the training step (validation stays eager); MODE is one of "
                        f"{', '.join(COMPILE_MODES[1:])} ('--compile' alone: default); compiling costs start-up time "
                        "in every worker")
    g.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false", default=argparse.SUPPRESS,
                   help="turn off cuDNN autotuning of the training step (on by default on GPU; validation never "
                        "autotunes: its image sizes vary)")
    g.add_argument("--no-fused-optimizer", dest="fused_optimizer", action="store_false", default=argparse.SUPPRESS,
                   help="turn off PyTorch's fused optimizer kernels (on by default, on GPUs and CPUs; foreach "
                        "instead)")
    g = p.add_argument_group("cluster")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="data-parallel workers")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL); otherwise CPU workers (gloo)")
    g.add_argument("--accelerator-type", default=d.accelerator_type, metavar="TYPE",
                   help="with --use-gpu: the GPU type every worker needs, as Ray names it (A10G, L4, L40S, A100, "
                        "H100, ...); on cluster.yaml, L40S puts the workers on the 4-GPU training nodes")
    g.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker,
                   help="CPUs reserved per worker (the rest decode data)")
    g.add_argument("--data-cpus", type=float, default=d.data_cpus, help="CPUs per Ray Data decode/augment task")
    g.add_argument("--max-failures", type=int, default=d.max_failures,
                   help="worker-group restarts from the latest checkpoint before giving up")
    g.add_argument("--keep-best", type=int, default=d.keep_best, help="best checkpoints kept by mean IU (plus the latest)")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help="reject images larger than this")
    g.add_argument("--wait-for-resources", type=float, default=d.wait_for_resources, metavar="SECONDS",
                   help="when the cluster is too small for the workers, ask the autoscaler for them and wait this long "
                        "before giving up (default: 600 on a cluster the job joins ($RAY_ADDRESS), 0 on a local Ray)")
    g.add_argument("--stall-timeout", type=float, default=d.stall_timeout,
                   help="fail with a clear error when no training batch arrives for this many seconds")
    g.add_argument("--progress", dest="progress", action="store_true", default=d.progress,
                   help="show Ray Data's progress bars (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="hide the progress bars, even on a terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    cfg = TrainConfig(**{**args, "amp": args["amp"] if args["use_gpu"] else "off"})  # CPU workers train in fp32
    from pipeline.train.run import run_training

    print_summary(run_training(cfg))
    return 0


if __name__ == "__main__":
    run_job(main)
