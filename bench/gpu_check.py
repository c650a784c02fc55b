"""The GPU check: both jobs at full width on one GPU, the figures issues 13, 19 and 20 ask for, in one short run.

    bench/gpu_check.sh [--dry-run] [OUTDIR] [-- GPU_CHECK_ARGS...]     (the wrapper: kit install, log capture)
    python bench/gpu_check.py --out OUTDIR [--dry-run] [--steps a,b] [--deadline-s S] [--label-args "..."]
                              [--train-args "..."] [--label-images N] [--tiled-images N]

Steps, in this order (`--steps` picks some; the ones a step needs run too; each job runs as its own CLI
process with its log in OUTDIR/<step>.log; a failing step does not stop the others, and the exit status says
whether all passed):

- fwd_matrix: `.gpukit/fwd_matrix.py` (the kit's per-process matrix of forward-pass levers), when present;
- data: mixed-orientation synthetic JPEGs (500x375, 375x500, 500x333): a VOC-layout training set at the
  reference set's train:val proportion (SBD 8,498 : 736, about 11:1) and a labeling set (hard links);
- label_reference / label_same: `jobs/label.py` end to end, reference and `same` padding, with `--label-args`;
- forward_ceiling: forward passes alone at the same settings, by batch size; syncs: host syncs per chunk;
- train_probe: FLOPs per training image, the largest batch that fits, a plain step loop; train: `jobs/train.py`
  with `--train-args` (images/s, MFU, peak memory, validation's share); evaluate: `jobs/evaluate.py` == training;
- precision: bf16 vs fp32 labels; reproducibility: the run's levers vs `--reproducible` labels (share of pixels
  that differ), both on the trained checkpoint when there is one;
- label_tiled: `jobs/label.py --tile 512` end to end on 200 JPEGs of 4000x3000 (issue 34; dry run: 6 of 200x150,
  --tile 64): megapixels/s and tiles/s (labels.tiles), next to the forward ceiling at the tile shape (the model
  alone on (batch, 3, tile, tile) canvases) and their ratio. Last, so a short call's deadline skips it first.

`--deadline-s`: a step that cannot finish before the deadline is skipped (a job's timeout is what is left), so a
short GPU call always returns figures; summary.json is rewritten after every step. The last line is the JSON
summary; copy it to bench/results/<result_name> (its name: date and GPU).

--dry-run: the same steps on CPU with tiny images and a narrow model (`make test` runs it), so no GPU minute
is spent debugging this script.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

# Dense bf16 peaks (NVIDIA datasheets, without sparsity), by the name CUDA reports; the PCIe and NVL cards are
# slower than the SXM ones, so a name is matched whole, never by a substring.
PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
                   "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA A100-SXM4-80GB": 312e12,
                   "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA L40S": 362e12,
                   "NVIDIA A10G": 125e12}
# The reference training set's proportions: SBD train 8,498 images, VOC2011 seg11valid 736.
TRAIN_PER_VAL = 8498 / 736


@dataclass(frozen=True)
class Sizes:
    """Everything the dry run shrinks."""

    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of the synthetic JPEGs
    base_per_size: int      # distinct images rendered per size (the rest are hard links)
    val_images: int
    label_images: int
    width_mult: float
    crop: int
    epochs: int
    batch_candidates: tuple[int, ...]
    ceiling_images: int
    precision_images: int
    device: str
    amp: str
    tiled_size: tuple[int, int]  # (width, height) of the label_tiled step's large JPEGs
    tiled_images: int
    tiled_distinct: int          # distinct large images rendered (the rest are hard links: distinct names)
    tile: int                    # its --tile
    tile_ceiling_tiles: int      # tiles the forward ceiling at the tile shape times


GPU = Sizes(((500, 375), (375, 500), (500, 333)), 48, 200, 8000, 1.0, 320, 3, (192, 128, 64, 32),
            1024, 96, "cuda", "bf16", (4000, 3000), 200, 8, 512, 512)
# Two validation images (23 training images at the reference proportion): an epoch on CPU is mostly its fixed start.
DRY = Sizes(((80, 60), (60, 80), (80, 53)), 4, 2, 48, 1 / 16, 64, 2, (4, 2), 16, 6, "cpu", "off",
            (200, 150), 6, 2, 64, 8)


def log(msg: str) -> None:
    print(f"[gpu_check] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def shared_ray_address() -> str:
    """The address of one local Ray for every job of the check, started on first use and stopped when the check
    exits. A Ray of its own per job cost each job ~5 s (start and stop) of device time; the jobs now join it as
    they join a cluster. (The check's own steps run torch in this process, never Ray.)

    It starts as the GPU kit's slimmed Ray does, without the dashboard (with the project's .venv, the dry run's
    Ray started one anyway: a dozen more processes starting on 2 cores while the first job did), and without the
    idle workers Ray prestarts for its first driver, this process, which never runs a task: one per CPU, each
    importing Ray while the first job starts."""
    import ray

    if not ray.is_initialized():
        from pipeline.ray_setup import RAY_DATA_LOGGING, init_ray

        # What a Ray started by a job gives its workers, here for every job's: Ray Data's console at warnings.
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)
        init_ray("local", log_to_driver=False, include_dashboard=False,
                 _system_config={"prestart_worker_first_driver": False})
        log(f"Ray started for the jobs at {ray.get_runtime_context().gcs_address}")
    return ray.get_runtime_context().gcs_address


def run_cli(out: str, step: str, args: list[str], timeout: float) -> dict:
    """A job as its own process, on the check's Ray; its combined output goes to OUTDIR/<step>.log; returns its
    JSON summary."""
    env = dict(os.environ, RAY_ADDRESS=shared_ray_address())
    path = os.path.join(out, f"{step}.log")
    t = time.perf_counter()
    with open(path, "wb") as f:
        proc = subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                              timeout=timeout)
    seconds = time.perf_counter() - t
    lines = open(path, encoding="utf-8", errors="replace").read().strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {proc.returncode}; last lines of {path}: " + " | ".join(lines[-5:]))
    summary = last_json(lines)
    summary["_process_seconds"] = round(seconds, 2)
    summary["_log_lines"] = len(lines)
    return summary


def last_json(lines: list[str]) -> dict:
    """The job's JSON summary: its last line, or (while Ray workers' late output can follow it) the last line
    holding a JSON object."""
    for line in reversed(lines):
        start = line.find('{"')
        if start >= 0:
            try:
                return json.loads(line[start:])
            except json.JSONDecodeError:
                continue
    raise RuntimeError("no JSON summary in the job's output")


# ---------------------------------------------------------------------------------------------- 1. data


def make_data(work: str, s: Sizes) -> dict:
    from pipeline.synthetic import synthesize_voc

    bases = []
    for i, size in enumerate(s.image_sizes):
        base = os.path.join(work, f"base-{size[0]}x{size[1]}")
        synthesize_voc(base, s.base_per_size, size=size, seed=i, val_fraction=0.0, workers=16)
        bases.append(base)
    ids = [(b, f[:-4]) for b in bases for f in sorted(os.listdir(os.path.join(b, "JPEGImages")))]
    classes = open(os.path.join(bases[0], "classes.txt")).read()

    train_images = round(s.val_images * TRAIN_PER_VAL)
    voc = os.path.join(work, "voc")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(voc, sub))
    names = []
    for k in range(train_images + s.val_images):
        base, stem = ids[k % len(ids)]
        name = f"{k:06d}"
        os.link(os.path.join(base, "JPEGImages", stem + ".jpg"), os.path.join(voc, "JPEGImages", name + ".jpg"))
        os.link(os.path.join(base, "SegmentationClass", stem + ".png"),
                os.path.join(voc, "SegmentationClass", name + ".png"))
        names.append(name)
    with open(os.path.join(voc, "ImageSets/Segmentation/train.txt"), "w") as f:
        f.write("\n".join(names[:train_images]) + "\n")
    with open(os.path.join(voc, "ImageSets/Segmentation/val.txt"), "w") as f:
        f.write("\n".join(names[train_images:]) + "\n")
    with open(os.path.join(voc, "classes.txt"), "w") as f:
        f.write(classes)

    images = os.path.join(work, "label-images")
    os.makedirs(images)
    for k in range(s.label_images):
        base, stem = ids[k % len(ids)]
        os.link(os.path.join(base, "JPEGImages", stem + ".jpg"), os.path.join(images, f"{k:07d}.jpg"))
    return {"voc": voc, "images": images, "num_classes": len(classes.split()), "class_names": classes.split(),
            "train_images": train_images, "val_images": s.val_images, "label_images": s.label_images,
            "distinct_images": len(ids), "sizes": [f"{w}x{h}" for w, h in s.image_sizes]}


# --------------------------------------------------------------------------------------------- 2. train


def gpu_peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device))


def train_probe(s: Sizes, num_classes: int) -> dict:
    """FLOPs of one training image, the largest batch that fits, and a plain step loop at that batch."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model
    from pipeline.amp import autocast

    device = torch.device(s.device)
    model = build_model("fcn8s", num_classes, width_mult=s.width_mult, padding="reference").to(device)
    if device.type == "cuda":  # as the training job: channels-last, no cudnn autotuning
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    crit = nn.CrossEntropyLoss(ignore_index=255)

    def step(b: int) -> None:
        x = torch.randn(b, 3, s.crop, s.crop, device=device)
        y = torch.randint(0, num_classes, (b, s.crop, s.crop), device=device)
        with autocast(device, s.amp):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step(1)
    flops_per_image = counter.get_total_flops()
    result: dict = {"flops_per_train_image": flops_per_image, "crop": s.crop}
    batch = None
    for b in s.batch_candidates:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step(b)
            step(b)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                total = torch.cuda.get_device_properties(device).total_memory
                result.setdefault("probe", []).append({"batch": b, "peak_gb": round(peak / 1e9, 2)})
                if peak > 0.7 * total:  # leave room for DDP buckets, the input pipeline's pinned batches, validation
                    continue
            batch = b
            break
        except torch.OutOfMemoryError:
            result.setdefault("probe", []).append({"batch": b, "oom": True})
            opt.zero_grad(set_to_none=True)
            continue
    if batch is None:
        raise RuntimeError(f"no batch of {s.batch_candidates} fits")
    steps = 10 if device.type == "cuda" else 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(batch)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync()
    seconds = time.perf_counter() - t
    ips = steps * batch / seconds
    peak = gpu_peak_flops(device)
    result.update(batch=batch, plain_images_per_second=round(ips, 1),
                  plain_mfu=round(ips * flops_per_image / peak, 4) if peak else None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def train(work: str, out: str, s: Sizes, data: dict, probe: dict, train_args: list[str], timeout: float) -> dict:
    from pipeline.train.run_state import ledger, run_location

    storage = os.path.join(work, "runs")
    args = ["jobs/train.py", "--data", data["voc"], "--storage", storage, "--name", "gpu-check",
            "--num-classes", str(data["num_classes"]), "--width-mult", str(s.width_mult), "--epochs", str(s.epochs),
            "--batch-size", str(probe["batch"]), "--crop-size", str(s.crop), "--amp", s.amp, "--keep-best", "1",
            "--max-failures", "0", "--lr", "0.001", *train_args]
    if s.device == "cuda":
        cpus = os.cpu_count() or 16
        args += ["--use-gpu", "--cpus-per-worker", "1", "--data-cpus", "1"]
    else:
        cpus = 2
    summary = run_cli(out, "train", args, timeout=timeout)
    epochs = sorted((r["metrics"] for r in ledger(run_location(storage, "gpu-check"))), key=lambda m: m["epoch"])
    rows = []
    for m in epochs:
        epoch_seconds = m["train_seconds"] + m["val_seconds"]
        rows.append({"epoch": m["epoch"], "images_per_second": round(m["images_per_second"], 1),
                     "train_seconds": round(m["train_seconds"], 2), "val_seconds": round(m["val_seconds"], 2),
                     "val_share": round(m["val_seconds"] / epoch_seconds, 3), "mean_iou": m["mean_iou"],
                     "gpu_peak_memory_gb": round(m.get("gpu_peak_memory_gb") or 0.0, 2)})
    warm = rows[1:] or rows  # epoch 1 pays kernel selection and the input pipeline's start
    ips = float(np.mean([r["images_per_second"] for r in warm]))
    from torch import device as torch_device

    peak = gpu_peak_flops(torch_device(s.device))
    return {"epochs": rows, "batch": probe["batch"], "cpus": cpus, "images_per_second": round(ips, 1),
            "mfu": round(ips * probe["flops_per_train_image"] / peak, 4) if peak else None,
            "vs_plain_loop": round(ips / probe["plain_images_per_second"], 3),
            "val_share": round(float(np.mean([r["val_share"] for r in warm])), 3),
            "best_checkpoint": summary["best_checkpoint"], "best_mean_iou": summary["best_mean_iou"],
            "log_lines": summary["_log_lines"], "process_seconds": summary["_process_seconds"]}


# ------------------------------------------------------------------------------------------ 3. evaluate


def evaluate(out: str, s: Sizes, data: dict, trained: dict, timeout: float) -> dict:
    args = ["jobs/evaluate.py", "--data", data["voc"], "--checkpoint", trained["best_checkpoint"], "--amp", s.amp]
    if s.device == "cuda":
        args += ["--use-gpu"]
    summary = run_cli(out, "evaluate", args, timeout=timeout)
    return {"mean_iou": summary["mean_iou"], "training_mean_iou": trained["best_mean_iou"],
            "equal": summary["mean_iou"] == trained["best_mean_iou"], "images": summary["images"],
            "process_seconds": summary["_process_seconds"]}


# --------------------------------------------------------------------------------------------- 4. label


def label_job(work: str, out: str, s: Sizes, data: dict, checkpoint: str, step: str, label_args: list[str],
              timeout: float) -> dict:
    args = ["jobs/label.py", "--images", data["images"], "--checkpoint", checkpoint,
            "--output", os.path.join(work, f"{step}-out"), "--amp", s.amp, "--no-progress", *label_args]
    args += ["--num-gpus", "1"] if s.device == "cuda" else ["--num-gpus", "0", "--device", "cpu"]
    summary = run_cli(out, step, args, timeout=timeout)
    t = summary["timings_seconds"]
    return {"labelled": summary["labelled"], "errors": summary["errors"], "wall_seconds": summary["wall_seconds"],
            "images_per_second_end_to_end": round(summary["labelled"] / summary["wall_seconds"], 1),
            "images_per_second_pipeline": round(summary["labelled"] / t["pipeline"], 1),
            "images_per_second_after_model_ready": round(
                summary["labelled"] / max(1e-9, t["pipeline"] + t["list_and_skip"] + t["ray_start_and_resources"]
                                          - t["inference_ready"]), 1),
            "timings_seconds": t, "resources": summary["resources"], "inference": summary.get("inference"),
            "log_lines": summary["_log_lines"], "process_seconds": summary["_process_seconds"]}


def label_config(label_args: list[str]):
    """The LabelConfig `jobs/label.py` makes of these arguments (parsed by its own parser)."""
    sys.path.insert(0, os.path.join(REPO, "jobs"))
    from label import build_parser

    from pipeline.label.config import LabelConfig

    return LabelConfig(**vars(build_parser().parse_args(["--images", "x", "--checkpoint", "x", "--output", "x",
                                                         *label_args])))


def label_settings(s: Sizes, label_args: list[str], batch_size: int):
    """The InferenceSettings `jobs/label.py` runs with these arguments, at this batch size."""
    return label_config(label_args).inference_settings(batch_size=batch_size, device=s.device)


def prepared_images(data: dict, n: int, config_max_side: int = 1024, multiple: int = 32) -> list:
    from pipeline.decode import decode_image
    from pipeline.label.canvas import preprocess

    files = sorted(os.listdir(data["images"]))[:n]
    return [preprocess(decode_image(open(os.path.join(data["images"], f), "rb").read()), config_max_side, multiple)
            for f in files]


def forward_ceiling(checkpoint: str, s: Sizes, items: list, batch_sizes: tuple[int, ...], label_args: list[str]) -> dict:
    """Forward passes alone on preprocessed canvases (what the job would need for free input), per batch size, at
    the labeling job's settings (its levers: compile seconds are paid in the warm-up, not timed)."""
    import dataclasses

    import torch

    from models import load_checkpoint
    from pipeline.label.inference import Predictor

    ck = load_checkpoint(checkpoint)
    sync = torch.cuda.synchronize if s.device == "cuda" else (lambda: None)
    result = {}
    for b in batch_sizes:
        settings = dataclasses.replace(label_settings(s, label_args, b), amp=s.amp)
        predictor = Predictor(ck.model, ck.convention, settings)
        groups: dict = {}
        for p in items:
            groups.setdefault(p.canvas.shape, []).append(p.canvas)
        batches = [np.stack(c[k:k + b]) for c in groups.values() for k in range(0, len(c) - b + 1, b)]
        for shape in groups:
            predictor.forward(np.zeros((b, *shape), np.uint8))
        sync()
        t = time.perf_counter()
        images = 0
        for batch in batches:
            predictor.forward(batch)
            images += len(batch)
        sync()
        result[str(b)] = round(images / (time.perf_counter() - t), 1) if images else None  # no full batch
        if predictor.compile_seconds:
            result[f"compile_seconds_{b}"] = round(predictor.compile_seconds, 1)
        del predictor
        if s.device == "cuda":
            torch.cuda.empty_cache()
    return result


def make_tiled_images(work: str, s: Sizes, count: int) -> dict:
    """`count` large JPEGs of s.tiled_size for the tiled step: s.tiled_distinct mosaics of synthetic samples
    (each a different arrangement), rendered and encoded in threads, the rest hard links (distinct file names are
    distinct images to the job). A second call reuses the folder."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from pipeline.synthetic import render_sample

    folder = os.path.join(work, f"tiled-{s.tiled_size[0]}x{s.tiled_size[1]}-{count}")
    if os.path.isdir(folder) and len(os.listdir(folder)) == count:
        return {"images": folder, "count": count, "reused": True}
    t = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    width, height = s.tiled_size
    cell = max(32, width // 16)
    rows, cols = -(-height // cell), -(-width // cell)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        samples = list(pool.map(lambda i: render_sample(34, i, (cell, cell))[0], range(16)))

        def mosaic(k: int) -> str:
            order = np.random.default_rng([34, k]).integers(0, len(samples), size=(rows, cols))
            image = np.concatenate([np.concatenate([samples[j] for j in row], axis=1) for row in order])[:height, :width]
            path = os.path.join(folder, f"base-{k:03d}.jpg")
            Image.fromarray(np.ascontiguousarray(image)).save(path, quality=90)
            return path

        bases = list(pool.map(mosaic, range(min(count, s.tiled_distinct))))
    for k in range(count):
        os.link(bases[k % len(bases)], os.path.join(folder, f"{k:05d}.jpg"))
    for path in bases:
        os.remove(path)
    return {"images": folder, "count": count, "distinct": len(bases), "seconds": round(time.perf_counter() - t, 2)}


def labels_pixels_and_tiles(output: str) -> tuple[int, int, int]:
    """(rows, pixels, tiles) of an output's labels/ table: width x height and labels.tiles summed over its rows."""
    import glob

    import pyarrow.parquet as pq

    rows = pixels = tiles = 0
    for path in sorted(glob.glob(os.path.join(output, "labels", "*", "*.parquet"))):
        table = pq.read_table(path, columns=["width", "height", "tiles"])
        w, h = (table.column(c).to_numpy().astype(np.int64) for c in ("width", "height"))
        rows += table.num_rows
        pixels += int((w * h).sum())
        tiles += int(table.column("tiles").fill_null(0).to_numpy().sum())
    return rows, pixels, tiles


def tile_canvases(images: str, tiling, n: int) -> list:
    """`n` tile canvases (Prepared, each a (tile, tile, 3) canvas) cut from the first of the tiled step's images,
    repeated as needed: what the job's batches of tiles hold."""
    from pipeline.decode import decode_image
    from pipeline.label.canvas import Prepared

    rgb = decode_image(open(os.path.join(images, sorted(os.listdir(images))[0]), "rb").read())
    grid = tiling.grid(*rgb.shape[:2])
    tiles = [tiling.tile_canvas(rgb, y, x) for y, x in grid]
    return [Prepared(tiles[k % len(tiles)], tiling.size, tiling.size, tiling.size, tiling.size) for k in range(n)]


def label_tiled(work: str, out: str, s: Sizes, checkpoint: str, label_args: list[str], count: int, timeout: float,
                keep: dict) -> dict:
    """Issue 34: `jobs/label.py --tile` end to end on large images, megapixels/s and tiles/s, then the forward
    ceiling at the tile shape (the model alone on (batch, 3, tile, tile) canvases) at the job's batch size. The
    job's figures go into `keep` first, so a failing ceiling does not lose them. A --tile in --label-args wins."""
    from pipeline.label.tiling import Tiling

    t = time.perf_counter()
    made = make_tiled_images(work, s, count)
    job = label_job(work, out, s, {"images": made["images"]}, checkpoint, "label_tiled",
                    ["--tile", str(s.tile), *label_args], max(10.0, timeout - (time.perf_counter() - t)))
    rows, pixels, tiles = labels_pixels_and_tiles(os.path.join(work, "label_tiled-out"))
    tiling_used = job["inference"]["tiling"]
    timings = job["timings_seconds"]
    seconds = {"end_to_end": job["wall_seconds"], "pipeline": timings["pipeline"],
               "after_model_ready": max(1e-9, timings["pipeline"] + timings["list_and_skip"]
                                        + timings["ray_start_and_resources"] - timings["inference_ready"])}
    figures = {"images": made, "image_size": f"{s.tiled_size[0]}x{s.tiled_size[1]}", "tile": tiling_used["tile"],
               "tile_overlap": tiling_used["tile_overlap"], "tile_blend": tiling_used["tile_blend"],
               "labelled": job["labelled"], "errors": job["errors"], "label_rows": rows,
               "megapixels": round(pixels / 1e6, 3), "tiles": tiles, "tiles_per_image": round(tiles / max(1, rows), 2),
               "batch_size": job["resources"]["batch_size"], "seconds": {k: round(v, 3) for k, v in seconds.items()},
               "timings_seconds": timings, "process_seconds": job["process_seconds"], "log_lines": job["log_lines"]}
    for name, sec in seconds.items():
        figures[f"megapixels_per_second_{name}"] = round(pixels / 1e6 / sec, 3)
        figures[f"tiles_per_second_{name}"] = round(tiles / sec, 2)
    keep["tiled"] = figures
    tiling = Tiling(tiling_used["tile"], tiling_used["tile_overlap"], tiling_used["tile_blend"])
    batch = figures["batch_size"]
    ceiling = forward_ceiling(checkpoint, s, tile_canvases(made["images"], tiling, max(batch, s.tile_ceiling_tiles)),
                              (batch,), label_args)
    bare = ceiling[str(batch)]
    figures.update(forward_ceiling_tiles_per_second=bare,
                   forward_ceiling_megapixels_per_second=round(bare * tiling.size ** 2 / 1e6, 3),
                   forward_ceiling_compile_seconds=ceiling.get(f"compile_seconds_{batch}"),
                   pipeline_vs_ceiling=round(figures["tiles_per_second_pipeline"] / bare, 3),
                   after_model_ready_vs_ceiling=round(figures["tiles_per_second_after_model_ready"] / bare, 3),
                   end_to_end_vs_ceiling=round(figures["tiles_per_second_end_to_end"] / bare, 3))
    return figures


def slot_fill(items: list, batch_size: int, rows_per_call: int) -> float:
    """Share of forward-pass slots holding an image when each actor call groups its rows by canvas."""
    used = slots = 0
    for k in range(0, len(items), rows_per_call):
        groups = _group_counts(items[k:k + rows_per_call])
        used += sum(groups.values())
        slots += sum(-(-n // batch_size) * batch_size for n in groups.values())
    return round(used / max(1, slots), 3)


def precision(checkpoint: str, s: Sizes, items: list) -> dict:
    """bf16 autocast vs fp32 labels of the same images: share of pixels that differ, mean confidence change."""
    from models import load_checkpoint
    from pipeline.label.inference import InferenceSettings, Predictor

    ck = load_checkpoint(checkpoint)
    preds = {}
    for amp in ("bf16", "off"):
        predictor = Predictor(ck.model, ck.convention, InferenceSettings(batch_size=8, device=s.device, amp=amp))
        preds[amp] = predictor.predict(items)
    differ = total = 0
    conf = {"bf16": 0.0, "off": 0.0}
    for a, b in zip(preds["bf16"], preds["off"], strict=True):
        differ += int((a.label != b.label).sum())
        total += a.label.size
        conf["bf16"] += float(a.confidence_sum.sum())
        conf["off"] += float(b.confidence_sum.sum())
    return {"images": len(items), "pixels_differing_share": round(differ / total, 6),
            "mean_confidence_bf16": round(conf["bf16"] / total, 6), "mean_confidence_fp32": round(conf["off"] / total, 6),
            "mean_confidence_difference": round((conf["bf16"] - conf["off"]) / total, 6),
            "bf16_is_autocast": s.device == "cuda"}


def reproducibility(checkpoint: str, s: Sizes, items: list, label_args: list[str], batch_size: int) -> dict:
    """Labels at the run's levers (`--label-args`) against `--reproducible` labels of the same images: the share
    of pixels that differ (docs/labeling.md: below 0.01 % for a default), and each mode run twice in this process (benchmark
    and compiled kernels are chosen per process; the second pass shows whether they are stable within one)."""
    import dataclasses

    from models import load_checkpoint
    from pipeline.label.inference import Predictor

    ck = load_checkpoint(checkpoint)
    fast = dataclasses.replace(label_settings(s, label_args, batch_size), amp=s.amp)
    exact = dataclasses.replace(fast, reproducible=True, cudnn="heuristic", compile="off", grouped_upsampling=False)
    preds = {}
    for name, settings in (("fast", fast), ("reproducible", exact)):
        predictor = Predictor(ck.model, ck.convention, settings)
        first = predictor.predict(items)
        again = predictor.predict(items)
        preds[name] = first
        preds[name + "_stable"] = all((a.label == b.label).all() for a, b in zip(first, again, strict=True))
    differ = sum(int((a.label != b.label).sum()) for a, b in zip(preds["fast"], preds["reproducible"], strict=True))
    total = sum(a.label.size for a in preds["fast"])
    return {"images": len(items), "fast_levers": fast.levers(), "pixels_differing_share": round(differ / total, 8),
            "fast_stable_within_process": preds["fast_stable"],
            "reproducible_stable_within_process": preds["reproducible_stable"]}


def syncs_per_chunk(checkpoint: str, s: Sizes, items: list, batch_size: int) -> dict | None:
    """Host-device synchronisations while the predictor labels one actor call's rows, per forward pass."""
    import torch

    from models import load_checkpoint
    from pipeline.label.inference import InferenceSettings, Predictor

    if s.device != "cuda":
        return None
    ck = load_checkpoint(checkpoint)
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(batch_size=batch_size, device=s.device, amp=s.amp))
    call = items[:4 * batch_size]
    predictor.predict(call)  # warm
    torch.cuda.synchronize()
    chunks = sum(-(-n // batch_size) for n in _group_counts(call).values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            predictor.predict(call)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"images": len(call), "chunks": chunks, "syncs": syncs, "syncs_per_chunk": round(syncs / chunks, 2)}


def _group_counts(items: list) -> dict:
    counts: dict = {}
    for p in items:
        counts[p.canvas.shape] = counts.get(p.canvas.shape, 0) + 1
    return counts


def same_padding_checkpoint(work: str, s: Sizes, data: dict) -> str:
    from pipeline.testbed import random_checkpoint

    path = os.path.join(work, "fcn8s-same.pt")
    random_checkpoint(path, data["class_names"], width_mult=s.width_mult, score_std=0.5, padding="same")
    return path


# ---------------------------------------------------------------------------------------------- main


def environment(s: Sizes) -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(), "device": s.device}
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        pass
    if s.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / 1e9, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   peak_bf16_tflops=(PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(0)) or 0) / 1e12 or None,
                   clocks=gpu_clocks())
    return env


def gpu_clocks() -> dict | None:
    """SM clock now and at most, power and temperature (nvidia-smi): a throttled card explains a slow run."""
    fields = "clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,pstate"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))


