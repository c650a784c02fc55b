"""Larger files for the small tables: the class_stats, errors and index rows of several staged file sets go into
one file per table, committed together with the sets' labels files by one commit marker.

A file set holds about --rows-per-file images (1,000), so its labels file is megabytes of label maps while its
class_stats, errors and index files are a few KB to a few hundred KB; at 100M images that is 100,000 small files per
table, which Athena and Spark open one by one and S3 LISTs page through. A compaction after publication cannot keep
a glob reader's view exactly once (for a moment the merged file and its parts are both visible, or neither), so the
merge happens before the commit: the driver gathers the markers of staged file sets (writer.stage_results' rows)
until they hold `images_per_small_file` images, a Ray task writes each small table's rows of all of them as one
staged file and returns one marker naming those files and the sets' labels files, and the driver commits it like any
file set (pipeline.label.commit): one marker write, then the moves, labels last. A crash before that marker costs the
group (10,000 images by default, labeled again by the next run), never a row twice.
"""
from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from .. import faults
from .commit import parquet_bytes
from .layout import OutputLayout
from .tables import INDEX, SCHEMAS

SMALL_TABLES = ("class_stats", "errors", INDEX)


class FilesetGrouper:
    """The driver's side: staged file sets (writer.STAGED_SCHEMA rows) gathered until they hold `images` images (a
    set holds --rows-per-file, fewer when its label maps reach bytes_per_file); each group is merged by a Ray task
    (`merge_staged`: no row passes through the driver) into one row for the Committer. The driver holds the
    pending sets' markers only."""

    def __init__(self, images: int, output, model_id: str, num_cpus: float):
        self.images, self.output, self.model_id, self.num_cpus = images, output, model_id, num_cpus
        self.pending: list[pa.Table] = []
        self.pending_images = 0

    def add(self, staged: pa.Table) -> list[pa.Table]:
        """Take staged rows; returns the groups now complete (to commit), in order."""
        groups = []
        for i in range(staged.num_rows):
            row = staged.slice(i, 1)
            self.pending.append(row)
            self.pending_images += row["labeled"][0].as_py() + row["errors"][0].as_py()
            if self.pending_images >= self.images:
                groups += self.flush()
        return groups

    def flush(self) -> list[pa.Table]:
        """The group gathered so far (the run's last one is smaller)."""
        if not self.pending:
            return []
        rows = pa.concat_tables(self.pending).combine_chunks()
        self.pending, self.pending_images = [], 0
        if rows.num_rows == 1:
            return [rows]
        task = _MERGE.options(num_cpus=self.num_cpus, runtime_env=faults.runtime_env())
        return [ray.get(task.remote(rows, output=self.output, model_id=self.model_id))]


def merge_staged(batch: pa.Table, *, output, model_id: str) -> pa.Table:
    """Ray task: staged file sets -> one group (one row of the same schema, its marker naming the merged files).
    The small tables' staged files are read and written again as one file each under `_staging/<group>/`; the labels
    files stay where they are."""
    if batch.num_rows <= 1:
        return batch
    markers = [json.loads(m) for m in batch["marker"].to_pylist()]
    run_date = markers[0]["run_date"]
    assert all(m["run_date"] == run_date for m in markers), "one run writes one run_date"
    group = f"{markers[0]['fileset'].rsplit('-', 1)[0]}-g{uuid.uuid4().hex[:11]}"  # <run_id>-<random>, as every set
    files = []
    for table in SMALL_TABLES:
        parts = [e for m in markers for e in m["files"] if e["table"] == table]
        if not parts:
            continue
        rows = pa.concat_tables([_read(output, e["src"]).cast(SCHEMAS[table]) for e in parts])
        src = OutputLayout.staged_file(group, table)
        output.child(src).write_bytes(parquet_bytes(rows))
        files.append({"table": table, "src": src, "dst": OutputLayout.table_file(table, run_date, group, model_id),
                      "rows": rows.num_rows})
    files += [e for m in markers for e in m["files"] if e["table"] not in SMALL_TABLES]
    faults.fire("label.group:merged")
    marker = {"fileset": group, "run_date": run_date, "files": files, "members": [m["fileset"] for m in markers]}
    return pa.table({name: [json.dumps(marker) if name == "marker" else _combine(batch[name])]
                     for name in batch.column_names}, schema=batch.schema)


def _read(output, relative: str) -> pa.Table:
    with output.fs.open(output.child(relative).path, "rb") as f:
        return pq.read_table(f)


def _combine(column: pa.ChunkedArray):
    """One value for a group from its sets' values: counts add up, lists join, JSON count maps add up."""
    t = column.type
    if pa.types.is_integer(t):
        return pc.sum(column).as_py() or 0
    if pa.types.is_list(t):
        return sorted({v for values in column.to_pylist() for v in values or ()})
    if pa.types.is_string(t):  # a JSON object of counts (e.g. errors by stage)
        total: dict = {}
        for text in column.to_pylist():
            for key, n in json.loads(text or "{}").items():
                total[key] = total.get(key, 0) + n
        return json.dumps(total)
    raise TypeError(f"cannot combine a staged-set column of type {t}")


_MERGE = ray.remote(max_retries=3)(merge_staged)  # a worker that dies mid-merge: the merge runs again, new group name
