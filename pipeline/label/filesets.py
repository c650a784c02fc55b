"""From staged blocks to the output's files: the results files of several blocks become one file set, whose files
are committed together by one commit marker.

The write tasks stage each block of result rows as it comes (pipeline.label.writer), so label maps never wait in
memory for a file to fill. The driver gathers the staged blocks' rows (writer.STAGED_SCHEMA) until they hold
`images_per_small_file` images, and a Ray task (`merge_staged`) reads the group's results files one at a time and
writes:
- labels files of at most --rows-per-file rows, ending early once their label maps reach bytes_per_file, streamed
  in row groups, so the task holds one results file and one row group, never a labels file;
- one file each for class_stats, errors and index: at 100M images, files of one block's rows would be millions of
  small files, which Athena and Spark open one by one and S3 LISTs page through.
The driver commits the group like any file set (pipeline.label.commit): one marker write, then the moves, labels
last. A compaction after publication could not keep a glob reader's view exactly once (for a moment the merged file
and its parts are both visible, or neither); merging before the commit does. A crash before that marker costs the
group (10,000 images by default, labeled again by the next run), never a row twice.
"""
from __future__ import annotations

import contextlib
import json
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from .. import faults
from ..errors import JobError
from ..storage import Location, storage_error
from .commit import parquet_bytes, parquet_options
from .layout import OutputLayout
from .tables import INDEX, LABELS_SCHEMA, RESULT_SCHEMA, split_results
from .writer import OutputSettings

SMALL_TABLES = ("class_stats", "errors", INDEX)
ROW_GROUP_ROWS = 256  # rows of a labels file's row group, as parquet_bytes writes them ...
ROW_GROUP_BYTES = 64 * 1024**2  # ... or fewer, once their label maps reach this: what the merge holds at most
READ_AHEAD = 4  # results files read ahead of the one being split (each is one block of rows)


class FilesetGrouper:
    """The driver's side: staged blocks (writer.STAGED_SCHEMA rows) gathered until they hold `images` images; each
    group becomes one file set in a Ray task (`merge_staged`: no row passes through the driver), returned as one row
    for the Committer. The driver holds the pending blocks' small rows only."""

    def __init__(self, images: int, settings: OutputSettings, num_cpus: float):
        self.images, self.settings, self.num_cpus = images, settings, num_cpus
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
        task = _MERGE.options(num_cpus=self.num_cpus, runtime_env=faults.runtime_env())
        try:
            return [ray.get(task.remote(rows, settings=self.settings))]
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:  # its retries spent too
            images = int(pc.sum(rows["labeled"]).as_py() or 0) + int(pc.sum(rows["errors"]).as_py() or 0)
            raise JobError(f"the task that writes the file set of {images:,} images died {_MERGE_RETRIES + 1} times "
                           f"({type(e).__name__}: out of memory, or a node lost each time?); nothing of it was "
                           "committed, and the next run labels those images again") from None


def merge_staged(batch: pa.Table, *, settings: OutputSettings) -> pa.Table:
    """Ray task: staged blocks -> one file set under `_staging/<group>/` (one row of the same schema, its marker
    naming the set's files and the blocks it was made of)."""
    markers = [json.loads(m) for m in batch["marker"].to_pylist()]
    assert all(m["run_date"] == settings.run_date for m in markers), "one run writes one run_date"
    group = f"{settings.run_id}-g{uuid.uuid4().hex[:11]}"  # <run_id>-<random>, as every set
    output = settings.output
    small: dict[str, list[pa.Table]] = {table: [] for table in SMALL_TABLES}
    labels = _LabelsFiles(settings, group)
    try:
        for results in _read_ahead(output, [e["src"] for m in markers for e in m["files"]]):
            tables = split_results(results, model_id=settings.model_id, run_id=settings.run_id,
                                   class_names=list(settings.class_names))
            del results
            labels.add(tables.pop("labels"))
            for table, rows in tables.items():
                if rows.num_rows:
                    small[table].append(rows)
        files = labels.close()
    except BaseException:
        labels.abort()
        raise
    for table, parts in small.items():
        if not parts:
            continue
        rows = pa.concat_tables(parts)
        src = OutputLayout.staged_file(group, table)
        output.child(src).write_bytes(parquet_bytes(rows))
        faults.fire(f"label.stage:{table}")
        files.append({"table": table, "src": src, "dst": OutputLayout.table_file(table, settings.run_date, group,
                                                                                 settings.model_id),
                      "rows": rows.num_rows})
    faults.fire("label.group:merged")
    marker = {"fileset": group, "run_date": settings.run_date, "files": files,
              "members": [m["fileset"] for m in markers]}
    return pa.table({name: [json.dumps(marker) if name == "marker" else _combine(batch[name])]
                     for name in batch.column_names}, schema=batch.schema)


