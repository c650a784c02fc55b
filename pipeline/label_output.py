"""The labeling job's Parquet contract and its exactly-once commit protocol.

Layout under the output root (a local directory or an s3:// prefix):

    labels/run_date=YYYY-MM-DD/part-<fileset>.parquet        one row per labelled image
    class_stats/run_date=YYYY-MM-DD/part-<fileset>.parquet   one row per (image, class present)
    errors/run_date=YYYY-MM-DD/part-<fileset>.parquet        one row per image that could not be labelled
    runs/<run_id>.json                                       arguments, model id, counts, timings, status
    previews/run_date=YYYY-MM-DD/<run_id>/*.png              optional colour overlays
    _staging/<fileset>/{labels,class_stats,errors}.parquet   written, not yet committed (never read)
    _commits/<fileset>.json                                  committed, not yet fully published

Commit protocol, per *file set* (the labels, class_stats and errors rows of the same images):

1. every table is written complete to `_staging/<fileset>/` (local: temp file + rename; S3: one PUT);
2. the commit marker `_commits/<fileset>.json` is written (one atomic write): **the commit point**;
3. files are moved to their final names, class_stats and errors first, labels last; then the marker and
   the staging folder are deleted.

`recover()` runs at the start of every job, before the skip list is read: it finishes step 3 for every
marker it finds (moves are idempotent) and deletes staging folders without a marker. So a set is either
entirely published (after a crash: by the next run) or entirely discarded, whatever the moment of the crash,
and its images are then either skipped or labelled again: each image lands in `labels/` exactly once and its
statistics in `class_stats/` exactly once. Readers glob `labels/**/*.parquet`, which staging never matches,
and every file appears atomically, complete. One job per output root at a time.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from models import flat_palette

from . import storage

log = logging.getLogger(__name__)

TABLES = ("labels", "class_stats", "errors")
# Publication order: the labels file (what the skip logic reads) goes last.
PUBLISH_ORDER = ("class_stats", "errors", "labels")
STAGING = "_staging"
COMMITS = "_commits"
COMPRESSION = "zstd"

UTC_TS = pa.timestamp("us", tz="UTC")

LABELS_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("image_version", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("label_map", pa.binary(), nullable=False),
    pa.field("label_encoding", pa.string(), nullable=False),
    pa.field("classes_present", pa.list_(pa.int32()), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("labeled_at", UTC_TS, nullable=False),
])

CLASS_STATS_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("image_version", pa.string(), nullable=False),
    pa.field("class_id", pa.int32(), nullable=False),
    pa.field("class_name", pa.string(), nullable=False),
    pa.field("pixel_count", pa.int64(), nullable=False),
    pa.field("pixel_fraction", pa.float64(), nullable=False),
    pa.field("mean_confidence", pa.float64(), nullable=False),
    pa.field("bbox_x_min", pa.int32(), nullable=False),
    pa.field("bbox_y_min", pa.int32(), nullable=False),
    pa.field("bbox_x_max", pa.int32(), nullable=False),
    pa.field("bbox_y_max", pa.int32(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])

ERRORS_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("image_version", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("failed_at", UTC_TS, nullable=False),
])

SCHEMAS = {"labels": LABELS_SCHEMA, "class_stats": CLASS_STATS_SCHEMA, "errors": ERRORS_SCHEMA}

# Rows flowing out of the pipeline's postprocess stage: one per image, labelled or failed.
_LIST_I32 = pa.list_(pa.int32())
RESULT_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("image_version", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("label_map", pa.binary()), ("label_encoding", pa.string()), ("classes_present", _LIST_I32),
    ("stat_class_id", _LIST_I32), ("stat_pixel_count", pa.list_(pa.int64())),
    ("stat_pixel_fraction", pa.list_(pa.float64())), ("stat_mean_confidence", pa.list_(pa.float64())),
    ("stat_x_min", _LIST_I32), ("stat_y_min", _LIST_I32), ("stat_x_max", _LIST_I32), ("stat_y_max", _LIST_I32),
    ("at", UTC_TS), ("stage", pa.string()), ("error", pa.string()), ("actor", pa.string()),
])

# Fault injection for tests: called with the name of each protocol step ("staged", "committed",
# "published:<table>"); a test makes it raise (or kill the process) to stop the protocol right there.
_crash_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _crash_hook is not None:
        _crash_hook(name)


# --------------------------------------------------------------------------------------------- encoding


def encode_label_map(label: np.ndarray, encoding: str) -> bytes:
    """uint8 (H, W) class ids -> bytes: "raw" (row-major) or "png" (palette PNG, pixel value = class id)."""
    if encoding == "raw":
        return np.ascontiguousarray(label, dtype=np.uint8).tobytes()
    if encoding == "png":
        img = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
        img.putpalette(flat_palette())  # mode L -> P: pixel values stay the class ids
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"unknown label encoding {encoding!r}; use raw or png")


def decode_label_map(data: bytes, encoding: str, height: int, width: int) -> np.ndarray:
    """A `label_map` cell back to a (height, width) uint8 array of class ids."""
    if encoding == "raw":
        return np.frombuffer(data, np.uint8).reshape(height, width)
    if encoding == "png":
        arr = np.asarray(Image.open(io.BytesIO(data)))
        if arr.shape != (height, width):
            raise ValueError(f"PNG label map is {arr.shape}, expected {(height, width)}")
        return arr
    raise ValueError(f"unknown label encoding {encoding!r}")


def parquet_bytes(table: pa.Table, row_group_rows: int = 256) -> bytes:
    """A zstd Parquet file of plain Arrow types; no dictionary or statistics on the label map bytes."""
    small = [f.name for f in table.schema if f.name != "label_map"]
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION, row_group_size=row_group_rows,
                   use_dictionary=[n for n in small if pa.types.is_string(table.schema.field(n).type)],
                   write_statistics=small)
    return buf.getvalue()


# --------------------------------------------------------------------------------- results -> tables


def split_results(block: pa.Table, *, model_id: str, run_id: str, class_names: list[str]) -> dict[str, pa.Table]:
    """Result rows (RESULT_SCHEMA) -> the three output tables."""
    block = block.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
    failed = pc.is_valid(block["error"])
    ok = block.filter(pc.invert(failed))
    bad = block.filter(failed)
    n_ok, n_bad = ok.num_rows, bad.num_rows
    labels = pa.table({
        "image_uri": ok["image_uri"], "image_version": ok["image_version"], "width": ok["width"],
        "height": ok["height"], "label_map": ok["label_map"], "label_encoding": ok["label_encoding"],
        "classes_present": ok["classes_present"], "model_id": pa.array([model_id] * n_ok, pa.string()),
        "run_id": pa.array([run_id] * n_ok, pa.string()), "labeled_at": ok["at"],
    }, schema=LABELS_SCHEMA)
    parents = pc.list_parent_indices(ok["stat_class_id"])
    class_id = pc.list_flatten(ok["stat_class_id"])
    n_stats = len(class_id)
    names = pa.array([str(c) for c in class_names], pa.string())
    stats = pa.table({
        "image_uri": ok["image_uri"].take(parents), "image_version": ok["image_version"].take(parents),
        "class_id": class_id, "class_name": names.take(class_id),
        "pixel_count": pc.list_flatten(ok["stat_pixel_count"]),
        "pixel_fraction": pc.list_flatten(ok["stat_pixel_fraction"]),
        "mean_confidence": pc.list_flatten(ok["stat_mean_confidence"]),
        "bbox_x_min": pc.list_flatten(ok["stat_x_min"]), "bbox_y_min": pc.list_flatten(ok["stat_y_min"]),
        "bbox_x_max": pc.list_flatten(ok["stat_x_max"]), "bbox_y_max": pc.list_flatten(ok["stat_y_max"]),
        "model_id": pa.array([model_id] * n_stats, pa.string()), "run_id": pa.array([run_id] * n_stats, pa.string()),
    }, schema=CLASS_STATS_SCHEMA)
    errors = pa.table({
        "image_uri": bad["image_uri"], "image_version": bad["image_version"],
        "stage": pc.fill_null(bad["stage"], "unknown"), "error": bad["error"],
        "model_id": pa.array([model_id] * n_bad, pa.string()), "run_id": pa.array([run_id] * n_bad, pa.string()),
        "failed_at": bad["at"],
    }, schema=ERRORS_SCHEMA)
    return {"labels": labels, "class_stats": stats, "errors": errors}


# ------------------------------------------------------------------------------------ commit protocol


def _final_name(table: str, run_date: str, fileset: str) -> str:
    return f"{table}/run_date={run_date}/part-{fileset}.parquet"


def _fs(output: str):
    fs, root = storage.filesystem(output)
    return fs, root.rstrip("/")


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _move(fs, src: str, dst: str) -> None:
    """Publish one file: it appears complete under its final name (local rename / S3 server-side copy)."""
    if _is_local(fs):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    else:
        fs.copy(src, dst)
        fs.rm(src)


def commit_fileset(output: str, fileset: str, run_date: str, tables: dict[str, pa.Table]) -> dict[str, int]:
    """Stage, commit and publish one file set (see the module docstring): one file per table given (an
    empty table gives an empty file). Returns rows written per table."""
    output = storage.normalize(output)
    plan = []
    for name in PUBLISH_ORDER:
        table = tables.get(name)
        if table is None:
            continue
        src = f"{STAGING}/{fileset}/{name}.parquet"
        storage.write_bytes(storage.join(output, src), parquet_bytes(table.cast(SCHEMAS[name])))
        plan.append({"table": name, "src": src, "dst": _final_name(name, run_date, fileset), "rows": table.num_rows})
    if not plan:
        return {}
    _step("staged")
    marker = {"fileset": fileset, "run_date": run_date, "files": plan}
    storage.write_text(storage.join(output, COMMITS, f"{fileset}.json"), json.dumps(marker, indent=1))
    _step("committed")
    _publish(output, marker)
    return {p["table"]: p["rows"] for p in plan}


def _publish(output: str, marker: dict) -> None:
    fs, root = _fs(output)
    for entry in marker["files"]:
        src, dst = posixpath.join(root, entry["src"]), posixpath.join(root, entry["dst"])
        if fs.exists(src):
            _move(fs, src, dst)
        elif not fs.exists(dst):
            raise storage.StorageError(f"commit {marker['fileset']} of {output}: neither {entry['src']} nor "
                                       f"{entry['dst']} exists; the output was modified by hand")
        _step(f"published:{entry['table']}")
    fs.rm(posixpath.join(root, COMMITS, f"{marker['fileset']}.json"))
    staging = posixpath.join(root, STAGING, marker["fileset"])
    if fs.exists(staging):
        fs.rm(staging, recursive=True)


def recover(output: str) -> dict[str, int]:
    """Finish publishing every committed file set and delete uncommitted staging. Idempotent.

    Returns {"rolled_forward": n, "discarded": m}.
    """
    output = storage.normalize(output)
    fs, root = _fs(output)
    try:
        fs.invalidate_cache()
        markers = sorted(p for p in _ls(fs, posixpath.join(root, COMMITS)) if p.endswith(".json"))
        rolled = 0
        for path in markers:
            with fs.open(path, "rb") as f:
                marker = json.loads(f.read().decode("utf-8"))
            log.warning("finishing the commit of file set %s left by an interrupted run", marker["fileset"])
            _publish(output, marker)
            rolled += 1
        fs.invalidate_cache()
        discarded = 0
        for path in _ls(fs, posixpath.join(root, STAGING)):
            fs.rm(path, recursive=True)
            discarded += 1
    except storage.StorageError:
        raise
    except Exception as e:
        raise storage.storage_error(output, e) from None
    return {"rolled_forward": rolled, "discarded": discarded}


def _ls(fs, path: str) -> list[str]:
    try:
        return [p if isinstance(p, str) else p["name"] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []


def list_table_files(output: str, table: str) -> list[str]:
    """Paths (inside the filesystem) of every published Parquet file of a table, sorted."""
    fs, root = _fs(storage.normalize(output))
    fs.invalidate_cache()
    try:
        found = fs.find(posixpath.join(root, table))
    except FileNotFoundError:
        return []
    return sorted(p for p in found if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))


def read_table(output: str, table: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """One output table (all run dates), optionally only some columns and rows; empty if none written."""
    files = list_table_files(output, table)
    schema = SCHEMAS[table]
    if not files:
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    fs, _ = _fs(storage.normalize(output))
    ds = pads.dataset(files, format="parquet", filesystem=fs, schema=schema)
    return ds.to_table(columns=columns, filter=filter)


def labelled_keys(output: str, model_id: str) -> set[tuple[str, str]]:
    """(image_uri, image_version) of every image already in labels/ for this model."""
    t = read_table(output, "labels", ["image_uri", "image_version"], filter=pc.field("model_id") == model_id)
    return set(zip(t["image_uri"].to_pylist(), t["image_version"].to_pylist()))


# ------------------------------------------------------------------------------ documented DuckDB queries

# The example queries of the README, verbatim (the tests run them and check the README shows them).
# 'out/' is the output root; $name are DuckDB prepared-statement parameters.
EXAMPLE_QUERIES = {
    "class_coverage": """\
