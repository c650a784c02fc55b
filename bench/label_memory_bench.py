"""Labeling memory at scale: is what a run holds bounded by the images in flight, or by the run?

    python bench/label_memory_bench.py [--images 24] [--megapixels 12] [--width-mult 0.0625] [--workdir DIR]

`jobs/label.py` runs as its own process tree (its own local Ray) over N and then 4N photos of `--megapixels`
each (the photos scikit-image ships, scaled up and saved as JPEG), at the job's defaults (--max-side 1024, raw
label maps: each map is one byte per pixel of the photo). For each run: peak /dev/shm in use (where a local Ray
keeps its object store on Linux) and peak PSS summed over every process of the tree. The ratios 4N/N of both say
whether memory grows with the run (1.0: bounded; 4.0: every label map of the run held at once).

Prints one JSON line; record the figures in bench/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

from PIL import Image  # noqa: E402

from bench.memory import run_measuring_memory  # noqa: E402
from models import VOC_CLASSES  # noqa: E402
from pipeline.testbed import random_checkpoint, sample_photo_paths  # noqa: E402


def make_photos(folder: str, count: int, megapixels: float) -> None:
    """`count` JPEGs of about `megapixels` (4:3), made from the sample photos scaled up (each file distinct)."""
    os.makedirs(folder, exist_ok=True)
    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    sources = [Image.open(p).convert("RGB").resize((width, height), Image.BILINEAR) for p in sample_photo_paths()]
    for i in range(count):
        img = sources[i % len(sources)]
        img = img.rotate(180) if (i // len(sources)) % 2 else img
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=85)


def run(work: str, images: str, checkpoint: str, name: str) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--images", images, "--checkpoint", checkpoint,
           "--output", os.path.join(work, f"out-{name}"), "--no-progress"]
    code, stdout, peak = run_measuring_memory(cmd, env=env, cwd=REPO)
    if code != 0:
        raise RuntimeError(f"label job failed ({code}): {stdout.decode()[-2000:]}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"images": summary["labelled"], "peak_shm_mb": round(peak["shm_kb"] / 1024, 1),
            "peak_pss_mb": round(peak["pss_kb"] / 1024, 1), "processes": peak["processes"],
            "wall_seconds": summary["wall_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=24, help="N: the first run's photos; the second labels 4N")
    p.add_argument("--megapixels", type=float, default=12.0)
    p.add_argument("--width-mult", type=float, default=0.0625, help="the FCN-8s's width (1.0: the full model)")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed after")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        checkpoint = os.path.join(work, "fcn8s.pt")
        random_checkpoint(checkpoint, list(VOC_CLASSES), width_mult=args.width_mult)
        runs = {}
        for name, count in (("n", args.images), ("4n", 4 * args.images)):
            folder = os.path.join(work, f"photos-{name}")
            make_photos(folder, count, args.megapixels)
            runs[name] = run(work, folder, checkpoint, name)
    print(json.dumps({"bench": "label_memory", "megapixels": args.megapixels, "width_mult": args.width_mult, **runs,
                      "shm_ratio_4n_vs_n": round(runs["4n"]["peak_shm_mb"] / max(runs["n"]["peak_shm_mb"], 1e-9), 3),
                      "pss_ratio_4n_vs_n": round(runs["4n"]["peak_pss_mb"] / runs["n"]["peak_pss_mb"], 3)}))


if __name__ == "__main__":
    main()
