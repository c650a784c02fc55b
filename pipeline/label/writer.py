"""The driver side of the labeling pipeline: buffer result rows and commit them in file sets."""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from ..storage import Location
from .commit import commit_fileset
from .previews import PreviewSource
from .readers import list_table_files
from .tables import SCHEMAS, TABLES, split_results


@dataclass
class FilesetWriter:
    """Buffers result rows and commits them (pipeline.label.commit) in file sets of about rows_per_file images;
    counts what it wrote and keeps the first `previews_wanted` label maps for previews."""

    output: Location
    run_id: str
    run_date: str
    model_id: str
    class_names: list[str]
    rows_per_file: int
    bytes_per_file: int
    previews_wanted: int = 0
    labeled: int = 0
    errors: int = 0
    filesets: int = 0
    files: dict = field(default_factory=lambda: {t: 0 for t in TABLES})
    actors: set = field(default_factory=set)
    previews: list[PreviewSource] = field(default_factory=list)
    _pending: dict = field(default_factory=lambda: {t: [] for t in TABLES})
    _rows: int = 0
    _bytes: int = 0

    def add(self, block: pa.Table) -> None:
        """Buffer result rows; commit a file set whenever rows_per_file images (or bytes_per_file) are pending."""
        start = 0
        while start < block.num_rows:
            take = max(1, self.rows_per_file - self._rows)
            self._add(block.slice(start, take))
            start += take

    def _add(self, block: pa.Table) -> None:
        self.actors.update(a for a in block["actor"].to_pylist() if a)
        tables = split_results(block, model_id=self.model_id, run_id=self.run_id, class_names=self.class_names)
        labels = tables["labels"]
        if len(self.previews) < self.previews_wanted and labels.num_rows:
            for row in labels.slice(0, self.previews_wanted - len(self.previews)).select(
                    ["image_uri", "label_map", "label_encoding", "height", "width"]).to_pylist():
                self.previews.append(PreviewSource(row["image_uri"], row["label_map"], row["label_encoding"],
                                                   row["height"], row["width"]))
        for name, table in tables.items():
            if table.num_rows:
                self._pending[name].append(table)
        self._rows += block.num_rows
        self._bytes += labels["label_map"].nbytes if labels.num_rows else 0
        if self._rows >= self.rows_per_file or self._bytes >= self.bytes_per_file:
            self.flush()

    def flush(self, final: bool = False) -> None:
        tables = {name: pa.concat_tables(parts) for name, parts in self._pending.items() if parts}
        if final:
            # Readers glob each table's folder: make sure every table has at least one (maybe empty) file.
            for name in TABLES:
                if name not in tables and self.files[name] == 0 and not list_table_files(self.output, name):
                    tables[name] = SCHEMAS[name].empty_table()
        if not tables:
            return
        self.filesets += 1
        written = commit_fileset(self.output, f"{self.run_id}-{self.filesets:05d}", self.run_date, tables)
        for name in written:
            self.files[name] += 1
        self.labeled += written.get("labels", 0)
        self.errors += written.get("errors", 0)
        self._pending = {t: [] for t in TABLES}
        self._rows = self._bytes = 0
