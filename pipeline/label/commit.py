"""The labeling job's exactly-once commit protocol.

The output root's layout is pipeline.label.layout's; this module publishes into it.

Commit protocol, per *file set* (the labels, class_stats, errors and index rows of the same images):

1. `stage_fileset`, in a Ray worker: every table is written complete to `_staging/<fileset>/` (local: temp
   file + rename; S3: one PUT). File-set names are unique per attempt (`<run_id>-<random>`), so a retried
   run id never reuses one;
2. `commit_staged`, in the driver: the commit marker `_commits/<fileset>.json` is written (one atomic write):
   **the commit point**;
3. files are moved to their final names, class_stats, errors and index first, labels last; a move never
   replaces an existing file (`Location.publish_to`). Then the marker and the staging folder are deleted.

`recover()` runs at the start of every job, under the output's lease, before anything is skipped: it finishes
step 3 for every marker it finds (moves are idempotent) and deletes staging folders without a marker (a writer
killed mid-file-set, or a run killed before its commit). So a set is either entirely published (after a crash:
by the next run) or entirely discarded, whatever the moment of the crash, and its images are then either
skipped or labeled again: each image lands in `labels/` exactly once and its statistics in `class_stats/`
exactly once. Readers glob `labels/**/*.parquet`, which staging never matches, and every file appears
atomically, complete. The lease (pipeline.lease) makes sure one job at a time writes an output root.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from .. import faults
from ..storage import Location, StorageError, storage_error
from .layout import OutputLayout
from .tables import INDEX, SCHEMAS

log = logging.getLogger(__name__)

# Publication order: the labels file (what analytics read) goes last, after the index that skips its images.
PUBLISH_ORDER = ("class_stats", "errors", INDEX, "labels")
COMPRESSION = "zstd"
# A local atomic write leaves `.tmp-*` beside its target only when killed; a live one lasts milliseconds.
STALE_TEMPORARY_SECONDS = 600


def parquet_options(schema: pa.Schema) -> dict:
    """The writer options of every table file: zstd; no dictionary or statistics on the label map bytes."""
    small = [f.name for f in schema if f.name != "label_map"]
    return {"compression": COMPRESSION, "write_statistics": small,
            "use_dictionary": [n for n in small if pa.types.is_string(schema.field(n).type)]}


def parquet_bytes(table: pa.Table, row_group_rows: int = 256) -> bytes:
    """A zstd Parquet file of plain Arrow types (parquet_options)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_rows, **parquet_options(table.schema))
    return buf.getvalue()


final_name = OutputLayout.table_file  # where a file set's file of a table is published (relative to the root)


def stage_fileset(output: Location, fileset: str, run_date: str, model_id: str,
                  tables: dict[str, pa.Table]) -> dict | None:
    """Step 1 (in the worker that holds the rows): write every given table of one file set to staging.
    Returns the commit marker for `commit_staged`, or None when no table was given."""
    plan = []
    for name in PUBLISH_ORDER:
        table = tables.get(name)
        if table is None:
            continue
        src = OutputLayout.staged_file(fileset, name)
        output.child(src).write_bytes(parquet_bytes(table.cast(SCHEMAS[name])))
        faults.fire(f"label.stage:{name}")
        plan.append({"table": name, "src": src, "dst": final_name(name, run_date, fileset, model_id),
                     "rows": table.num_rows})
    if not plan:
        return None
    return {"fileset": fileset, "run_date": run_date, "files": plan}


def commit_staged(output: Location, marker: dict) -> dict[str, int]:
    """Steps 2 and 3 (in the driver, metadata only): the commit marker, then publication. Rows per table."""
    faults.fire("label.commit:staged")
    OutputLayout(output).commit_marker(marker["fileset"]).write_text(json.dumps(marker, indent=1))
    faults.fire("label.commit:committed")
    _publish(output, marker)
    rows: dict[str, int] = {}
    for p in marker["files"]:  # a group (pipeline.label.filesets) has several labels files
        rows[p["table"]] = rows.get(p["table"], 0) + p["rows"]
    return rows


