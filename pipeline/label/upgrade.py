"""One schema per table: every Parquet file of an output table has exactly the schema pipeline.label.tables says.

Readers with default options take one file's schema for a whole table: Spark, pandas, `pyarrow.dataset` and
DuckDB (without `union_by_name`) the first file's, so a column some files lack is dropped or unresolved, and
polars refuses the table (`SchemaError: extra column in file outside of expected schema`). So when a table's
columns change, the files written before are rewritten once, in place:

- the output records the schema version its files have in `_schema.json` at its root;
- a run that finds it missing or older than SCHEMA_VERSION calls `upgrade_tables` under the output's lease,
  after recovery and before anything is written: Ray tasks read the footer of every file of each table a newer
  step changes, and rewrite each older file with the steps it misses, under its own name (local: written in
  `_staging/` then renamed over it; S3: one PUT). A reader's glob sees every file, old or upgraded, exactly once
  at every moment, and every row once; only the files' schema changes. Then `_schema.json` is written;
- a crash midway leaves some files upgraded: the next run upgrades the rest (a file that has the current schema
  is left alone, and a converter is deterministic, so an upgrade done twice gives the same bytes), and the
  next run's recovery deletes what an interrupted local rewrite left in `_staging/`.

History: FIRST_RELEASE holds every table's schema as the first release wrote it, frozen; STEPS the changes since,
each with the schema version it gives the output, the table it changes, that table's schema after it (frozen too:
written out here, never taken from tables.py) and the function that converts a file's rows. The rule, enforced by
tests/test_table_upgrade.py: replaying FIRST_RELEASE through STEPS gives exactly tables.SCHEMAS, so a column
change in tables.py fails the suite until it comes with its step here.
"""
from __future__ import annotations

import json
import logging
import posixpath
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import faults
from ..errors import JobError
from ..storage import Location
from .commit import parquet_bytes
from .layout import SCHEMA_MARKER, OutputLayout
from .readers import list_table_files
from .tables import INDEX, SCHEMAS

log = logging.getLogger(__name__)

MARKER = SCHEMA_MARKER  # the name tests and messages use

_TS = pa.timestamp("us", tz="UTC")
_I32 = pa.int32()

# The first release's tables (commit 2fc07f7), written out: this history never changes.
FIRST_RELEASE: dict[str, pa.Schema] = {
    "labels": pa.schema([
        pa.field("image_uri", pa.string(), nullable=False), pa.field("image_version", pa.string(), nullable=False),
        pa.field("width", _I32, nullable=False), pa.field("height", _I32, nullable=False),
        pa.field("label_map", pa.binary(), nullable=False), pa.field("label_encoding", pa.string(), nullable=False),
        pa.field("classes_present", pa.list_(_I32), nullable=False), pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False), pa.field("labeled_at", _TS, nullable=False),
    ]),
    "class_stats": pa.schema([
        pa.field("image_uri", pa.string(), nullable=False), pa.field("image_version", pa.string(), nullable=False),
        pa.field("class_id", _I32, nullable=False), pa.field("class_name", pa.string(), nullable=False),
        pa.field("pixel_count", pa.int64(), nullable=False), pa.field("pixel_fraction", pa.float64(), nullable=False),
        pa.field("mean_confidence", pa.float64(), nullable=False),
        pa.field("bbox_x_min", _I32, nullable=False), pa.field("bbox_y_min", _I32, nullable=False),
        pa.field("bbox_x_max", _I32, nullable=False), pa.field("bbox_y_max", _I32, nullable=False),
        pa.field("model_id", pa.string(), nullable=False), pa.field("run_id", pa.string(), nullable=False),
    ]),
    "errors": pa.schema([
        pa.field("image_uri", pa.string(), nullable=False), pa.field("image_version", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False), pa.field("error", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False), pa.field("run_id", pa.string(), nullable=False),
        pa.field("failed_at", _TS, nullable=False),
    ]),
    # Added with the skip index (commit e574f87) in this form, and built by pipeline.label.skip for older outputs.
    INDEX: pa.schema([
        pa.field("image_uri", pa.string(), nullable=False), pa.field("image_version", pa.string(), nullable=False),
    ]),
}


@dataclass(frozen=True)
class FileContext:
    """What a converter may look at besides the file's rows: the output and the file's path relative to it."""

    output: Location
    relative: str  # e.g. class_stats/run_date=2026-01-01/part-<fileset>.parquet

    def sibling(self, table: str) -> Location:
        """The file of the same file set in another table (same partition, same name)."""
        return self.output.child(table, *self.relative.split("/")[1:])