def _read_ahead(output: Location, relatives: list[str]) -> Iterator[pa.Table]:
    """The staged results files in order, READ_AHEAD of them fetched while the current one is split."""
    with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
        pending: deque = deque()
        for relative in relatives:
            pending.append(pool.submit(_read, output, relative))
            if len(pending) > READ_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _read(output: Location, relative: str) -> pa.Table:
    with output.fs.open(output.child(relative).path, "rb") as f:
        return pq.read_table(f).cast(RESULT_SCHEMA)


class _LabelsFiles:
    """The group's labels rows streamed into staged files of at most rows_per_file rows and bytes_per_file of label
    maps (at least one row each), a row group at a time."""

    def __init__(self, settings: OutputSettings, group: str):
        self.settings, self.group = settings, group
        self.files: list[dict] = []
        self._file: contextlib.ExitStack | None = None  # holds the staged file being written (Location.open_write)
        self._writer: pq.ParquetWriter | None = None
        self._rows = self._bytes = 0  # in the file being written
        self._buffer: list[pa.Table] = []  # rows of its next row group
        self._buffer_rows = self._buffer_bytes = 0

    def add(self, rows: pa.Table) -> None:
        sizes = pc.binary_length(rows["label_map"]).to_pylist()
        start = 0
        for i, n in enumerate(sizes):
            if self._rows and (self._rows >= self.settings.rows_per_file or self._bytes + n > self.settings.bytes_per_file):
                self._append(rows.slice(start, i - start), sum(sizes[start:i]))
                self._finish_file()
                start = i
            self._rows += 1
            self._bytes += n
        self._append(rows.slice(start), sum(sizes[start:]))

    def _append(self, rows: pa.Table, label_map_bytes: int) -> None:
        if not rows.num_rows:
            return
        self._buffer.append(rows)
        self._buffer_rows += rows.num_rows
        self._buffer_bytes += label_map_bytes
        if self._buffer_rows >= ROW_GROUP_ROWS or self._buffer_bytes >= ROW_GROUP_BYTES:
            self._write_row_group()

    def _src(self) -> str:
        """The staged file being written (the next one, when none is open), relative to the output root."""
        return OutputLayout.staged_file(self.group, f"labels-{len(self.files):04d}")

    def _location(self) -> Location:
        return self.settings.output.child(self._src())

    def _write_row_group(self) -> None:
        if not self._buffer:
            return
        try:
            if self._writer is None:
                self._file = contextlib.ExitStack()
                f = self._file.enter_context(self._location().open_write())
                self._writer = pq.ParquetWriter(f, LABELS_SCHEMA, **parquet_options(LABELS_SCHEMA))
            self._writer.write_table(pa.concat_tables(self._buffer).cast(LABELS_SCHEMA), row_group_size=self._buffer_rows)
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the file's URI
            raise storage_error(self._location().uri, e) from None
        self._buffer, self._buffer_rows, self._buffer_bytes = [], 0, 0

    def _finish_file(self) -> None:
        self._write_row_group()
        if self._writer is None:
            return
        src, location = self._src(), self._location()
        file, writer, self._file, self._writer = self._file, self._writer, None, None
        try:
            writer.close()
            file.close()  # the file appears whole
        except Exception as e:  # noqa: BLE001 - as in _write_row_group; what it left is in staging, never committed
            raise storage_error(location.uri, e) from None
        self.files.append({"table": "labels", "src": src, "rows": self._rows,
                           "dst": OutputLayout.table_file("labels", self.settings.run_date,
                                                          f"{self.group}-{len(self.files):04d}", self.settings.model_id)})
        faults.fire("label.stage:labels")
        self._rows = self._bytes = 0

    def close(self) -> list[dict]:
        """Finish the last file; the marker entries of every labels file written."""
        self._finish_file()
        return self.files

    def abort(self) -> None:
        """An error mid-file: the file being written never appears (a staged file left behind is removed by the
        next run's recovery)."""
        if self._writer is None:
            return
        file, writer, self._file, self._writer = self._file, self._writer, None, None
        try:
            writer.close()
        finally:
            error = RuntimeError("labels merge aborted")
            file.__exit__(type(error), error, None)  # open_write's error path: no file appears


def _combine(column: pa.ChunkedArray):
    """One value for a group from its blocks' values: counts add up, lists join, JSON count maps add up."""
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


_MERGE_RETRIES = 3
_MERGE = ray.remote(max_retries=_MERGE_RETRIES)(merge_staged)  # a worker that dies mid-merge: it runs again, new group name
