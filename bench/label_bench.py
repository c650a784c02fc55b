"""Labeling benchmark: the Ray Data job against the bare model and a naive loop, same machine, same images.

    python bench/label_bench.py [--images 48] [--max-side 128] [--batch-size 4]

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
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models import TORCHVISION, VOC_CLASSES, build_model, load_checkpoint, save_checkpoint  # noqa: E402


def _photos() -> dict[str, bytes]:
    import skimage

    data = os.path.join(os.path.dirname(skimage.__file__), "data")
    return {n: open(os.path.join(data, n), "rb").read() for n in ("astronaut.png", "coffee.png", "chelsea.png")}


def make_images(root: str, count: int, seed: int = 0) -> list[str]:
    """About a quarter real photos (re-encoded JPEG/PNG copies, so every file differs), the rest synthetic."""
    from pipeline.synthetic import synthesize_voc

    os.makedirs(root, exist_ok=True)
    photos = list(_photos().items())
    n_real = max(3, count // 4)
    for i in range(n_real):
        name, data = photos[i % len(photos)]
        img = Image.open(io.BytesIO(data)).convert("RGB")
        stem = f"photo_{i:03d}_{name.split('.')[0]}"
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
    torch.manual_seed(0)
    model = build_model("fcn8s", len(VOC_CLASSES), width_mult=width_mult)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.01)
    return save_checkpoint(path, model, class_names=list(VOC_CLASSES), convention=TORCHVISION)


# ------------------------------------------------------------------------------------------- (a) model


def bench_model(ck_path: str, files: list[str], *, max_side: int, batch_size: int, threads: int) -> dict:
    from pipeline.decode import decode_image
    from pipeline.canvas import preprocess
    from pipeline.inference import InferenceSettings, Predictor

    torch.set_num_threads(threads)
    ck = load_checkpoint(ck_path)
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(max_side=max_side, batch_size=batch_size, device="cpu"))
    prepared = [preprocess(decode_image(open(f, "rb").read()), max_side, 32) for f in files]
    groups: dict[tuple, list[np.ndarray]] = {}
    for p in prepared:
        groups.setdefault(p.canvas.shape, []).append(p.canvas)
    batches = [np.stack(c[k:k + batch_size]) for c in groups.values() for k in range(0, len(c), batch_size)]
    for shape in groups:  # warm-up: one pass per canvas shape (kernel selection), not timed
        predictor.forward(np.zeros((1, *shape), np.uint8))
    t = time.perf_counter()
    for b in batches:
        predictor.forward(b)
    seconds = time.perf_counter() - t
    return {"images": len(files), "seconds": round(seconds, 3), "images_per_second": round(len(files) / seconds, 3),
            "forward_passes": len(batches), "canvases": sorted(f"{s[0]}x{s[1]}" for s in groups)}


# ------------------------------------------------------------------------------------------- (c) naive


def bench_naive(ck_path: str, files: list[str], out_dir: str, *, max_side: int, threads: int) -> dict:
    """What one would write first: a loop over files, batch of one, native size, one output file per image."""
    import torch.nn.functional as F

    from pipeline.decode import decode_image

    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    t = time.perf_counter()
    ck = load_checkpoint(ck_path)
    for path in files:
        rgb = decode_image(open(path, "rb").read())
        height, width = rgb.shape[:2]
        scale = min(1.0, max_side / max(height, width))
        small = np.asarray(Image.fromarray(rgb).resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                       Image.BILINEAR)) if scale < 1 else rgb
        x = ck.convention.normalize(torch.from_numpy(np.array(small)).permute(2, 0, 1))[None]
        with torch.inference_mode():
            logits = ck.model(x)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
            prob = torch.softmax(logits, 0)
            conf, label = prob.max(0)
        label = label.to(torch.uint8).numpy()
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


# ----------------------------------------------------------------------------------------- (d) memory


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    pids.append(int(stat.split("/")[2]))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in kB of one process; shared pages (libraries, object store) are split in PSS."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def run_job_measuring_memory(argv: list[str], env: dict) -> dict:
    """Run jobs/label.py as its own session; sample the memory of all its processes every 0.2 s."""
    child = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", "label.py"), *argv], env=env, cwd=REPO,
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = {"pss_kb": 0, "rss_kb": 0, "processes": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _session_pids(child.pid)
            mem = [_memory_kb(p) for p in pids]
            peak["pss_kb"] = max(peak["pss_kb"], sum(m[0] for m in mem))
            peak["rss_kb"] = max(peak["rss_kb"], sum(m[1] for m in mem))
            peak["processes"] = max(peak["processes"], len(pids))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate(timeout=1800)
    done.set()
    sampler.join()
    for pid in _session_pids(child.pid):  # the job's local Ray, if anything is left of it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if child.returncode != 0:
        raise RuntimeError(f"label job failed ({child.returncode}): {stdout.decode()[-2000:]}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"images": summary["labelled"], "peak_pss_mb": round(peak["pss_kb"] / 1024, 1),
            "peak_rss_sum_mb": round(peak["rss_kb"] / 1024, 1), "processes": peak["processes"],
            "wall_seconds": summary["wall_seconds"]}


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images per throughput run")
    ap.add_argument("--max-side", type=int, default=256, help="inference size (long side)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward pass (model and pipeline)")
    ap.add_argument("--memory-images", type=int, default=48, help="N of the memory runs (N and 4N)")
    ap.add_argument("--memory-width", type=float, default=0.25, help="width multiplier of the memory runs' model")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cpus = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="label-bench-")
    files = make_images(os.path.join(work, "images"), args.images)
    ck_path = os.path.join(work, "fcn8s.pt")
    make_checkpoint(ck_path)
    result: dict = {"machine": {"cpus": cpus, "torch": torch.__version__, "load_average_at_start": os.getloadavg()},
                    "images": len(files),
                    "max_side": args.max_side, "batch_size": args.batch_size, "model": "fcn8s width 1.0 (reference padding)"}

    # S3 server first: Ray's workers inherit the environment of the moment Ray starts.
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    for f in files:
        fs.pipe(f"bench/images/{os.path.basename(f)}", open(f, "rb").read())

    result["model"] = {"fcn8s": "width 1.0", **bench_model(ck_path, files, max_side=args.max_side,
                                                            batch_size=args.batch_size, threads=cpus)}
    result["naive"] = bench_naive(ck_path, files, os.path.join(work, "naive-out"), max_side=args.max_side,
                                  threads=cpus)

    import ray

    from pipeline.labeling import LabelConfig, label_images
    from pipeline.ray_setup import init_ray

    t = time.perf_counter()
    init_ray("local", num_cpus=cpus, log_to_driver=False)  # the jobs' own local-Ray setup
    result["ray_init_seconds"] = round(time.perf_counter() - t, 2)
    # A nightly job runs on a cluster that has run jobs before: one small job first warms Ray's worker
    # processes (imports); every measured job still starts its own actors and loads the model.
    warm_dir = os.path.join(work, "warmup")
    os.makedirs(warm_dir)
    shutil.copy(files[-1], warm_dir)
    t = time.perf_counter()
    label_images(LabelConfig(images=warm_dir, checkpoint=ck_path, output=os.path.join(work, "warmup-out"),
                             max_side=args.max_side, batch_size=args.batch_size, progress=False))
    result["warmup_job_seconds"] = round(time.perf_counter() - t, 2)
    for name, images, output in [("pipeline_local", os.path.join(work, "images"), os.path.join(work, "out")),
                                 ("pipeline_s3", "s3://bench/images", "s3://bench/out")]:
        config = LabelConfig(images=images, checkpoint=ck_path, output=output, max_side=args.max_side,
                             batch_size=args.batch_size, progress=False)
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
    server.stop()
    # The model again, after the pipelines: the ratios use the faster of the two measurements (conservative;
    # on a shared machine the two tell how steady it was).
    result["model_repeat"] = bench_model(ck_path, files, max_side=args.max_side, batch_size=args.batch_size,
                                         threads=cpus)

    model_ips = max(result["model"]["images_per_second"], result["model_repeat"]["images_per_second"])
    result["pipeline_vs_model"] = round(result["pipeline_local"]["images_per_second"] / model_ips, 3)
    result["pipeline_s3_vs_model"] = round(result["pipeline_s3"]["images_per_second"] / model_ips, 3)
    result["pipeline_after_startup_vs_model"] = round(
        result["pipeline_local"]["images_per_second_after_startup"] / model_ips, 3)
    result["pipeline_vs_naive"] = round(result["pipeline_local"]["images_per_second"] /
                                        result["naive"]["images_per_second"], 3)

    if not args.skip_memory:
        small_ck = os.path.join(work, "fcn8s-narrow.pt")
        make_checkpoint(small_ck, args.memory_width)
        n = args.memory_images
        mem_dir = os.path.join(work, "mem-images")
        os.makedirs(mem_dir)
        for i in range(4 * n):  # the same few dozen images, copied under new names up to 4N
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
            runs[label] = run_job_measuring_memory(
                ["--images", subset, "--checkpoint", small_ck, "--output", os.path.join(work, f"mem-out-{label}"),
                 "--max-side", str(args.max_side), "--batch-size", str(args.batch_size), "--no-progress"], env)
        result["memory"] = {"model": f"fcn8s width {args.memory_width}", **runs}
        result["rss_ratio_4n_vs_n"] = round(runs["4n"]["peak_pss_mb"] / runs["n"]["peak_pss_mb"], 3)
        result["rss_sum_ratio_4n_vs_n"] = round(runs["4n"]["peak_rss_sum_mb"] / runs["n"]["peak_rss_sum_mb"], 3)
    shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
