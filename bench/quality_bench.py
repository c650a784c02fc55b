"""What the quality/ row costs at bucket scale: compute_quality over a synthetic night whose class_stats has
--rows rows (default 10M: 2M images x 5 classes), in files of the job's sizes (docs/queries.md "Files at bucket
scale"): labels files of 1,000 images, one class_stats and one errors file per 10,000 images, named as the job names
a run's files, written with the job's Parquet options (pipeline.label.commit.parquet_bytes).

    python bench/quality_bench.py [--rows 10000000] [--classes-per-image 5] [--error-rate 0.01] [--workdir DIR]

label_map is not nullable: the labels files hold 1-byte label maps (the step never reads them, so their size would
change what is on disk, not what it reads). Then compute_quality runs on a local Ray and one JSON line reports the
seconds, rows/s, files, the share of the files' bytes fetched, the driver's peak RSS, and the share of a night's
labeling that rate means at --images-per-second (bench/RESULTS.md's figure per GPU).
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

from pipeline.label.commit import parquet_bytes  # noqa: E402
from pipeline.label.tables import CLASS_STATS_SCHEMA, ERRORS_SCHEMA, LABELS_SCHEMA  # noqa: E402

LABELS_PER_FILE = 1_000      # LabelConfig.rows_per_file
IMAGES_PER_GROUP = 10_000    # LabelConfig.images_per_small_file
CLASSES = [f"class{i}" for i in range(21)]
RUN_ID, RUN_DATE, MODEL = "bench-run", "2026-12-07", "bench-model"


def _strings(values, n: int) -> pa.Array:
    return pa.array(values if isinstance(values, list) else [values] * n, pa.string())


def write_night(root: str, rows: int, per_image: int, error_rate: float) -> tuple[int, int]:
    """The night's files; returns (images labeled, images failed)."""
    images = rows // per_image
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc)
    folders = {t: os.path.join(root, t, f"run_date={RUN_DATE}") for t in ("labels", "class_stats", "errors")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    failed = 0
    for g, start in enumerate(range(0, images, IMAGES_PER_GROUP)):
        group = f"{RUN_ID}-g{g:06d}"
        n = min(IMAGES_PER_GROUP, images - start)
        uris = [f"s3://bucket/photos/{start + i:09d}.jpg" for i in range(n)]
        for k, s in enumerate(range(0, n, LABELS_PER_FILE)):
            m = min(LABELS_PER_FILE, n - s)
            labels = pa.table({
                "image_uri": _strings(uris[s:s + m], m), "image_version": _strings("v1", m),
                "width": pa.array(np.full(m, 500, np.int32)), "height": pa.array(np.full(m, 375, np.int32)),
                "label_map": pa.array([b"\0"] * m, pa.binary()), "label_encoding": _strings("raw", m),
                "classes_present": pa.array([[0]] * m, pa.list_(pa.int32())), "model_id": _strings(MODEL, m),
                "run_id": _strings(RUN_ID, m), "labeled_at": pa.array([now] * m, LABELS_SCHEMA.field("labeled_at").type),
                "mean_confidence": pa.array(rng.uniform(0.3, 1.0, m)), "mean_margin": pa.array(rng.uniform(0, 0.7, m)),
                "low_confidence_fraction": pa.array(rng.uniform(0, 1, m)), "tiles": pa.array(np.zeros(m, np.int32)),
            }, schema=LABELS_SCHEMA)
            with open(os.path.join(folders["labels"], f"part-{group}-{k:04d}.parquet"), "wb") as f:
                f.write(parquet_bytes(labels))
        m = n * per_image
        class_id = np.argsort(rng.random((n, len(CLASSES))), axis=1)[:, :per_image].astype(np.int32).ravel()
        pixels = rng.integers(1, 40_000, m)
        stats = pa.table({
            "image_uri": pa.array(np.repeat(np.asarray(uris, object), per_image), pa.string()),
            "image_version": _strings("v1", m), "class_id": pa.array(class_id),
            "class_name": pa.array(np.asarray(CLASSES, object)[class_id], pa.string()), "pixel_count": pa.array(pixels),
            "pixel_fraction": pa.array(pixels / 187_500), "mean_confidence": pa.array(rng.uniform(0.3, 1.0, m)),
            **{k: pa.array(np.zeros(m, np.int32)) for k in ("bbox_x_min", "bbox_y_min", "bbox_x_max", "bbox_y_max")},
            "model_id": _strings(MODEL, m), "run_id": _strings(RUN_ID, m),
            "labeled_at": pa.array([now] * m, CLASS_STATS_SCHEMA.field("labeled_at").type),
        }, schema=CLASS_STATS_SCHEMA)
        with open(os.path.join(folders["class_stats"], f"part-{group}.parquet"), "wb") as f:
            f.write(parquet_bytes(stats, row_group_rows=64 * 1024))
        e = int(round(n * error_rate))
        failed += e
        errors = pa.table({
            "image_uri": _strings([f"s3://bucket/photos/bad-{start + i:09d}.jpg" for i in range(e)], e),
            "image_version": _strings("v1", e), "stage": _strings(list(rng.choice(["read", "decode"], e)), e),
            "error": _strings("truncated or corrupt", e), "model_id": _strings(MODEL, e), "run_id": _strings(RUN_ID, e),
            "failed_at": pa.array([now] * e, ERRORS_SCHEMA.field("failed_at").type),
        }, schema=ERRORS_SCHEMA)
        with open(os.path.join(folders["errors"], f"part-{group}.parquet"), "wb") as f:
            f.write(parquet_bytes(errors))
    return images, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="class_stats rows of the night")
    ap.add_argument("--classes-per-image", type=int, default=5)
    ap.add_argument("--error-rate", type=float, default=0.01, help="failed images per labeled image")
    ap.add_argument("--images-per-second", type=float, default=200.0, help="the labeling rate to compare with")
    ap.add_argument("--workdir", default=None, help="where the synthetic output goes (default: a temporary folder)")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="quality-bench-")
    root = os.path.join(work, "out")
    try:
        t = time.perf_counter()
        images, failed = write_night(root, args.rows, args.classes_per_image, args.error_rate)
        written = time.perf_counter() - t
        import ray

        from pipeline.label.quality import compute_quality, run_files, run_sums
        from pipeline.storage import Location

        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        output = Location.of(root)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        row = compute_quality(output, run_id=RUN_ID, run_date=RUN_DATE, model_id=MODEL, class_names=CLASSES)
        seconds = time.perf_counter() - t
        sums = run_sums(output, run_id=RUN_ID, run_date=RUN_DATE, classes=len(CLASSES))  # the bytes, untimed
        labeling = images / args.images_per_second
        rows = images * args.classes_per_image
        print(json.dumps({
            "bench": "quality", "class_stats_rows": rows, "images": images, "files": len(run_files(output, RUN_ID, RUN_DATE)),
            "write_seconds": round(written, 1), "quality_seconds": round(seconds, 2),
            "rows_per_second": round(rows / seconds), "images_per_second": round(images / seconds),
            "images_labeled": row["images_labeled"], "images_failed": row["images_failed"],
            "bytes_read_share": round(sums.bytes_read / max(1, sums.bytes_in_files), 4),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "driver_rss_before_mb": round(rss_before / 1024),
            "labeling_seconds_at_rate": round(labeling), "share_of_the_night": round(seconds / labeling, 5),
            "cpus": os.cpu_count(), "failed_written": failed}, sort_keys=True))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
