"""Writing the labeling job's results: Ray workers stage them, the driver commits them.

`stage_results` is the pipeline's last stage. It takes one block of result rows at a time (an inference call's
rows: a bounded number of label maps, whatever --rows-per-file says) and writes them to `_staging/` as one
results file, so a label map leaves Ray's object store as soon as its block is staged; it passes on one small row
per block (STAGED_SCHEMA: the staged file and its counts). The driver gathers those rows into groups
(pipeline.label.filesets), a Ray task turns each group's results files into the output tables' files (labels
files of --rows-per-file rows), and the driver's `Committer` writes the group's marker and publishes the files
(pipeline.label.commit): no label map passes through the driver, and none waits in memory for its group.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from .. import faults
from ..storage import Location
from .commit import commit_fileset, commit_staged, parquet_bytes
from .layout import OutputLayout
from .readers import list_table_files
from .tables import RESULT_SCHEMA, SCHEMAS, TABLES

STAGED_SCHEMA = pa.schema([("marker", pa.string()), ("labeled", pa.int64()), ("errors", pa.int64()),
                           ("actors", pa.list_(pa.string())),
                           ("error_stages", pa.string())])  # JSON {stage: errors}: pipeline.telemetry's errors by stage
RESULTS = "results"  # a staged block of result rows (tables.RESULT_SCHEMA), split into the tables by its group


@dataclass(frozen=True)
class OutputSettings:
    """What the writers need to know (sent to every write and merge task)."""

    output: Location
    run_id: str
    run_date: str
    model_id: str
    class_names: tuple[str, ...]
    bytes_per_file: int  # a labels file ends before its label map cells exceed this (at least one row)
    rows_per_file: int = 1000  # rows of a labels file at most


def new_fileset_name(run_id: str) -> str:
    """Unique per attempt: a retry with the same run id never reuses (or overwrites) a file set."""
    return f"{run_id}-{uuid.uuid4().hex[:12]}"


def stage_results(block: pa.Table, *, settings: OutputSettings) -> pa.Table:
    """Ray task: one block of result rows -> one staged results file; one STAGED_SCHEMA row (none for no rows)."""
    if not block.num_rows:
        return STAGED_SCHEMA.empty_table()
    rows = block.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
    fileset = new_fileset_name(settings.run_id)
    src = OutputLayout.staged_file(fileset, RESULTS)
    settings.output.child(src).write_bytes(parquet_bytes(rows))
    faults.fire(f"label.stage:{RESULTS}")
    failed = rows.filter(pc.is_valid(rows["error"]))
    stages = pc.fill_null(failed["stage"], "unknown").value_counts().to_pylist()
    marker = {"fileset": fileset, "run_date": settings.run_date,
              "files": [{"table": RESULTS, "src": src, "rows": rows.num_rows}]}
    return pa.Table.from_pylist([{
        "marker": json.dumps(marker), "labeled": rows.num_rows - failed.num_rows, "errors": failed.num_rows,
        "actors": sorted({a for a in rows["actor"].to_pylist() if a}),
        "error_stages": json.dumps({s["values"]: s["counts"] for s in stages})}], schema=STAGED_SCHEMA)


@dataclass
class Committer:
    """The driver's side: commit each staged file set, count what was written."""

    output: Location
    run_id: str
    run_date: str
    model_id: str
    labeled: int = 0
    errors: int = 0
    driver_bytes: int = 0  # what the pipeline handed the driver: metadata only, never label maps
    files: dict = field(default_factory=lambda: {t: 0 for t in TABLES})
    actors: set = field(default_factory=set)
    labels_files: list = field(default_factory=list)  # relative paths, in commit order (previews read the first)
    commits: int = 0  # file sets committed (pipeline.telemetry)
    error_stages: dict = field(default_factory=dict)  # committed errors/ rows by stage (pipeline.telemetry)
    before_commit: Callable[[], None] = lambda: None  # raises when this run may no longer write (its lease)

    def commit(self, staged: pa.Table) -> None:
        self.driver_bytes += staged.nbytes
        for row in staged.to_pylist():
            marker = json.loads(row["marker"])
            self.before_commit()
            written = commit_staged(self.output, marker)
            for entry in marker["files"]:  # a group (pipeline.label.filesets) has a labels file per set
                if entry["table"] in self.files:
                    self.files[entry["table"]] += 1
            self.labeled += written.get("labels", 0)
            self.errors += written.get("errors", 0)
            self.actors.update(row["actors"])
            self.labels_files += [f["dst"] for f in marker["files"] if f["table"] == "labels" and f["rows"]]
            self.commits += 1
            for stage, n in json.loads(row.get("error_stages") or "{}").items():
                self.error_stages[stage] = self.error_stages.get(stage, 0) + n

    def finish(self) -> None:
        """Readers glob each table's folder: make sure every table has at least one (maybe empty) file."""
        empty = {name: SCHEMAS[name].empty_table() for name in TABLES
                 if self.files[name] == 0 and not list_table_files(self.output, name)}
        if empty:
            commit_fileset(self.output, new_fileset_name(self.run_id), self.run_date, self.model_id, empty)
            for name in empty:
                self.files[name] += 1
