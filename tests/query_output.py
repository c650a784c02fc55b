"""An output as three nights of the labeling job leave it, written through the job's own commit protocol without a
model (fast, no Ray): raw and PNG label maps, a forced relabel, a changed image, an image that failed and was
repaired, one that always fails. The engine tests run every query form on it and compare with DuckDB."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from pipeline.label.codec import encode_label_map
from pipeline.label.commit import commit_fileset
from pipeline.label.tables import RESULT_SCHEMA, split_results
from pipeline.storage import Location
from tests.label_fixtures import CLASS_NAMES

MODEL = "0123456789abcdef"
READ_ERROR = "not a recognised image format (cannot identify image file <_io.BytesIO object>)"


def label_map(seed: int, h: int, w: int) -> np.ndarray:
    """Blobs of 2-4 classes, as a segmentation looks (not noise)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), np.uint8)
    for c in rng.choice(np.arange(1, len(CLASS_NAMES)), size=int(rng.integers(1, 4)), replace=False):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        label[max(0, y - h // 3):y + h // 3, max(0, x - w // 3):x + w // 3] = c
    return label


def results(images: list[tuple[str, str, np.ndarray | str]], at: datetime, encoding: str) -> pa.Table:
    """Result rows (RESULT_SCHEMA) as the pipeline's postprocess makes them; a str instead of a map is an error."""
    rows = []
    for i, (uri, version, label) in enumerate(images):
        row = {"image_uri": uri, "image_version": version, "at": at + timedelta(seconds=i, microseconds=123)}
        if isinstance(label, str):
            row.update(stage="decode", error=label)
        else:
            ids, counts = np.unique(label, return_counts=True)
            ys, xs = [np.nonzero(label == c)[0] for c in ids], [np.nonzero(label == c)[1] for c in ids]
            row.update(width=label.shape[1], height=label.shape[0], label_map=encode_label_map(label, encoding),
                       label_encoding=encoding, classes_present=ids.tolist(), stat_class_id=ids.tolist(),
                       stat_pixel_count=counts.tolist(), stat_pixel_fraction=(counts / label.size).tolist(),
                       stat_mean_confidence=[0.5 + 0.05 * int(c) for c in ids],
                       stat_x_min=[int(x.min()) for x in xs], stat_y_min=[int(y.min()) for y in ys],
                       stat_x_max=[int(x.max()) for x in xs], stat_y_max=[int(y.max()) for y in ys])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def write_engine_output(root: str) -> dict[str, dict]:
    """Three nights; returns {uri: label map} of each image's latest label (what latest-per-image queries count)."""
    out = Location.of(root)
    img = [f"s3://photos/incoming/{n}.jpg" for n in ("a", "b", "c", "d", "e", "f")]
    nights = [
        ("2026-03-01", "20260301T010000Z-aaaaaa", "raw",
         [(img[0], "v1", label_map(0, 30, 40)), (img[1], "v1", label_map(1, 24, 24)), (img[2], "v1", label_map(2, 20, 35)),
          (img[3], "v1", READ_ERROR), (img[4], "v1", "truncated or corrupt image header (image file is truncated)")]),
        # --force with --label-encoding png: a and b again; d was fixed; e still broken.
        ("2026-03-02", "20260302T010000Z-bbbbbb", "png",
         [(img[0], "v1", label_map(10, 30, 40)), (img[1], "v1", label_map(11, 24, 24)), (img[3], "v2", label_map(13, 16, 18)),
          (img[4], "v1", "truncated or corrupt image header (image file is truncated)")]),
        # c changed (a new version); f cannot be read.
        ("2026-03-03", "20260303T010000Z-cccccc", "raw",
         [(img[2], "v2", label_map(22, 28, 21)), (img[5], "v1", "empty file")]),
    ]
    latest = {}
    for n, (run_date, run_id, encoding, images) in enumerate(nights):
        at = datetime(2026, 3, 1 + n, 1, 5, tzinfo=timezone.utc)
        # Two file sets a night, as --rows-per-file splits them.
        for part, chunk in enumerate((images[:2], images[2:])):
            tables = split_results(results(chunk, at + timedelta(minutes=part), encoding), model_id=MODEL,
                                   run_id=run_id, class_names=CLASS_NAMES)
            commit_fileset(out, f"{run_id}-{part:012x}", run_date, MODEL, tables)
        latest.update({uri: label for uri, _, label in images if not isinstance(label, str)})
    return latest