SELECT class_id, class_name,
       count(*)                                       AS images,
       sum(pixel_count)                               AS pixels,
       sum(pixel_count) / (SELECT sum(width::BIGINT * height)
                           FROM read_parquet('out/labels/**/*.parquet', hive_partitioning = true)
                           WHERE run_date = $run_date) AS coverage
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true)
WHERE run_date = $run_date
GROUP BY class_id, class_name
ORDER BY pixels DESC;""",
    "images_with_class": """\
SELECT image_uri, pixel_fraction, mean_confidence, bbox_x_min, bbox_y_min, bbox_x_max, bbox_y_max
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true)
WHERE class_name = $class_name AND pixel_fraction > $min_fraction
ORDER BY pixel_fraction DESC;""",
    "error_summary": """\
SELECT run_date, stage, trim(split_part(error, '(', 1)) AS reason,
       count(*) AS images, min(image_uri) AS example
FROM read_parquet('out/errors/**/*.parquet', hive_partitioning = true)
GROUP BY ALL
ORDER BY run_date DESC, images DESC;""",
}


def example_query(name: str, root: str) -> str:
    """An EXAMPLE_QUERIES entry pointed at an output root (local path or s3:// URI)."""
    return EXAMPLE_QUERIES[name].replace("'out/", f"'{root.rstrip('/')}/")

# The README's three lines that turn a `label_map` back into an array (raw encoding), verbatim.
LABEL_MAP_SNIPPET = """\
import duckdb, numpy as np
(data, h, w), = duckdb.sql("SELECT label_map, height, width FROM read_parquet('out/labels/**/*.parquet') LIMIT 1").fetchall()
labels = np.frombuffer(data, np.uint8).reshape(h, w)  # class ids; for --label-encoding png: np.asarray(PIL.Image.open(io.BytesIO(data)))"""
