"""Which labels rows go to review, and their label maps.

Choosing reads the labels files' small columns one file at a time (never `label_map`), so memory holds one file's
small columns plus the rows chosen so far; then the chosen rows' label maps are read file by file, only those rows
(a row filter on the file), and handed on one at a time. At 10,000 chosen out of millions, the export reads 10,000
label maps and no other (bench/review_bench.py).
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from ..errors import JobError, one_line
from ..label.codec import decode_label_map
from ..label.readers import list_table_files
from ..label.tables import SCHEMAS, UNCERTAINTY
from ..storage import Location

# Every labels column but the label map, plus the partition's run_date: what --where may use.
SMALL_COLUMNS = [f.name for f in SCHEMAS["labels"] if f.name != "label_map"]
_RUN_DATE = re.compile(r"/run_date=(\d{4}-\d{2}-\d{2})/")


class SelectionError(JobError):
    """A selection that cannot be made (bad SQL, no such night): one line naming it."""


@dataclass(frozen=True)
class Selection:
    """Which rows: those of `run_date` (a night), matching `where` (DuckDB SQL over the labels columns but
    label_map, run_date included) and naming one of `images`, each only where given; an image labeled more than
    once is taken once, from its newest row; then, with `least_confident`, the K of them with the lowest
    mean_confidence (rows without one are not candidates)."""
    run_date: str | None = None
    least_confident: int | None = None
    where: str | None = None
    images: tuple[str, ...] | None = None

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if v is not None}


@dataclass
class Chosen:
    """One chosen labels row with its label map."""
    image_uri: str
    run_id: str
    model_id: str
    run_date: str
    width: int
    height: int
    mean_confidence: float | None
    label: np.ndarray  # uint8 (height, width) class ids


def _run_date_of(path: str) -> str:
    found = _RUN_DATE.search(path)
    return found.group(1) if found else ""


def _small(output: Location, path: str) -> pa.Table:
    ds = pads.dataset([path], format="parquet", filesystem=output.fs)
    table = ds.to_table(columns=[c for c in SMALL_COLUMNS if c in ds.schema.names])
    for name in UNCERTAINTY:  # files older than the columns
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.float64()))
    n = table.num_rows
    return (table.append_column("run_date", pa.array([_run_date_of(path)] * n, pa.string()))
                 .append_column("file", pa.array([path] * n, pa.string())))


def choose(output: Location, selection: Selection) -> list[dict]:
    """The chosen rows' small columns (image_uri, run_id, file, ...): least confident first with K, otherwise by
    image URI. Only an image's newest row in scope counts: a row that matches but has a newer one is left out."""
    files = list_table_files(output, "labels")
    if selection.run_date:
        files = [p for p in files if _run_date_of(p) == selection.run_date]
        if not files:
            raise SelectionError(f"no labels for run date {selection.run_date} under {output.uri}")
    if not files:
        raise SelectionError(f"no labels under {output.uri}: label a night first (jobs/label.py)")
    k = selection.least_confident
    per_file = k
    while True:
        candidates, pruned = _candidates(output, files, selection, per_file)
        newest = _newest_rows(output, files, candidates)
        if k is None:
            return [newest[uri] for uri in sorted(newest)]
        chosen = sorted(newest.values(), key=lambda r: (r["mean_confidence"], r["image_uri"]))
        if len(chosen) >= k or not pruned:
            return chosen[:k]
        per_file *= 4  # stale rows took places among each file's K least confident: look deeper


def _candidates(output: Location, files: list[str], selection: Selection, per_file: int | None) -> tuple[list[dict], bool]:
    """The rows that match, each file's `per_file` least confident of them with K; and whether a file had more."""
    picked: list[pa.Table] = []
    pruned = False
    wanted = pa.array(sorted(set(selection.images)), pa.string()) if selection.images else None
    for path in files:
        small = _small(output, path)
        if wanted is not None:
            small = small.filter(pc.is_in(small["image_uri"], value_set=wanted))
        if selection.where is not None and small.num_rows:
            small = _where(small, selection.where)
        if per_file is not None:  # each file's K least confident: memory stays K rows per file
            small = small.filter(pc.is_valid(small["mean_confidence"]))
            pruned = pruned or small.num_rows > per_file
            small = small.take(pc.select_k_unstable(small, min(per_file, small.num_rows), [("mean_confidence", "ascending")]))
        if small.num_rows:
            picked.append(small)
    rows = pa.concat_tables(picked, promote_options="permissive").to_pylist() if picked else []
    return rows, pruned