def result_name(env: dict, dry_run: bool) -> str:
    """bench/results/<date>-<gpu>.json: one file per GPU run, named by its date and GPU."""
    gpu = "cpu-dry-run" if dry_run else "".join(c if c.isalnum() else "-" for c in env.get("gpu", "gpu").lower())
    return f"{time.strftime('%Y-%m-%d')}-{'-'.join(filter(None, gpu.split('-')))}.json"


def fwd_matrix(out: str, s: Sizes, budget: float) -> dict:
    """The kit's forward-pass matrix (.gpukit/fwd_matrix.py): one configuration per process, within `budget`."""
    script = os.path.join(REPO, ".gpukit", "fwd_matrix.py")
    if not os.path.exists(script):
        return {"skipped": "no .gpukit/fwd_matrix.py (build the kit: bash ../shared/gpu-kit/build)"}
    args = [script, "--repo", REPO, "--out", os.path.join(out, "fwd"), "--budget-s", str(int(budget))]
    if s.device != "cuda":
        args.append("--dry-run")
    with open(os.path.join(out, "fwd_matrix.log"), "wb") as f:
        subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=budget + 180)
    path = os.path.join(out, "fwd", "fwd_matrix.json")
    return json.load(open(path)) if os.path.exists(path) else {"skipped": "fwd_matrix.py wrote no fwd_matrix.json"}