@dataclass(frozen=True)
class Step:
    """One change of one table's columns."""

    version: int        # the output's schema version once every file has this step
    table: str
    schema: pa.Schema   # the table's schema after this step, written out
    convert: Callable[[pa.Table, FileContext], pa.Table]  # a file's rows in the schema before -> `schema`
    what: str           # one line for the log and _schema.json


def _keys(table: pa.Table) -> pa.Array:
    """image_uri NUL image_version, one string per row (NUL is in no URI or version)."""
    return pc.binary_join_element_wise(table["image_uri"].combine_chunks(), table["image_version"].combine_chunks(),
                                       "\x00")


def _class_stats_labeled_at(rows: pa.Table, ctx: FileContext) -> pa.Table:
    """class_stats gets `labeled_at`: the `labeled_at` of the image's labels row of the same file set (the same
    value the writer gives it today), null where that file or row is gone (queries then match on run_id)."""
    try:
        with ctx.output.fs.open(ctx.sibling("labels").path, "rb") as f:
            labels = pq.read_table(f, columns=["image_uri", "image_version", "labeled_at"])
    except FileNotFoundError:
        labels = pa.table({"image_uri": pa.array([], pa.string()), "image_version": pa.array([], pa.string()),
                           "labeled_at": pa.array([], _TS)})
    # A manifest naming an image twice labels it twice in one set: the later row is the one that counts.
    labels = labels.sort_by([("labeled_at", "descending")])
    found = pc.index_in(_keys(rows), value_set=_keys(labels))
    labeled_at = labels["labeled_at"].combine_chunks().cast(_TS).take(found)
    return rows.append_column(pa.field("labeled_at", _TS, nullable=True), labeled_at)


# labels/'s per-image uncertainty figures: files written before have none (null, not a made-up value).
_UNCERTAINTY = [pa.field(name, pa.float64(), nullable=True)
                for name in ("mean_confidence", "mean_margin", "low_confidence_fraction")]


def _labels_uncertainty(rows: pa.Table, ctx: FileContext) -> pa.Table:
    for f in _UNCERTAINTY:
        rows = rows.append_column(f, pa.nulls(rows.num_rows, f.type))
    return rows


# labels/'s tile count (--tile): every image labeled before tiling existed was labeled whole, so 0 (a fact, not a
# measurement: unlike the uncertainty figures, nothing is made up).
_TILES = pa.field("tiles", pa.int32(), nullable=True)


def _labels_tiles(rows: pa.Table, ctx: FileContext) -> pa.Table:
    return rows.append_column(_TILES, pa.array(np.zeros(rows.num_rows, np.int32)))

STEPS: tuple[Step, ...] = (
    Step(2, "class_stats", FIRST_RELEASE["class_stats"].append(pa.field("labeled_at", _TS, nullable=True)),
         _class_stats_labeled_at, "class_stats.labeled_at (the labels row's labeled_at)"),
    Step(3, "labels", pa.schema([*FIRST_RELEASE["labels"], *_UNCERTAINTY]), _labels_uncertainty,
         "labels.mean_confidence, mean_margin, low_confidence_fraction (null: labeled before they existed)"),
    Step(4, "labels", pa.schema([*FIRST_RELEASE["labels"], *_UNCERTAINTY, _TILES]), _labels_tiles,
         "labels.tiles (0: labeled before tiling existed, whole)"),
)

SCHEMA_VERSION = 1 + len(STEPS)


def history(table: str) -> list[tuple[int, pa.Schema]]:
    """(schema version, schema) of every form `table` has had, oldest first."""
    forms = [(1, FIRST_RELEASE[table])]
    forms += [(s.version, s.schema) for s in STEPS if s.table == table]
    return forms


def _same(a: pa.Schema, b: pa.Schema) -> bool:
    return a.equals(b, check_metadata=False)


def file_version(table: str, schema: pa.Schema) -> int | None:
    """The schema version of a file of `table` with this (Arrow) schema; None when no release wrote it."""
    found = [version for version, form in history(table) if _same(form, schema)]
    return found[-1] if found else None


class SchemaUpgradeError(JobError):
    """An output this code cannot bring to its schema (one line: which file or marker, and why)."""


def read_marker(output: Location) -> dict | None:
    """`_schema.json`, or None where the output has none yet."""
    marker = OutputLayout(output).schema_marker()
    try:
        return json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:  # cut short or edited by hand: checking every file again is always safe
        raise SchemaUpgradeError(f"{marker.uri} is not the job's schema record ({e}); delete it and the next run "
                                 "checks every table file again") from None