def _newest_rows(output: Location, files: list[str], candidates: list[dict]) -> dict[str, dict]:
    """image URI -> its candidate row, for the candidates that are their image's newest row in `files` (newest
    night, then newest labeled_at): one more pass over the files' image_uri and labeled_at, for these images only."""
    if not candidates:
        return {}
    uris = pa.array(sorted({r["image_uri"] for r in candidates}), pa.string())
    latest: dict[str, tuple] = {}
    for path in files:
        t = pads.dataset([path], format="parquet", filesystem=output.fs).to_table(
            columns=["image_uri", "labeled_at"], filter=pc.field("image_uri").isin(uris))
        night = _run_date_of(path)
        for uri, at in zip(t["image_uri"].to_pylist(), t["labeled_at"].to_pylist(), strict=True):
            key = _age(night, at)
            if uri not in latest or key > latest[uri]:
                latest[uri] = key
    return {r["image_uri"]: r for r in candidates if _age(r["run_date"], r["labeled_at"]) == latest[r["image_uri"]]}


def _age(run_date: str, labeled_at) -> tuple[str, float]:
    """How new a row is: its night, then when it was labeled (a file from before labeled_at counts as oldest)."""
    return run_date, labeled_at.timestamp() if labeled_at is not None else float("-inf")


def _where(small: pa.Table, where: str) -> pa.Table:
    """The rows of one file's small columns that match the condition. It is one SQL condition and nothing else:
    one statement, on a connection that can reach no file or network and whose settings are locked."""
    import duckdb

    query = f"SELECT * FROM labels WHERE ({where})"
    hint = f"it may use {', '.join(SMALL_COLUMNS)}, run_date"
    try:
        if len(duckdb.extract_statements(query)) != 1:
            raise SelectionError(f"--where {where!r} is more than one condition (a ';'): give one SQL condition; {hint}")
    except duckdb.Error as e:
        raise SelectionError(f"--where {where!r} is not an SQL condition ({one_line(e)}); {hint}") from None
    con = duckdb.connect()
    try:
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        con.register("labels", small)
        found = con.sql(query).to_arrow_table()
    except duckdb.Error as e:
        raise SelectionError(f"--where {where!r} does not run over labels ({one_line(e)}); {hint}") from None
    finally:
        con.close()
    return found


def read_chosen(output: Location, rows: list[dict]) -> Iterator[Chosen]:
    """The chosen rows with their label maps, file by file (only those rows of each file), in `rows`' order
    within each file."""
    by_file: dict[str, list[dict]] = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row)
    for path, file_rows in by_file.items():
        keys = pa.array([f"{r['image_uri']}\0{r['run_id']}" for r in file_rows], pa.string())
        wanted = pc.field("image_uri").isin(pa.array(sorted({r["image_uri"] for r in file_rows}), pa.string()))
        cells = pads.dataset([path], format="parquet", filesystem=output.fs).to_table(
            columns=["image_uri", "run_id", "label_map", "label_encoding"], filter=wanted)
        joined = pc.binary_join_element_wise(cells["image_uri"], cells["run_id"], "\0")
        index = {key: i for i, key in enumerate(joined.to_pylist())}
        for row, key in zip(file_rows, keys.to_pylist(), strict=True):
            i = index.get(key)
            if i is None:
                continue  # gone since it was chosen (a concurrent --force rerun replaced the file)
            label = decode_label_map(cells["label_map"][i].as_py(), cells["label_encoding"][i].as_py(),
                                     row["height"], row["width"])
            yield Chosen(row["image_uri"], row["run_id"], row["model_id"], row["run_date"], row["width"], row["height"],
                         row["mean_confidence"], label)


def relative_names(uris: list[str]) -> dict[str, str]:
    """Each image's name in a package: its path below the images' common folder, without the extension (CVAT's
    and VOC's naming), so two images of one name in different folders stay apart."""
    if not uris:
        return {}
    folders = [posixpath.dirname(u.split("://", 1)[-1]) for u in uris]
    schemes = {u.split("://", 1)[0] if "://" in u else "" for u in uris}
    common = posixpath.commonpath(folders) if len(schemes) == 1 else ""
    names = {}
    for uri in uris:
        path = uri.split("://", 1)[-1]
        rel = posixpath.relpath(path, common) if common else path.lstrip("/")
        names[uri] = posixpath.splitext(rel)[0]
    if len(set(names.values())) < len(names):  # a.jpg beside a.png: keep the extensions
        names = {uri: (posixpath.relpath(uri.split("://", 1)[-1], common) if common else uri) for uri in uris}
    return names
