"""What is already labeled, and dropping it from a listing inside Ray Data (a left anti-join): the driver holds
neither side.

The index, `index/model_id=<model_id>/part-<fileset>.parquet`, holds the (image_uri, image_version) of every
labels/ row of that model, written in the same commit as the labels (pipeline.label.commit). An output written
before the index existed gets it built from labels/ once, file by file, in Ray tasks; `index/_complete.json`
then records that every labels file has its index file.
"""
from __future__ import annotations

import json
import logging
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..storage import Location
from .commit import parquet_bytes
from .layout import OutputLayout
from .readers import list_table_files
from .tables import INDEX, INDEX_SCHEMA

log = logging.getLogger(__name__)

KEY = ("image_uri", "image_version")
ROWS_PER_JOIN_PARTITION = 500_000


def _fileset_of(path: str) -> str:
    return posixpath.basename(path)[len("part-"):-len(".parquet")]


def _read_columns(output: Location, path: str, columns: list[str]) -> pa.Table:
    with output.fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def ensure_index(output: Location) -> int:
    """Give every labels file its index file(s), once per output root; returns how many labels files that took.
    Call it under the output's lease, after recovery."""
    marker = OutputLayout(output).index_complete()
    if marker.exists():
        return 0
    # Every labels file, even one with index files already: a backfill killed midway may have written the index
    # of one model of a file and not of another. The writes are idempotent (same name, same rows).
    missing = list_table_files(output, "labels")
    if missing:
        log.warning("building the skip index of %s from %d labels file(s) written before it existed", output.uri,
                    len(missing))
        ray.data.from_items([{"path": p} for p in missing], override_num_blocks=min(len(missing), 64)).map_batches(
            _index_labels_files, batch_size=16, batch_format="pyarrow", num_cpus=0.25,
            fn_kwargs={"output": output}).materialize()
    marker.write_text(json.dumps({"built_from_labels_files": len(missing)}))
    return len(missing)


def _index_labels_files(batch: pa.Table, *, output: Location) -> pa.Table:
    """Ray task: the index file of each labels file, one per model in it, under the labels file's fileset name."""
    for path in batch["path"].to_pylist():
        table = _read_columns(output, path, ["model_id", *KEY])
        for model_id in pc.unique(table["model_id"]).to_pylist():
            rows = table.filter(pc.field("model_id") == model_id).select(list(KEY)).cast(INDEX_SCHEMA)
            output.child(OutputLayout.table_file(INDEX, "", _fileset_of(path), model_id)).write_bytes(parquet_bytes(rows))
    return pa.table({"done": [batch.num_rows]})


def index_files(output: Location, model_id: str) -> list[str]:
    """The index files of one model (paths in the output's filesystem)."""
    return list_table_files(output, INDEX, f"model_id={model_id}")


def _read_index_files(batch: pa.Table, *, output: Location):
    """Ray task: the (image_uri, image_version) rows of each index file."""
    for path in batch["path"].to_pylist():
        yield _read_columns(output, path, list(KEY)).cast(INDEX_SCHEMA)


def drop_labeled(listing: ray.data.Dataset, output: Location, model_id: str, listed: int, *,
                 rows_per_index_file: int) -> ray.data.Dataset:
    """The listing rows whose (image_uri, image_version) this model has not labeled yet."""
    files = index_files(output, model_id)
    if not files:
        return listing
    # The file names are known: read tasks open them through the output's filesystem (no second listing).
    index = ray.data.from_items([{"path": p} for p in files], override_num_blocks=min(len(files), 1024)).map_batches(
        _read_index_files, batch_size=1, batch_format="pyarrow", num_cpus=0.25, fn_kwargs={"output": output})
    # Sized by the larger side: a small nightly listing against a large index still spreads the index.
    rows = max(listed, len(files) * rows_per_index_file)
    partitions = max(1, min(256, -(-rows // ROWS_PER_JOIN_PARTITION)))
    return listing.join(index, join_type="left_anti", num_partitions=partitions, on=KEY)