def commit_fileset(output: Location, fileset: str, run_date: str, model_id: str,
                   tables: dict[str, pa.Table]) -> dict[str, int]:
    """Stage, commit and publish one file set in this process (an empty table gives an empty file)."""
    marker = stage_fileset(output, fileset, run_date, model_id, tables)
    return commit_staged(output, marker) if marker else {}


def _publish(output: Location, marker: dict) -> None:
    """Step 3: the files other than labels concurrently (each is a few storage round trips), then labels."""
    entries = marker["files"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda e: _publish_file(output, marker, e), [e for e in entries if e["table"] != "labels"]))
    for entry in entries:
        if entry["table"] == "labels":
            _publish_file(output, marker, entry)
    layout = OutputLayout(output)
    _remove(layout.commit_marker(marker["fileset"]))
    _remove(layout.staging(marker["fileset"]), recursive=True)
    for member in marker.get("members", ()):  # the sets a group merged: their labels files are published
        _remove(layout.staging(member), recursive=True)


def _publish_file(output: Location, marker: dict, entry: dict) -> None:
    """Move one staged file to its final name, never replacing one (Location.publish_to: a move done before a
    crash is done again harmlessly)."""
    src, dst = output.child(entry["src"]), output.child(entry["dst"])
    if output.fs.exists(src.path):
        src.publish_to(dst)
    elif not output.fs.exists(dst.path):
        raise StorageError(f"commit {marker['fileset']} of {output.uri}: neither {entry['src']} nor "
                           f"{entry['dst']} exists; the output was modified by hand")
    faults.fire(f"label.commit:published:{entry['table']}")


def _nothing_left(output: Location, marker: dict) -> bool:
    """None of a marker's files exists, staged or published: the set was never visible, only its marker was
    written (by a run that had lost its lease and whose staging a recovery removed)."""
    return not any(output.fs.exists(output.child(e[k]).path) for e in marker["files"] for k in ("src", "dst"))


def _remove(location: Location, recursive: bool = False) -> None:
    """Delete (the name taken literally); one already gone (removed by a recovery, or by hand) is what was wanted."""
    try:
        location.remove(recursive=recursive)
    except FileNotFoundError:
        pass


def recover(output: Location) -> dict[str, int]:
    """Finish publishing every committed file set and delete uncommitted staging. Idempotent.

    Returns {"rolled_forward": n, "discarded": m}.
    """
    fs = output.fs
    layout = OutputLayout(output)
    try:
        fs.invalidate_cache()
        markers = sorted(p for p in _ls(layout.commits()) if p.endswith(".json"))
        rolled = 0
        for path in markers:
            with fs.open(path, "rb") as f:
                marker = json.loads(f.read().decode("utf-8"))
            if _nothing_left(output, marker):
                log.warning("dropping the commit marker of file set %s: none of its files exists", marker["fileset"])
                _remove(Location(output.uri_of(path), fs, path))
                continue
            log.warning("finishing the commit of file set %s left by an interrupted run", marker["fileset"])
            _publish(output, marker)
            rolled += 1
        fs.invalidate_cache()
        discarded = 0
        for path in _ls(layout.staging()):
            _remove(Location(output.uri_of(path), fs, path), recursive=True)
            discarded += 1
        _remove_stale_temporaries(output)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the output's URI
        raise storage_error(output.uri, e) from None
    return {"rolled_forward": rolled, "discarded": discarded}


def _remove_stale_temporaries(output: Location) -> None:
    """Delete the `.tmp-*` files a killed local write left in _commits/ and runs/ (S3 writes leave none)."""
    if not output.is_local:
        return
    now = time.time()
    layout = OutputLayout(output)
    for folder in (layout.commits(), layout.runs()):
        for path in _ls(folder):
            name = os.path.basename(path)
            try:
                if name.startswith(".tmp-") and now - os.path.getmtime(path) > STALE_TEMPORARY_SECONDS:
                    os.unlink(path)
                    log.warning("removed %s, left by an interrupted write", path)
            except FileNotFoundError:
                pass
            except OSError as e:  # another user's file in a shared folder: left, never worth failing the run
                log.warning("could not remove %s: %s", path, e)


def _ls(folder: Location) -> list[str]:
    try:
        return [p if isinstance(p, str) else p["name"] for p in folder.fs.ls(folder.path, detail=False)]
    except FileNotFoundError:
        return []
