"""Writing the labeling job's results: Ray workers stage file sets, the driver commits them.

`stage_results` is the pipeline's last stage: it turns about --rows-per-file result rows into one file set in
`_staging/` (pipeline.label.commit, step 1) and passes on one small row per file set: its commit marker and its
counts. The driver's `Committer` writes the markers and publishes the files (server-side moves), so no label map
passes through the driver.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from ..storage import Location
from .commit import commit_fileset, commit_staged, stage_fileset
from .readers import list_table_files
from .tables import SCHEMAS, TABLES, split_results

STAGED_SCHEMA = pa.schema([("marker", pa.string()), ("labeled", pa.int64()), ("errors", pa.int64()),
                           ("actors", pa.list_(pa.string())),
                           ("error_stages", pa.string())])  # JSON {stage: errors}: pipeline.telemetry's errors by stage


@dataclass(frozen=True)
class OutputSettings:
    """What a writer needs to know to stage file sets (sent to every write task)."""

    output: Location
    run_id: str
    run_date: str
    model_id: str
    class_names: tuple[str, ...]
    bytes_per_file: int


def new_fileset_name(run_id: str) -> str:
    """Unique per attempt: a retry with the same run id never reuses (or overwrites) a file set."""
    return f"{run_id}-{uuid.uuid4().hex[:12]}"


def stage_results(block: pa.Table, *, settings: OutputSettings) -> pa.Table:
    """Ray task: result rows -> staged file set(s) (a new one whenever bytes_per_file of label maps is reached);
    one STAGED_SCHEMA row per file set."""
    out = []
    for part in _split_by_bytes(block, settings.bytes_per_file):
        tables = split_results(part, model_id=settings.model_id, run_id=settings.run_id,
                               class_names=list(settings.class_names))
        # Empty tables get no file (Committer.finish makes sure each table has one file for readers' globs).
        tables = {name: table for name, table in tables.items() if table.num_rows}
        marker = stage_fileset(settings.output, new_fileset_name(settings.run_id), settings.run_date,
                               settings.model_id, tables)
        if marker is None:
            continue
        actors = sorted({a for a in part["actor"].to_pylist() if a})
        stages = tables["errors"]["stage"].value_counts().to_pylist() if "errors" in tables else []
        out.append({"marker": json.dumps(marker), "labeled": len(tables.get("labels", [])),
                    "errors": len(tables.get("errors", [])), "actors": actors,
                    "error_stages": json.dumps({s["values"]: s["counts"] for s in stages})})
    return pa.Table.from_pylist(out, schema=STAGED_SCHEMA)


def _split_by_bytes(block: pa.Table, limit: int) -> list[pa.Table]:
    sizes = pc.binary_length(block["label_map"]).fill_null(0).to_pylist()
    parts, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if total and total + n > limit:
            parts.append(block.slice(start, i - start))
            start, total = i, 0
        total += n
    parts.append(block.slice(start))
    return [p for p in parts if p.num_rows]


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
