"""Training throughput: the Ray Train job (1 worker) vs a plain single-process PyTorch loop, same run.

Same model, data, batch, augmentation and CPU budget on both sides: one CPU trains (torch with 1 thread),
one CPU decodes and augments (Ray Data there; a torch DataLoader worker here). Epoch 1 warms up and is left
out. Prints one JSON line with both images/s figures and `ray_vs_plain` (target >= 0.95): training images/s,
i.e. the time inside each epoch's training loop (input waits included, the Ray job's per-epoch validation and
checkpoint excluded; the plain loop has neither). The plain loop runs before and after the Ray job and the ratio
uses the mean of the two (a shared 2-core machine drifts by several per cent within minutes; ABA cancels a
linear drift); the ratio against the faster plain run is printed too. For context it also prints each side's
end-to-end wall time (the Ray job's includes starting the worker group, validating and checkpointing), and a
ceiling in the same run: training steps alone on one batch already in memory (`ray_vs_step_ceiling`).

    python bench/train_bench.py [--images 192] [--epochs 6] [--width-mult 0.25] [--crop 128]
                                [--device cpu|cuda] [--amp bf16|fp16|off] [--loader-workers 1] [--compile MODE]

The plain loop's step is the job's (pipeline/train/step.py): frozen upsampling, the job's optimizer implementation
(fused kernels), cuDNN autotuning inside the step on CUDA, and --compile on both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import TORCHVISION, build_model  # noqa: E402
from pipeline.batching import to_input  # noqa: E402
from pipeline.dataset_formats import list_samples  # noqa: E402
from pipeline.storage import Location  # noqa: E402
from pipeline.synthetic import synthesize_voc  # noqa: E402
from pipeline.train.config import COMPILE_MODES, TrainConfig  # noqa: E402
from pipeline.train.inputs import load_pair  # noqa: E402
from pipeline.train.transforms import TrainTransform  # noqa: E402


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, samples, transform, num_classes):
        self.samples, self.transform, self.num_classes = samples, transform, num_classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        image, mask = load_pair(s["image"], s["mask"], num_classes=self.num_classes, max_pixels=64_000_000)
        image, mask = self.transform(image, mask, np.random.default_rng())
        return torch.from_numpy(image), torch.from_numpy(mask)


def _model_and_step(args):
    from pipeline.amp import autocast
    from pipeline.train.step import compile_for_training, cudnn_benchmark, make_optimizer, set_upsampling

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("fcn8s", 6, width_mult=args.width_mult, padding="same").to(device)
    set_upsampling(model, learn=False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(TrainConfig(data="", storage="", name="", lr=0.01, momentum=0.9, weight_decay=5e-4), model,
                         device)
    forward = compile_for_training(model, args.compile)
    crit = nn.CrossEntropyLoss(ignore_index=255)
    normalize = TORCHVISION.normalizer(device)

    def step(image, mask):
        with cudnn_benchmark(device.type == "cuda"):
            x = to_input(image, normalize, device, channels_last=device.type == "cuda")
            with autocast(device, args.amp):
                loss = crit(forward(x).float(), mask.to(device, non_blocking=True).long())
            opt.zero_grad()
            loss.backward()
            opt.step()

    return device, step


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(samples, args) -> list[float]:
    torch.set_num_threads(1)
    device, step = _model_and_step(args)
    loader = torch.utils.data.DataLoader(PairDataset(samples, TrainTransform(args.crop), 6), batch_size=args.batch,
                                         shuffle=True, num_workers=args.loader_workers, persistent_workers=True,
                                         pin_memory=device.type == "cuda")
    rates = []
    for _ in range(args.epochs):
        t0, n = time.perf_counter(), 0
        for image, mask in loader:
            step(image, mask)
            n += len(image)
        _sync(device)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def step_ceiling(args, steps: int = 20) -> float:
    """Training steps alone, on one batch already in memory (no input pipeline): images/s."""
    device, step = _model_and_step(args)
    image = torch.randint(0, 255, (args.batch, args.crop, args.crop, 3), dtype=torch.uint8)
    mask = torch.randint(0, 6, (args.batch, args.crop, args.crop), dtype=torch.uint8)
    step(image, mask)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(image, mask)
    _sync(device)
    return steps * args.batch / (time.perf_counter() - t)


def ray_job(data, args) -> tuple[list[float], float]:
    import ray

    from pipeline.ray_setup import init_ray
    from pipeline.train.config import TrainConfig
    from pipeline.train.run import run_training
    from pipeline.train.run_state import run_location, scan_checkpoints

    gpu = args.device == "cuda"
    init_ray("local", num_cpus=1 + args.loader_workers, num_gpus=1 if gpu else 0, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="trainbench")
    cfg = TrainConfig(data=data, storage=storage, name="bench", num_classes=6, width_mult=args.width_mult,
                      padding="same", epochs=args.epochs, batch_size=args.batch, crop_size=args.crop,
                      amp=args.amp if gpu else "off", use_gpu=gpu, num_workers=1, cpus_per_worker=1.0,
                      keep_best=args.epochs, max_failures=0, compile=args.compile)
    t0 = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - t0
    ray.shutdown()
    return [c["metrics"]["images_per_second"] for c in scan_checkpoints(run_location(storage, "bench"))], wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default="off", help="autocast on CUDA (CPU: fp32)")
    p.add_argument("--loader-workers", type=int, default=1,
                   help="decode/augment processes of the plain loop; the Ray job gets as many CPUs for Ray Data")
    p.add_argument("--compile", choices=COMPILE_MODES, default="off", help="torch.compile mode on both sides")
    args = p.parse_args()
    if args.device == "cpu":
        args.amp = "off"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    data = os.path.join(tempfile.mkdtemp(prefix="trainbench-data"), "syn")
    synthesize_voc(data, args.images + 8, size=(160, 120), seed=0, val_fraction=8 / (args.images + 8))
    samples = list_samples(Location.of(data), "train")
    t0 = time.perf_counter()
    plain = plain_loop(samples, args)
    plain_wall = time.perf_counter() - t0
    ray_rates, ray_wall = ray_job(data, args)
    plain_after = plain_loop(samples, args)
    ceiling = step_ceiling(args)
    before, after = float(np.mean(plain[1:])), float(np.mean(plain_after[1:]))
    plain_ips, ray_ips = (before + after) / 2, float(np.mean(ray_rates[1:]))
    print(json.dumps({"bench": "train", "device": args.device, "amp": args.amp, "model": "fcn8s",
                      "compile": args.compile, "upsampling": "frozen",
                      "step_ceiling_images_per_second": round(ceiling, 2),
                      "ray_vs_step_ceiling": round(ray_ips / ceiling, 3), "width_mult": args.width_mult,
                      "padding": "same", "crop": args.crop, "batch": args.batch, "train_images": len(samples),
                      "epochs_measured": args.epochs - 1, "plain_images_per_second": round(plain_ips, 2),
                      "plain_before_after": [round(before, 2), round(after, 2)],
                      "ray_images_per_second": round(ray_ips, 2), "ray_vs_plain": round(ray_ips / plain_ips, 3),
                      "ray_vs_faster_plain": round(ray_ips / max(before, after), 3),
                      "per_epoch": {"plain": [round(r, 2) for r in plain], "ray": [round(r, 2) for r in ray_rates],
                                    "plain_after": [round(r, 2) for r in plain_after]},
                      "wall_seconds": {"plain_loop": round(plain_wall, 1), "ray_job": round(ray_wall, 1)}}))


if __name__ == "__main__":
    main()