def upgrade_tables(output: Location, run_id: str | None = None) -> dict[str, int]:
    """Bring every table file of `output` to the current schema, once per output root; returns the files rewritten
    per table ({} when `_schema.json` says the output is current). Call it under the output's lease, after
    recovery, before the run writes."""
    marker = read_marker(output)
    recorded = 1 if marker is None else int(marker.get("schema_version", 1))
    if recorded > SCHEMA_VERSION:
        raise SchemaUpgradeError(
            f"output {output.uri} holds tables of schema version {recorded} ({MARKER}), written by a newer release "
            f"of the labeling job; this one writes version {SCHEMA_VERSION}: run the newer release")
    if recorded == SCHEMA_VERSION:
        return {}
    pending = [s for s in STEPS if s.version > recorded]
    tables = sorted({s.table for s in pending})
    files = {t: list_table_files(output, t) for t in tables}
    paths = [(t, p) for t in tables for p in files[t]]
    upgraded = {t: 0 for t in tables}
    if paths:
        import ray

        log.warning("checking the schema of %d file(s) of %s (%s) for schema version %d: %s", len(paths),
                    output.uri, ", ".join(tables), SCHEMA_VERSION, "; ".join(s.what for s in pending))
        scratch = OutputLayout.scratch(f"upgrade-{uuid.uuid4().hex[:12]}")
        done = ray.data.from_items([{"table": t, "path": p} for t, p in paths],
                                   override_num_blocks=min(len(paths), 256)).map_batches(
            _upgrade_files, batch_size=16, batch_format="pyarrow", num_cpus=0.25, runtime_env=faults.runtime_env(),
            fn_kwargs={"output": output, "scratch": scratch}).materialize()
        for row in done.iter_rows():
            if row["problem"]:  # a file no release wrote: the whole output stays as it is, unmarked
                raise SchemaUpgradeError(row["problem"])
            upgraded[row["table"]] += row["upgraded"]
        if any(upgraded.values()):
            log.warning("upgraded %s of %s to schema version %d",
                        ", ".join(f"{n} {t} file(s)" for t, n in upgraded.items() if n), output.uri, SCHEMA_VERSION)
    OutputLayout(output).schema_marker().write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "steps": {str(s.version): s.what for s in STEPS},
        "upgraded_files": upgraded, "upgraded_by_run": run_id,
        "upgraded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1))
    return upgraded


def _relative(output: Location, path: str) -> str:
    return posixpath.relpath(path, output.path)


def upgrade_file(output: Location, table: str, path: str, scratch: str) -> bool:
    """Rewrite one file of `table` (a path in the output's filesystem) to the current schema; False when it has
    it already. The new file replaces the old under the same name in one step."""
    fs = output.fs
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    version = file_version(table, schema)
    if version is None:
        raise SchemaUpgradeError(f"{output.uri_of(path)}: a {table} file with columns "
                                 f"{', '.join(f'{f.name} {f.type}' for f in schema)}, which no release of the labeling "
                                 "job wrote; the output was changed by hand")
    steps = [s for s in STEPS if s.table == table and s.version > version]
    if not steps:
        return False
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f)
    ctx = FileContext(output, _relative(output, path))
    for step in steps:
        rows = step.convert(rows, ctx).cast(step.schema)
    # An atomic replace: locally written in `scratch` (under _staging/, so a crash leaves nothing in the table's
    # folder) and renamed over the old file; on S3 one PUT. Readers get the old or the new file, whole.
    with output.child(ctx.relative).open_write(staging=output.child(scratch)) as f:
        f.write(parquet_bytes(rows.cast(SCHEMAS[table])))
        faults.fire(f"label.upgrade:staged:{table}")
    faults.fire(f"label.upgrade:replaced:{table}")
    return True


def _upgrade_files(batch: pa.Table, *, output: Location, scratch: str) -> pa.Table:
    """Ray task: upgrade each file of the batch; one row per file: (table, 1 if rewritten, the problem if any)."""
    tables, done, problems = batch["table"].to_pylist(), [], []
    for table, path in zip(tables, batch["path"].to_pylist(), strict=True):
        try:
            done.append(int(upgrade_file(output, table, path, scratch)))
            problems.append(None)
        except SchemaUpgradeError as e:  # told by the driver in one line, not as a Ray task traceback
            done.append(0)
            problems.append(str(e))
    return pa.table({"table": pa.array(tables, pa.string()), "upgraded": pa.array(done, pa.int64()),
                     "problem": pa.array(problems, pa.string())})
