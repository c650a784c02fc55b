"""Outputs as the first release (commit 2fc07f7) wrote them: class_stats without `labeled_at`. The table-upgrade
tests and the nightly-run scenario of tests/test_label_job.py start from them."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.label.commit import parquet_bytes
from pipeline.label.tables import RESULT_SCHEMA, split_results
from pipeline.label.upgrade import FIRST_RELEASE
from tests import storage_util
from tests.label_fixtures import CLASS_NAMES

OLD_RUN, OLD_MODEL = "20260101T010000Z-0a0a0a", "00000000deadbeef"
FIRST_RELEASE_NIGHTS = ("2026-01-01", "2026-01-02")


def at(minutes: int) -> datetime:
    return datetime(2026, 1, 1, 1, 0, tzinfo=timezone.utc) + timedelta(minutes=minutes, microseconds=7)


def label_map(seed: int, h: int = 6, w: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 2 + seed % 3, 5], np.uint8), size=(h, w), p=[0.5, 0.3, 0.2])


def results(images: list[tuple[str, str, np.ndarray | None]], at: datetime) -> pa.Table:
    """Result rows (RESULT_SCHEMA) as the pipeline's postprocess makes them; a None map is a failed image."""
    rows = []
    for i, (uri, version, label) in enumerate(images):
        row = {"image_uri": uri, "image_version": version, "at": at + timedelta(seconds=i)}
        if label is None:
            row.update(stage="decode", error="not a recognised image format (cannot identify image file)")
        else:
            ids, counts = np.unique(label, return_counts=True)
            boxes = [(np.nonzero(label == c)[1].min(), np.nonzero(label == c)[0].min(), np.nonzero(label == c)[1].max(),
                      np.nonzero(label == c)[0].max()) for c in ids]
            row.update(width=label.shape[1], height=label.shape[0], label_map=label.tobytes(), label_encoding="raw",
                       classes_present=ids.tolist(), stat_class_id=ids.tolist(), stat_pixel_count=counts.tolist(),
                       stat_pixel_fraction=(counts / label.size).tolist(), stat_mean_confidence=[0.75] * len(ids),
                       stat_x_min=[int(b[0]) for b in boxes], stat_y_min=[int(b[1]) for b in boxes],
                       stat_x_max=[int(b[2]) for b in boxes], stat_y_max=[int(b[3]) for b in boxes])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def write_first_release_fileset(output: str, run_date: str, fileset: str, images, at: datetime) -> dict[str, pa.Table]:
    """One file set exactly as the first release (commit 2fc07f7) published it: labels, class_stats and errors in
    FIRST_RELEASE's schemas (class_stats without labeled_at), zstd, under labels|class_stats|errors/run_date=D/."""
    tables = split_results(results(images, at), model_id=OLD_MODEL, run_id=OLD_RUN, class_names=CLASS_NAMES)
    written = {}
    for name in ("labels", "class_stats", "errors"):
        rows = tables[name].select(FIRST_RELEASE[name].names).cast(FIRST_RELEASE[name])
        storage_util.write_bytes(storage.join(output, name, f"run_date={run_date}", f"part-{fileset}.parquet"),
                            parquet_bytes(rows))
        written[name] = tables[name]  # with the labeled_at the upgrade must give class_stats
    return written


def first_release_output(output: str, uris: list[str]) -> pa.Table:
    """Two nights of the first release, two file sets each; returns the class_stats rows as they must read after
    the upgrade (labeled_at = the labels row's)."""
    expected = []
    for night, (d, sets) in enumerate(zip(FIRST_RELEASE_NIGHTS, (2, 2), strict=True)):
        for s in range(sets):
            k = 2 * night + s
            images = [(uris[(k + j) % len(uris)], f"v{k}", label_map(10 * k + j)) for j in range(2)]
            images.append((f"s3://elsewhere/broken{k}.jpg", f"v{k}", None))
            written = write_first_release_fileset(output, d, f"{OLD_RUN}-{k:012x}", images, at(60 * 24 * night + k))
            expected.append(written["class_stats"].append_column("run_date", pa.array([d] * written["class_stats"].num_rows)))
    return pa.concat_tables(expected)


def key_rows(table: pa.Table) -> list[tuple]:
    cols = ["image_uri", "image_version", "class_id", "pixel_count", "run_id", "labeled_at", "run_date"]
    rows = table.select(cols).to_pylist()
    return sorted(tuple(str(r[c]) if c == "run_date" else r[c] for c in cols) for r in rows)