# Steps in order, what each needs, and (GPU) the seconds one needs at least to be worth starting.
STEPS = ("fwd_matrix", "data", "label_reference", "prepare_images", "forward_ceiling", "syncs", "label_same",
         "train_probe", "train", "evaluate", "precision", "reproducibility", "label_tiled")
NEEDS = {"label_reference": ("data",), "prepare_images": ("data",), "forward_ceiling": ("prepare_images",),
         "syncs": ("prepare_images",), "label_same": ("data",), "train_probe": ("data",), "train": ("train_probe",),
         "evaluate": ("train",), "precision": ("prepare_images",), "reproducibility": ("prepare_images",),
         "label_tiled": ("data",)}
# label_tiled: ~50-80 s on one H100 (docs/gpu.md "The next GPU call, prepared"); under 60 s left it is skipped.
MIN_SECONDS = {"fwd_matrix": 120, "data": 20, "label_reference": 60, "prepare_images": 10, "forward_ceiling": 40,
               "syncs": 10, "label_same": 60, "train_probe": 40, "train": 120, "evaluate": 30, "precision": 20,
               "reproducibility": 30, "label_tiled": 60}
JOB_TIMEOUT = {"label_reference": 240, "label_same": 240, "train": 300, "evaluate": 150, "label_tiled": 150}


