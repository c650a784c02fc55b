"""What exporting a review package costs: seconds and peak RSS of jobs/export_review.py's export for 1,000 and
10,000 images chosen from a larger output, per format.

    python bench/review_bench.py [--images 30000] [--select 1000,10000] [--side 256] [--formats cvat,label-studio,coco]

The output is written as the job writes it (labels files of 1,000 rows, the job's Parquet options, a run record
with the class names): --images label maps of --side x 3/4 --side, PNG-encoded, each a few rectangles of 21
classes. Each export runs in a fresh process (`--one`), which reports its RSS before the export (Python, numpy,
pyarrow, DuckDB imported) and its peak after. The selection is the K least confident of the night. One JSON line
per export, then a summary line.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

ROWS_PER_FILE = 1_000  # LabelConfig.rows_per_file
CLASSES = [f"class{i}" for i in range(21)]
RUN_ID, RUN_DATE, MODEL = "bench-run", "2026-12-07", "bench-model"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_output(root: str, images: int, side: int) -> None:
    from pipeline.label.codec import encode_label_map
    from pipeline.label.commit import parquet_bytes
    from pipeline.label.tables import LABELS_SCHEMA

    rng = np.random.default_rng(0)
    w, h = side, side * 3 // 4
    folder = os.path.join(root, "labels", f"run_date={RUN_DATE}")
    os.makedirs(folder)
    now = datetime.now(timezone.utc)
    for start in range(0, images, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, images - start)
        maps, present = [], []
        for _ in range(n):
            label = np.zeros((h, w), np.uint8)
            for _ in range(4):
                x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
                label[y0:y0 + rng.integers(8, h // 2), x0:x0 + rng.integers(8, w // 2)] = rng.integers(1, len(CLASSES))
            maps.append(encode_label_map(label, "png"))
            present.append(np.unique(label).astype(np.int32).tolist())
        columns = {
            "image_uri": [f"s3://bench/site-{(start + i) % 7}/img_{start + i:08d}.jpg" for i in range(n)],
            "image_version": ["v1"] * n, "width": [w] * n, "height": [h] * n, "label_map": maps,
            "label_encoding": ["png"] * n, "classes_present": present, "model_id": [MODEL] * n,
            "run_id": [RUN_ID] * n, "labeled_at": [now] * n,
            "mean_confidence": rng.random(n).tolist(), "mean_margin": rng.random(n).tolist(),
            "low_confidence_fraction": rng.random(n).tolist(), "tiles": [0] * n}
        table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in LABELS_SCHEMA}, schema=LABELS_SCHEMA)
        with open(os.path.join(folder, f"part-bench-{start // ROWS_PER_FILE:06d}.parquet"), "wb") as f:
            f.write(parquet_bytes(table))
    os.makedirs(os.path.join(root, "runs"))
    with open(os.path.join(root, "runs", f"{RUN_ID}.json"), "w") as f:
        json.dump({"run_id": RUN_ID, "run_date": RUN_DATE, "model_id": MODEL, "class_names": CLASSES,
                   "status": "succeeded"}, f)


def one(output: str, to: str, fmt: str, k: int) -> dict:
    """One export in this (fresh) process."""
    import duckdb  # noqa: F401 - imported before the baseline, as the export imports it for --where

    from pipeline.review.exporter import ExportConfig, export_review
    from pipeline.review.select import Selection

    before = _rss_mb()
    t = time.perf_counter()
    summary = export_review(ExportConfig(output, to, fmt, Selection(run_date=RUN_DATE, least_confident=k)))
    seconds = time.perf_counter() - t
    size = sum(os.path.getsize(os.path.join(to, f)) for f in os.listdir(to))
    return {"format": fmt, "selected": k, "exported": summary["images"], "seconds": round(seconds, 2),
            "images_per_second": round(summary["images"] / seconds, 1), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(_rss_mb(), 1), "export_rss_mb": round(_rss_mb() - before, 1),
            "package_mb": round(size / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=30_000, help="labels rows in the output")
    p.add_argument("--select", default="1000,10000", help="K values, comma separated")
    p.add_argument("--side", type=int, default=256, help="label map width (height = 3/4 of it)")
    p.add_argument("--formats", default="cvat,label-studio,coco")
    p.add_argument("--workdir", help="keep the output here (default: a temporary folder, removed)")
    p.add_argument("--one", nargs=4, metavar=("OUTPUT", "TO", "FORMAT", "K"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        output, to, fmt, k = args.one
        print(json.dumps(one(output, to, fmt, int(k))))
        return
    root = args.workdir or tempfile.mkdtemp(prefix="review-bench-")
    output = os.path.join(root, "out")
    try:
        t = time.perf_counter()
        if not os.path.isdir(output):
            write_output(output, args.images, args.side)
        written = time.perf_counter() - t
        results = []
        for k in (int(v) for v in args.select.split(",")):
            for fmt in args.formats.split(","):
                to = os.path.join(root, f"pkg-{fmt}-{k}")
                shutil.rmtree(to, ignore_errors=True)
                done = subprocess.run([sys.executable, __file__, "--one", output, to, fmt, str(k)], capture_output=True,
                                      text=True, check=True)
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
        print(json.dumps({"bench": "review_export", "images_in_output": args.images,
                          "label_map": f"{args.side}x{args.side * 3 // 4} png", "write_seconds": round(written, 1),
                          "cpus": os.cpu_count(), "results": results}))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
