"""The labeling job's output tables (the Parquet contract) and how the pipeline's result rows become them.

`labels/` has one row per labeled image, `class_stats/` one per (image, class present), `errors/` one per image
that could not be labeled; docs/labeling.md ("Output") documents every column.

Every file of a table has exactly its schema here, so readers with default options (Spark, Athena, pandas,
polars, DuckDB without `union_by_name`) read any output whole. A change to a table's columns therefore comes with
a step in pipeline.label.upgrade, which rewrites the files written before, once per output; a test replays that
history and fails until the step is there.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

TABLES = ("labels", "class_stats", "errors")  # the analytics tables
# labels/'s per-image uncertainty columns, from inference.Uncertainty (docs/labeling.md "Output").
UNCERTAINTY = ("mean_confidence", "mean_margin", "low_confidence_fraction")
INDEX = "index"  # what is labeled, per model: the next run's skip list (not an analytics table)

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
    # Added after labeled_at's step: how sure the model was of the image (upgrade step 3 gives older files nulls).
    *(pa.field(name, pa.float64(), nullable=True) for name in UNCERTAINTY),
    # Added after them: the tiles the image was labeled in, 0 when whole (upgrade step 4 gives older files nulls).
    pa.field("tiles", pa.int32(), nullable=True),
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
    # Added after the first release: the labels row's labeled_at (upgrade step 2 gives older files the column).
    pa.field("labeled_at", UTC_TS, nullable=True),
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

# index/model_id=<model_id>/part-<fileset>.parquet: the (image_uri, image_version) of labels/ rows of one model.
INDEX_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("image_version", pa.string(), nullable=False),
])

SCHEMAS = {"labels": LABELS_SCHEMA, "class_stats": CLASS_STATS_SCHEMA, "errors": ERRORS_SCHEMA, INDEX: INDEX_SCHEMA}

# Rows flowing out of the pipeline's postprocess stage: one per image, labeled or failed.
_LIST_I32 = pa.list_(pa.int32())
RESULT_SCHEMA = pa.schema([
    ("image_uri", pa.string()), ("image_version", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("label_map", pa.binary()), ("label_encoding", pa.string()), ("classes_present", _LIST_I32),
    ("stat_class_id", _LIST_I32), ("stat_pixel_count", pa.list_(pa.int64())),
    ("stat_pixel_fraction", pa.list_(pa.float64())), ("stat_mean_confidence", pa.list_(pa.float64())),
    ("stat_x_min", _LIST_I32), ("stat_y_min", _LIST_I32), ("stat_x_max", _LIST_I32), ("stat_y_max", _LIST_I32),
    *((name, pa.float64()) for name in UNCERTAINTY), ("tiles", pa.int32()),
    ("at", UTC_TS), ("stage", pa.string()), ("error", pa.string()), ("actor", pa.string()),
])


def split_results(block: pa.Table, *, model_id: str, run_id: str, class_names: list[str]) -> dict[str, pa.Table]:
    """Result rows (RESULT_SCHEMA) -> the three output tables and the index rows of the labeled images."""
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
        **{name: ok[name] for name in UNCERTAINTY}, "tiles": ok["tiles"],
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
        "labeled_at": ok["at"].take(parents),
    }, schema=CLASS_STATS_SCHEMA)
    errors = pa.table({
        "image_uri": bad["image_uri"], "image_version": bad["image_version"],
        "stage": pc.fill_null(bad["stage"], "unknown"), "error": bad["error"],
        "model_id": pa.array([model_id] * n_bad, pa.string()), "run_id": pa.array([run_id] * n_bad, pa.string()),
        "failed_at": bad["at"],
    }, schema=ERRORS_SCHEMA)
    index = pa.table({"image_uri": ok["image_uri"], "image_version": ok["image_version"]}, schema=INDEX_SCHEMA)
    return {"labels": labels, "class_stats": stats, "errors": errors, INDEX: index}