def selected_steps(names: str | None) -> list[str]:
    """The steps asked for and every step they need, in STEPS order."""
    if not names:
        return [name for name in STEPS if name != "fwd_matrix"]
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = wanted - set(STEPS)
    if unknown:
        raise SystemExit(f"error: unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    todo = set()
    stack = list(wanted)
    while stack:
        name = stack.pop()
        if name not in todo:
            todo.add(name)
            stack.extend(NEEDS.get(name, ()))
    return [name for name in STEPS if name in todo]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "gpu-check-out"), help="folder for logs and JSON")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny sizes")
    ap.add_argument("--steps", help=f"comma-separated steps to run (and what they need): {', '.join(STEPS)}; "
                                    "default: all but fwd_matrix")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="seconds from start after which no step starts; job timeouts shrink to fit")
    ap.add_argument("--label-args", default="", help="extra jobs/label.py arguments (its levers: --cudnn, --compile, "
                                                     "--batch-size ...), also used by forward_ceiling and reproducibility")
    ap.add_argument("--train-args", default="", help="extra jobs/train.py arguments")
    ap.add_argument("--label-images", type=int, default=None, help="images of the labeling steps (GPU: 8,000)")
    ap.add_argument("--tiled-images", type=int, default=None, help="large images of the label_tiled step (GPU: 200 "
                                                                  "of 4000x3000; dry run: 6 of 200x150)")
    ap.add_argument("--fwd-budget-s", type=float, default=360, help="budget of the fwd_matrix step")
    ap.add_argument("--keep-work", action="store_true", help="keep the synthetic data and job outputs (a temporary "
                    "folder, named in the log)")
    args = ap.parse_args(argv)
    s = DRY if args.dry_run else GPU
    if args.label_images:
        s = dataclasses.replace(s, label_images=args.label_images)
    if args.tiled_images:
        s = dataclasses.replace(s, tiled_images=args.tiled_images)
    steps = selected_steps(args.steps)
    label_args, train_args = shlex.split(args.label_args), shlex.split(args.train_args)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-check-work-")  # thousands of files: never under OUTDIR
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.perf_counter()
    env = environment(s)
    result: dict = {"check": "gpu", "dry_run": args.dry_run, "environment": env, "failed": [], "skipped": [], "ran": [],
                    "steps": steps, "label_args": label_args, "train_args": train_args,
                    "result_name": result_name(env, args.dry_run)}
    log(f"environment {json.dumps(env)}; steps {','.join(steps)}; work folder {work}")

    def save() -> None:  # after every step: a run cut short still leaves its figures
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(result, f, indent=1, sort_keys=True, default=str)

    def left() -> float:
        return float("inf") if args.deadline_s is None else args.deadline_s - (time.perf_counter() - started)

    def timeout(name: str) -> float:
        base = JOB_TIMEOUT[name] if s.device == "cuda" else 300
        return max(10.0, min(base, left() - 5))

    def step(name: str, fn, *a):
        save()
        if name not in steps:
            return None
        if left() < (MIN_SECONDS[name] if s.device == "cuda" else 0):
            result["skipped"].append(name)
            log(f"{name} skipped: {max(0.0, left()):.0f} s left before the deadline")
            return None
        t = time.perf_counter()
        log(f"{name} ...")
        result["ran"].append(name)
        try:
            value = fn(*a)
            shown = f"{len(value)} items" if isinstance(value, list) else json.dumps(value, default=str)[:600]
            log(f"{name} done in {time.perf_counter() - t:.1f} s: {shown}")
            return value
        except Exception as e:  # noqa: BLE001 - recorded; the other steps still run
            result["failed"].append(name)
            log(f"{name} FAILED after {time.perf_counter() - t:.1f} s: {type(e).__name__}: {e}")
            with open(os.path.join(out, f"{name}.traceback.txt"), "w") as f:
                traceback.print_exc(file=f)
            return None

    result["fwd_matrix"] = step("fwd_matrix", fwd_matrix, out, s, min(args.fwd_budget_s, max(60.0, left() - 60)))
    data = step("data", make_data, work, s)
    if data is not None:
        result["data"] = {k: v for k, v in data.items() if k not in ("voc", "images", "class_names")}
        run_steps(result, step, timeout, work, out, s, data, label_args, train_args)
    result["skipped"] += [name for name in steps if name not in result["ran"] and name not in result["skipped"]]
    result["seconds"] = round(time.perf_counter() - started, 1)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    save()
    log(f"finished in {result['seconds']} s; failed steps: {result['failed'] or 'none'}; "
        f"skipped: {result['skipped'] or 'none'}")
    print(json.dumps(result, sort_keys=True), flush=True)
    return 1 if result["failed"] else 0


