"""Labeling benchmark: the Ray Data job against the bare model and a naive loop, same machine, same images.

    python bench/label_bench.py [--images 48] [--max-side 128] [--batch-size 4] [--device cpu|cuda] [--amp bf16|off]

In one run, on a few dozen images (real photos shipped with scikit-image plus synthetic VOC-style images):

(a) model: full-width FCN-8s forward passes alone, on already preprocessed canvases (the ceiling);
(b) pipeline: `label_images` end to end (list, skip, read, decode, infer, postprocess, commit Parquet) from a
    local directory and from an S3 server (moto, in this process, on loopback), on a Ray already running;
(c) naive: one process, one image at a time: read, decode, resize, infer, upsample, argmax, encode, write;
(d) memory: peak resident memory (sum of PSS over every process of the job: driver, raylet, GCS, workers,
    object store pages) of `jobs/label.py` run as its own process tree at N and 4N images, reduced-width model.

Prints one JSON line; record the figures in bench/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.memory import run_measuring_memory  # noqa: E402
from models import VOC_CLASSES, load_checkpoint  # noqa: E402
from pipeline.host_memory import keeps_freed_memory, restart_keeping_freed_memory  # noqa: E402
from pipeline.testbed import random_checkpoint, sample_photo_paths  # noqa: E402


def make_images(root: str, count: int, seed: int = 0) -> list[str]:
    """About a quarter real photos (re-encoded JPEG/PNG copies, so every file differs), the rest synthetic."""
    from pipeline.synthetic import synthesize_voc

    os.makedirs(root, exist_ok=True)
    photos = sample_photo_paths()
    n_real = max(3, count // 4)
    for i in range(n_real):
        path = photos[i % len(photos)]
        img = Image.open(path).convert("RGB")
        stem = f"photo_{i:03d}_{os.path.basename(path).split('.')[0]}"
        if i % 2:
            img.save(os.path.join(root, stem + ".jpg"), "JPEG", quality=85 + i % 10)
        else:
            img.save(os.path.join(root, stem + ".png"))
    syn = tempfile.mkdtemp(prefix="label-bench-syn-")
    synthesize_voc(syn, count - n_real, size=(320, 240), seed=seed)
    for path in sorted(glob.glob(os.path.join(syn, "JPEGImages", "*.jpg"))):
        shutil.copy(path, os.path.join(root, os.path.basename(path)))
    shutil.rmtree(syn)
    return sorted(os.path.join(root, f) for f in os.listdir(root))


def make_checkpoint(path: str, width_mult: float = 1.0) -> str:
    return random_checkpoint(path, list(VOC_CLASSES), width_mult=width_mult, score_std=0.01)


# ------------------------------------------------------------------------------------------- (a) model


def bench_model(ck_path: str, files: list[str], *, max_side: int, batch_size: int, threads: int, device: str = "cpu",
                amp: str = "off") -> dict:
    from pipeline.decode import decode_image
    from pipeline.label.canvas import preprocess
    from pipeline.label.inference import InferenceSettings, Predictor

    torch.set_num_threads(threads)
    ck = load_checkpoint(ck_path)
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(max_side=max_side, batch_size=batch_size,
                                                                     device=device, amp=amp))
    sync = torch.cuda.synchronize if predictor.cuda else (lambda: None)
    prepared = [preprocess(decode_image(open(f, "rb").read()), max_side, 32) for f in files]
    groups: dict[tuple, list[np.ndarray]] = {}
    for p in prepared:
        groups.setdefault(p.canvas.shape, []).append(p.canvas)
    batches = [np.stack(c[k:k + batch_size]) for c in groups.values() for k in range(0, len(c), batch_size)]
    for shape in groups:  # warm-up: one pass per canvas shape (kernel selection), not timed
        predictor.forward(np.zeros((1, *shape), np.uint8))
    sync()
    t = time.perf_counter()
    for b in batches:
        predictor.forward(b)
    sync()
    seconds = time.perf_counter() - t
    # What the job's actor does besides the forward passes, on the same images: labels at the original size,
    # argmax, confidence and per-class statistics (`labels_and_stats`, timed around each call; on a CPU it runs
    # synchronously). The pipeline pays it, the forward-only ceiling does not (issue 25: 49 ms per image before,
    # on these images; ~6 % of a full-width forward pass on 2 cores).
    stats_seconds = 0.0
    labels_and_stats = predictor.labels_and_stats

    def timed(*args):
        nonlocal stats_seconds
        t0 = time.perf_counter()
        try:
            return labels_and_stats(*args)
        finally:
            stats_seconds += time.perf_counter() - t0

    predictor.labels_and_stats = timed
    predictor.predict(prepared)
    sync()
    return {"images": len(files), "seconds": round(seconds, 3), "images_per_second": round(len(files) / seconds, 3),
            "forward_passes": len(batches), "canvases": sorted(f"{s[0]}x{s[1]}" for s in groups),
            "labels_and_stats_ms_per_image": round(1e3 * stats_seconds / len(files), 1),
            "labels_and_stats_vs_forward": round(stats_seconds / seconds, 3)}


# ------------------------------------------------------------------------------------------- (c) naive


def bench_naive(ck_path: str, files: list[str], out_dir: str, *, max_side: int, threads: int, device: str = "cpu",
                amp: str = "off") -> dict:
    """What one would write first: a loop over files, batch of one, native size, one output file per image."""
    import torch.nn.functional as F

    from pipeline.amp import autocast
    from pipeline.decode import decode_image

    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    t = time.perf_counter()
    dev = torch.device(device)
    ck = load_checkpoint(ck_path, map_location=dev)
    for path in files:
        rgb = decode_image(open(path, "rb").read())
        height, width = rgb.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        small = np.asarray(Image.fromarray(rgb).resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                       Image.BILINEAR)) if scale < 1 else rgb
        x = ck.convention.normalize(torch.from_numpy(np.array(small)).permute(2, 0, 1).to(dev))[None]
        with torch.inference_mode():
            with autocast(dev, amp):
                logits = ck.model(x)
            logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)[0]
            prob = torch.softmax(logits, 0)
            conf, label = prob.max(0)
        label, conf = label.to(torch.uint8).cpu().numpy(), conf.cpu()
        counts = np.bincount(label.ravel(), minlength=len(ck.class_names))
        conf_sum = np.bincount(label.ravel(), weights=conf.numpy().ravel(), minlength=len(ck.class_names))
        stats = {ck.class_names[c]: {"pixels": int(counts[c]), "mean_confidence": float(conf_sum[c] / counts[c])}
                 for c in np.nonzero(counts)[0]}
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(label).save(os.path.join(out_dir, stem + ".png"))
        with open(os.path.join(out_dir, stem + ".json"), "w") as f:
            json.dump({"image": path, "width": width, "height": height, "classes": stats}, f)
    seconds = time.perf_counter() - t
    return {"images": len(files), "seconds": round(seconds, 3), "images_per_second": round(len(files) / seconds, 3)}


# ---------------------------------------------------------------------------------------- (b) pipeline


def upload_to_s3(files: list[str]) -> object:
    """Start moto's S3 server in this process, point this process (and the Ray it starts later) at it and copy
    the images to s3://bench/images. Returns the server."""
    import s3fs

    from pipeline.testbed import loopback_s3_env, start_loopback_s3

    server, endpoint = start_loopback_s3()
    os.environ.update(loopback_s3_env(endpoint))
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    for f in files:
        fs.pipe(f"bench/images/{os.path.basename(f)}", open(f, "rb").read())
    return server


