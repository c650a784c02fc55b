"""The labeling job's exactly-once commit protocol.

Layout under the output root (a local directory or an s3:// prefix):

    labels/run_date=YYYY-MM-DD/part-<fileset>.parquet        one row per labeled image
    class_stats/run_date=YYYY-MM-DD/part-<fileset>.parquet   one row per (image, class present)
    errors/run_date=YYYY-MM-DD/part-<fileset>.parquet        one row per image that could not be labeled
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
and its images are then either skipped or labeled again: each image lands in `labels/` exactly once and its
statistics in `class_stats/` exactly once. Readers glob `labels/**/*.parquet`, which staging never matches,
and every file appears atomically, complete. One job per output root at a time.
"""
from __future__ import annotations

import io
import json
import logging
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from .. import faults
from ..storage import Location, StorageError, storage_error
from .tables import SCHEMAS, TABLES

log = logging.getLogger(__name__)

# Publication order: the labels file (what the skip logic reads) goes last.
PUBLISH_ORDER = ("class_stats", "errors", "labels")
STAGING = "_staging"
COMMITS = "_commits"
COMPRESSION = "zstd"
RUNS, PREVIEWS = "runs", "previews"
# Everything the job writes under an output root; images stored anywhere else under it are labelled.
OWN_FOLDERS = (*TABLES, RUNS, PREVIEWS, STAGING, COMMITS)
# A local atomic write leaves `.tmp-*` beside its target only when killed; a live one lasts milliseconds.
STALE_TEMPORARY_SECONDS = 600


def parquet_bytes(table: pa.Table, row_group_rows: int = 256) -> bytes:
    """A zstd Parquet file of plain Arrow types; no dictionary or statistics on the label map bytes."""
    small = [f.name for f in table.schema if f.name != "label_map"]
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION, row_group_size=row_group_rows,
                   use_dictionary=[n for n in small if pa.types.is_string(table.schema.field(n).type)],
                   write_statistics=small)
    return buf.getvalue()


def _final_name(table: str, run_date: str, fileset: str) -> str:
    return f"{table}/run_date={run_date}/part-{fileset}.parquet"


def _move(output: Location, src: str, dst: str) -> None:
    """Publish one file: it appears complete under its final name (local rename / S3 server-side copy)."""
    if output.is_local:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    else:
        output.fs.copy(src, dst)
        output.fs.rm(src)


def commit_fileset(output: Location, fileset: str, run_date: str, tables: dict[str, pa.Table]) -> dict[str, int]:
    """Stage, commit and publish one file set (see the module docstring): one file per table given (an
    empty table gives an empty file). Returns rows written per table."""
    plan = []
    for name in PUBLISH_ORDER:
        table = tables.get(name)
        if table is None:
            continue
        src = f"{STAGING}/{fileset}/{name}.parquet"
        output.child(src).write_bytes(parquet_bytes(table.cast(SCHEMAS[name])))
        plan.append({"table": name, "src": src, "dst": _final_name(name, run_date, fileset), "rows": table.num_rows})
    if not plan:
        return {}
    faults.fire("label.commit:staged")
    marker = {"fileset": fileset, "run_date": run_date, "files": plan}
    output.child(COMMITS, f"{fileset}.json").write_text(json.dumps(marker, indent=1))
    faults.fire("label.commit:committed")
    _publish(output, marker)
    return {p["table"]: p["rows"] for p in plan}


def _publish(output: Location, marker: dict) -> None:
    fs = output.fs
    for entry in marker["files"]:
        src, dst = output.child(entry["src"]).path, output.child(entry["dst"]).path
        if fs.exists(src):
            _move(output, src, dst)
        elif not fs.exists(dst):
            raise StorageError(f"commit {marker['fileset']} of {output.uri}: neither {entry['src']} nor "
                               f"{entry['dst']} exists; the output was modified by hand")
        faults.fire(f"label.commit:published:{entry['table']}")
    fs.rm(output.child(COMMITS, f"{marker['fileset']}.json").path)
    staging = output.child(STAGING, marker["fileset"]).path
    if fs.exists(staging):
        fs.rm(staging, recursive=True)


def recover(output: Location) -> dict[str, int]:
    """Finish publishing every committed file set and delete uncommitted staging. Idempotent.

    Returns {"rolled_forward": n, "discarded": m}.
    """
    fs = output.fs
    try:
        fs.invalidate_cache()
        markers = sorted(p for p in _ls(output.child(COMMITS)) if p.endswith(".json"))
        rolled = 0
        for path in markers:
            with fs.open(path, "rb") as f:
                marker = json.loads(f.read().decode("utf-8"))
            log.warning("finishing the commit of file set %s left by an interrupted run", marker["fileset"])
            _publish(output, marker)
            rolled += 1
        fs.invalidate_cache()
        discarded = 0
        for path in _ls(output.child(STAGING)):
            fs.rm(path, recursive=True)
            discarded += 1
        _remove_stale_temporaries(output)
    except StorageError:
        raise
    except Exception as e:
        raise storage_error(output.uri, e) from None
    return {"rolled_forward": rolled, "discarded": discarded}


def _remove_stale_temporaries(output: Location) -> None:
    """Delete the `.tmp-*` files a killed local write left in _commits/ and runs/ (S3 writes leave none)."""
    if not output.is_local:
        return
    now = time.time()
    for folder in (COMMITS, RUNS):
        for path in _ls(output.child(folder)):
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