def run_steps(result: dict, step, timeout, work: str, out: str, s: Sizes, data: dict, label_args: list[str],
              train_args: list[str]) -> None:
    """Every step after the data, in STEPS order: labeling first (its figures matter most, on random weights:
    throughput does not depend on them), then training, then the label comparisons on the trained weights, then
    tiled labeling."""
    from pipeline.testbed import random_checkpoint

    random_ck = os.path.join(work, "fcn8s-reference.pt")
    random_checkpoint(random_ck, data["class_names"], width_mult=s.width_mult, score_std=0.5)
    label: dict = {}
    result["label"] = label
    label["reference"] = step("label_reference", label_job, work, out, s, data, random_ck, "label_reference",
                              label_args, timeout("label_reference"))
    items = step("prepare_images", prepared_images, data, s.ceiling_images, 1024,
                 label_settings(s, label_args, 1).canvas_multiple) or []
    # The job's batch: what its plan chose, else --batch-size of the label arguments, else the plan's default (4).
    batch = int((label.get("reference") or {}).get("resources", {}).get("batch_size")
                or label_config(label_args).batch_size or 4)
    if items:
        label["batch_size"] = batch
        ceiling = step("forward_ceiling", forward_ceiling, random_ck, s, items, tuple(sorted({1, 4, 8, 16, batch})),
                       label_args)
        label["forward_ceiling_images_per_second_by_batch"] = ceiling
        at_batch = (ceiling or {}).get(str(batch))
        label["slot_fill"] = {"rows_per_call_4x_batch": slot_fill(items, batch, 4 * batch),
                              "rows_per_call_16x_batch": slot_fill(items, batch, 16 * batch)}
        if at_batch and label.get("reference"):
            label["reference_pipeline_vs_ceiling"] = round(label["reference"]["images_per_second_pipeline"] / at_batch, 3)
            label["reference_after_model_ready_vs_ceiling"] = round(
                label["reference"]["images_per_second_after_model_ready"] / at_batch, 3)
        label["syncs"] = step("syncs", syncs_per_chunk, random_ck, s, items, batch)
    if "label_same" in result["steps"]:
        same_ck = same_padding_checkpoint(work, s, data)
        label["same"] = step("label_same", label_job, work, out, s, data, same_ck, "label_same", label_args,
                             timeout("label_same"))
    probe = step("train_probe", train_probe, s, data["num_classes"])
    result["train_probe"] = probe
    trained = step("train", train, work, out, s, data, probe, train_args, timeout("train")) if probe else None
    result["train"] = trained
    if trained:
        result["evaluate"] = step("evaluate", evaluate, out, s, data, trained, timeout("evaluate"))
        if result["evaluate"] and not result["evaluate"]["equal"]:
            result["failed"].append("evaluate_equals_training")
    if items:  # label comparisons on trained weights where there are some (random ones are all near-ties)
        weights = trained["best_checkpoint"] if trained else random_ck
        label["comparison_weights"] = "trained" if trained else "random"
        label["precision"] = step("precision", precision, weights, s, items[:s.precision_images])
        label["reproducibility"] = step("reproducibility", reproducibility, weights, s, items[:s.precision_images],
                                        label_args, batch)
    # Last: the newest figures (issue 34), so a short call's deadline skips this before the owed ones. Random
    # weights: throughput does not depend on them.
    label["tiled"] = step("label_tiled", label_tiled, work, out, s, random_ck, label_args, s.tiled_images,
                          timeout("label_tiled"), label) or label.get("tiled")


if __name__ == "__main__":
    sys.exit(main())