def bench_pipeline(work: str, files: list[str], ck_path: str, *, max_side: int, batch_size: int, cpus: int,
                   device: str = "cpu", amp: str = "off") -> dict:
    """The job end to end from a local folder and from S3, on a Ray started (and warmed by one small job) first."""
    import ray

    from pipeline.label.config import LabelConfig
    from pipeline.label.job import label_images
    from pipeline.ray_setup import init_ray

    result: dict = {}
    t = time.perf_counter()
    gpus = {"num_gpus": 1, "device": "cuda"} if device == "cuda" else {"num_gpus": 0, "device": "cpu"}
    init_ray("local", num_cpus=cpus, log_to_driver=False)  # the jobs' own local-Ray setup
    result["ray_init_seconds"] = round(time.perf_counter() - t, 2)
    # A nightly job runs on a cluster that has run jobs before: one small job first warms Ray's worker
    # processes (imports); every measured job still starts its own actors and loads the model.
    warm_dir = os.path.join(work, "warmup")
    os.makedirs(warm_dir)
    shutil.copy(files[-1], warm_dir)
    t = time.perf_counter()
    label_images(LabelConfig(images=warm_dir, checkpoint=ck_path, output=os.path.join(work, "warmup-out"),
                             max_side=max_side, batch_size=batch_size, progress=False, amp=amp, **gpus))
    result["warmup_job_seconds"] = round(time.perf_counter() - t, 2)
    for name, images, output in [("pipeline_local", os.path.join(work, "images"), os.path.join(work, "out")),
                                 ("pipeline_s3", "s3://bench/images", "s3://bench/out")]:
        config = LabelConfig(images=images, checkpoint=ck_path, output=output, max_side=max_side,
                             batch_size=batch_size, progress=False, amp=amp, **gpus)
        t = time.perf_counter()
        summary = label_images(config)
        seconds = time.perf_counter() - t
        assert summary["labelled"] == len(files) and summary["errors"] == 0, summary
        ready = summary["timings_seconds"]["inference_ready"]
        result[name] = {"images": summary["labelled"], "seconds": round(seconds, 3),
                        "images_per_second": round(summary["labelled"] / seconds, 3),
                        "startup_seconds": round(ready, 3),  # job start -> model loaded in its actor
                        "images_per_second_after_startup": round(summary["labelled"] / (seconds - ready), 3),
                        "timings_seconds": summary["timings_seconds"],
                        "resources": summary["resources"], "files": summary["files"]}
    ray.shutdown()
    return result


# ----------------------------------------------------------------------------------------- (d) memory


