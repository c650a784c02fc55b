"""What the quality/ row costs at bucket scale: compute_quality over a synthetic night whose class_stats has
--rows rows (default 10M: 2M images x 5 classes), in files of the job's size (10,000 images per group).

    python bench/quality_bench.py [--rows 10000000] [--classes-per-image 5] [--workdir DIR]

Writes the night's labels (1-byte label maps: the step never reads them), class_stats and errors files with the
tables' exact schemas, then times compute_quality on a local Ray and prints one JSON line: seconds, rows/s, the
driver's peak RSS, and the share of a night's labeling that rate means at --images-per-second (the H100 figure).
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
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.label.tables import CLASS_STATS_SCHEMA, LABELS_SCHEMA  # noqa: E402

IMAGES_PER_GROUP = 10_000
CLASSES = [f"class{i}" for i in range(21)]


def write_night(root: str, rows: int, per_image: int, run_id: str, run_date: str) -> int:
    """The night's files; returns the number of images."""
    images = rows // per_image
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc)
    for table in ("labels", "class_stats"):
        os.makedirs(os.path.join(root, table, f"run_date={run_date}"), exist_ok=True)
    for g, start in enumerate(range(0, images, IMAGES_PER_GROUP)):
        n = min(IMAGES_PER_GROUP, images - start)
        uris = pa.array([f"s3://bucket/photos/{start + i:09d}.jpg" for i in range(n)])
        labels = pa.table({
            "image_uri": uris, "image_version": pa.array(["v1"] * n), "width": pa.array(np.full(n, 500, np.int32)),
            "height": pa.array(np.full(n, 375, np.int32)), "label_map": pa.array([b"\0"] * n, pa.binary()),
            "label_encoding": pa.array(["raw"] * n), "classes_present": pa.array([[0]] * n, pa.list_(pa.int32())),
            "model_id": pa.array(["m"] * n), "run_id": pa.array([run_id] * n),
            "labeled_at": pa.array([now] * n, LABELS_SCHEMA.field("labeled_at").type),
            "mean_confidence": pa.array(rng.uniform(0.3, 1.0, n)), "mean_margin": pa.array(rng.uniform(0, 0.7, n)),
            "low_confidence_fraction": pa.array(rng.uniform(0, 1, n)),
        }, schema=LABELS_SCHEMA)
        pq.write_table(labels, os.path.join(root, "labels", f"run_date={run_date}", f"part-{g:05d}.parquet"), compression="zstd")
        m = n * per_image
        class_id = np.concatenate([rng.choice(len(CLASSES), per_image, replace=False) for _ in range(n)]).astype(np.int32)
        pixels = rng.integers(1, 40_000, m)
        stats = pa.table({
            "image_uri": pa.array(np.repeat(np.asarray(uris.to_pylist(), object), per_image)),
            "image_version": pa.array(["v1"] * m), "class_id": pa.array(class_id),
            "class_name": pa.array(np.asarray(CLASSES, object)[class_id]), "pixel_count": pa.array(pixels),
            "pixel_fraction": pa.array(pixels / 187_500), "mean_confidence": pa.array(rng.uniform(0.3, 1.0, m)),
            **{k: pa.array(np.zeros(m, np.int32)) for k in ("bbox_x_min", "bbox_y_min", "bbox_x_max", "bbox_y_max")},
            "model_id": pa.array(["m"] * m), "run_id": pa.array([run_id] * m),
            "labeled_at": pa.array([now] * m, CLASS_STATS_SCHEMA.field("labeled_at").type),
        }, schema=CLASS_STATS_SCHEMA)
        pq.write_table(stats, os.path.join(root, "class_stats", f"run_date={run_date}", f"part-{g:05d}.parquet"), compression="zstd")
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="class_stats rows of the night")
    ap.add_argument("--classes-per-image", type=int, default=5)
    ap.add_argument("--images-per-second", type=float, default=200.0, help="the labeling rate to compare with")
    ap.add_argument("--workdir", default=None, help="where the synthetic output goes (default: a temporary folder)")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="quality-bench-")
    root = os.path.join(work, "out")
    try:
        t = time.perf_counter()
        images = write_night(root, args.rows, args.classes_per_image, "bench-run", "2026-12-07")
        written = time.perf_counter() - t
        import ray

        from pipeline.label.quality import compute_quality
        from pipeline.storage import Location

        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        t = time.perf_counter()
        row = compute_quality(Location.of(root), run_id="bench-run", run_date="2026-12-07", model_id="m",
                              class_names=CLASSES)
        seconds = time.perf_counter() - t
        labeling = images / args.images_per_second
        print(json.dumps({
            "bench": "quality", "class_stats_rows": images * args.classes_per_image, "images": images,
            "write_seconds": round(written, 1), "quality_seconds": round(seconds, 2),
            "rows_per_second": round(images * args.classes_per_image / seconds), "images_labeled": row["images_labeled"],
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "labeling_seconds_at_rate": round(labeling), "share_of_the_night": round(seconds / labeling, 5),
            "cpus": os.cpu_count()}, sort_keys=True))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
