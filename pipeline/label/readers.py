"""Reading the labeling job's published tables back (tests, tools, the index); staging is never read."""
from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.dataset as pads

from ..storage import Location
from .layout import OutputLayout
from .tables import SCHEMAS


def list_table_files(output: Location, table: str, partition: str | None = None) -> list[str]:
    """Paths (inside the output's filesystem) of every published Parquet file of a table (or of one of its
    partition folders, e.g. `model_id=...`), sorted."""
    output.fs.invalidate_cache()
    folder = OutputLayout(output).table(table, partition)
    try:
        found = output.fs.find(folder.path)
    except FileNotFoundError:
        return []
    return sorted(p for p in found if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))


def read_table(output: Location, table: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """One output table (all run dates), optionally only some columns and rows; empty if none written."""
    files = list_table_files(output, table)
    schema = SCHEMAS[table]
    if not files:
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    ds = pads.dataset(files, format="parquet", filesystem=output.fs, schema=schema)
    return ds.to_table(columns=columns, filter=filter)