def bench_memory(work: str, files: list[str], *, n: int, width_mult: float, max_side: int, batch_size: int) -> dict:
    """jobs/label.py as its own process tree at N and 4N images (the same images copied under new names)."""
    small_ck = os.path.join(work, "fcn8s-narrow.pt")
    make_checkpoint(small_ck, width_mult)
    mem_dir = os.path.join(work, "mem-images")
    os.makedirs(mem_dir)
    for i in range(4 * n):
        src = files[i % len(files)]
        shutil.copy(src, os.path.join(mem_dir, f"{i:05d}-{os.path.basename(src)}"))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    runs = {}
    for label, count in (("n", n), ("4n", 4 * n)):
        subset = os.path.join(work, f"mem-{label}")
        os.makedirs(subset)
        for name in sorted(os.listdir(mem_dir))[:count]:
            os.link(os.path.join(mem_dir, name), os.path.join(subset, name))
        cmd = [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--images", subset, "--checkpoint", small_ck,
               "--output", os.path.join(work, f"mem-out-{label}"), "--max-side", str(max_side),
               "--batch-size", str(batch_size), "--no-progress"]
        code, stdout, peak = run_measuring_memory(cmd, env=env, cwd=REPO)
        if code != 0:
            raise RuntimeError(f"label job failed ({code}): {stdout.decode()[-2000:]}")
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
        runs[label] = {"images": summary["labelled"], "peak_pss_mb": round(peak["pss_kb"] / 1024, 1),
                       "peak_rss_sum_mb": round(peak["rss_kb"] / 1024, 1), "processes": peak["processes"],
                       "wall_seconds": summary["wall_seconds"]}
    return {"memory": {"model": f"fcn8s width {width_mult}", **runs},
            "rss_ratio_4n_vs_n": round(runs["4n"]["peak_pss_mb"] / runs["n"]["peak_pss_mb"], 3),
            "rss_sum_ratio_4n_vs_n": round(runs["4n"]["peak_rss_sum_mb"] / runs["n"]["peak_rss_sum_mb"], 3)}


# ---------------------------------------------------------------------------------------------- main


def ratios(result: dict) -> dict:
    """The model ceiling is the faster of its two measurements (conservative; on a shared machine the two
    tell how steady it was)."""
    model_ips = max(result["model"]["images_per_second"], result["model_repeat"]["images_per_second"])
    local = result["pipeline_local"]
    return {"pipeline_vs_model": round(local["images_per_second"] / model_ips, 3),
            "pipeline_s3_vs_model": round(result["pipeline_s3"]["images_per_second"] / model_ips, 3),
            "pipeline_after_startup_vs_model": round(local["images_per_second_after_startup"] / model_ips, 3),
            "pipeline_vs_naive": round(local["images_per_second"] / result["naive"]["images_per_second"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images per throughput run")
    ap.add_argument("--max-side", type=int, default=256, help="inference size (long side)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward pass (model and pipeline)")
    ap.add_argument("--memory-images", type=int, default=48, help="N of the memory runs (N and 4N)")
    ap.add_argument("--memory-width", type=float, default=0.25, help="width multiplier of the memory runs' model")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--default-malloc", action="store_true",
                    help="the bare model and the naive loop with glibc's malloc as it is (the actors keep freed memory)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs, on every side")
    ap.add_argument("--amp", choices=("bf16", "fp16", "off"), default="off", help="autocast on CUDA, every side")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The pipeline's inference actors keep freed memory (pipeline/host_memory.py); the bare model and the naive loop
    # run in this process with the same setting, so the ratios compare like with like.
    if not args.default_malloc:
        restart_keeping_freed_memory()
    cpus = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="label-bench-")
    files = make_images(os.path.join(work, "images"), args.images)
    ck_path = os.path.join(work, "fcn8s.pt")
    make_checkpoint(ck_path)
    sizes = {"max_side": args.max_side, "batch_size": args.batch_size}
    on = {"device": args.device, "amp": args.amp}
    result: dict = {"machine": {"cpus": cpus, "torch": torch.__version__, "load_average_at_start": os.getloadavg()},
                    "baselines_keep_freed_memory": keeps_freed_memory(),
                    "images": len(files), **sizes, **on, "model": "fcn8s width 1.0 (reference padding)"}

    server = upload_to_s3(files)  # before Ray starts: its workers inherit the environment of that moment
    result["model"] = {"fcn8s": "width 1.0", **bench_model(ck_path, files, **sizes, threads=cpus, **on)}
    result["naive"] = bench_naive(ck_path, files, os.path.join(work, "naive-out"), max_side=args.max_side,
                                  threads=cpus, **on)
    result.update(bench_pipeline(work, files, ck_path, **sizes, cpus=cpus, **on))
    server.stop()
    result["model_repeat"] = bench_model(ck_path, files, **sizes, threads=cpus, **on)
    result.update(ratios(result))
    if not args.skip_memory:
        result.update(bench_memory(work, files, n=args.memory_images, width_mult=args.memory_width, **sizes))
    shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
