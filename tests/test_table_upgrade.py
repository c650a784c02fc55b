"""One schema per table: outputs written by the first release (class_stats without `labeled_at`) are upgraded once,
under the lease, crash-safely, and then every reader reads them with its default options; a column change in
tables.py without an upgrade step fails here."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import faults, storage
from pipeline.label.commit import parquet_bytes, recover
from pipeline.label.job import label_images
from pipeline.label.readers import list_table_files
from pipeline.label.tables import RESULT_SCHEMA, SCHEMAS, split_results
from pipeline.label.upgrade import FIRST_RELEASE, MARKER, SCHEMA_VERSION, STEPS, history, upgrade_tables
from pipeline.storage import Location
from tests import storage_util
from tests.label_fixtures import CLASS_NAMES, duckdb_connection, good_image, label_config, run_label_cli, write_files

OLD_RUN, OLD_MODEL = "20260101T010000Z-0a0a0a", "00000000deadbeef"


# ------------------------------------------------------------------------------------- the rule, no I/O


def test_schema_history_ends_at_the_schemas_tables_py_writes():
    """FIRST_RELEASE replayed through STEPS is exactly tables.SCHEMAS (names, types, nullability, order), and is
    what split_results writes: a column change in tables.py without an upgrade step fails here."""
    assert set(FIRST_RELEASE) == set(SCHEMAS)
    assert [s.version for s in STEPS] == list(range(2, SCHEMA_VERSION + 1))
    for table, schema in SCHEMAS.items():
        versions = [v for v, _ in history(table)]
        assert versions == sorted(set(versions)), table
        latest = history(table)[-1][1]
        assert latest.equals(schema, check_metadata=False), (
            f"{table}: tables.py says {schema}, the upgrade history ends at {latest}: a change of the table's columns "
            "needs a Step in pipeline/label/upgrade.py that rewrites older files")
    written = split_results(_results([("u", "v", _label_map(1))], at=_at(0)), model_id="m", run_id="r",
                            class_names=CLASS_NAMES)
    for table, rows in written.items():
        assert rows.schema.equals(history(table)[-1][1], check_metadata=False), table


# ----------------------------------------------------------------------------- first-release outputs


def _at(minutes: int) -> datetime:
    return datetime(2026, 1, 1, 1, 0, tzinfo=timezone.utc) + timedelta(minutes=minutes, microseconds=7)


def _label_map(seed: int, h: int = 6, w: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 2 + seed % 3, 5], np.uint8), size=(h, w), p=[0.5, 0.3, 0.2])


def _results(images: list[tuple[str, str, np.ndarray | None]], at: datetime) -> pa.Table:
    """Result rows (RESULT_SCHEMA) as the pipeline's postprocess makes them; a None map is a failed image."""
    rows = []
    for i, (uri, version, label) in enumerate(images):
        row = {"image_uri": uri, "image_version": version, "at": at + timedelta(seconds=i)}
        if label is None:
            row.update(stage="decode", error="not a recognised image format (cannot identify image file)")
        else:
            ids, counts = np.unique(label, return_counts=True)
            boxes = [(np.nonzero(label == c)[1].min(), np.nonzero(label == c)[0].min(), np.nonzero(label == c)[1].max(),
                      np.nonzero(label == c)[0].max()) for c in ids]
            row.update(width=label.shape[1], height=label.shape[0], label_map=label.tobytes(), label_encoding="raw",
                       classes_present=ids.tolist(), stat_class_id=ids.tolist(), stat_pixel_count=counts.tolist(),
                       stat_pixel_fraction=(counts / label.size).tolist(), stat_mean_confidence=[0.75] * len(ids),
                       stat_x_min=[int(b[0]) for b in boxes], stat_y_min=[int(b[1]) for b in boxes],
                       stat_x_max=[int(b[2]) for b in boxes], stat_y_max=[int(b[3]) for b in boxes])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def write_first_release_fileset(output: str, run_date: str, fileset: str, images, at: datetime) -> dict[str, pa.Table]:
    """One file set exactly as the first release (commit 2fc07f7) published it: labels, class_stats and errors in
    FIRST_RELEASE's schemas (class_stats without labeled_at), zstd, under labels|class_stats|errors/run_date=D/."""
    tables = split_results(_results(images, at), model_id=OLD_MODEL, run_id=OLD_RUN, class_names=CLASS_NAMES)
    written = {}
    for name in ("labels", "class_stats", "errors"):
        rows = tables[name].select(FIRST_RELEASE[name].names).cast(FIRST_RELEASE[name])
        storage_util.write_bytes(storage.join(output, name, f"run_date={run_date}", f"part-{fileset}.parquet"),
                            parquet_bytes(rows))
        written[name] = tables[name]  # with the labeled_at the upgrade must give class_stats
    return written


def first_release_output(output: str, uris: list[str]) -> pa.Table:
    """Two nights of the first release, two file sets each; returns the class_stats rows as they must read after
    the upgrade (labeled_at = the labels row's)."""
    expected = []
    for night, (d, sets) in enumerate((("2026-01-01", 2), ("2026-01-02", 2))):
        for s in range(sets):
            k = 2 * night + s
            images = [(uris[(k + j) % len(uris)], f"v{k}", _label_map(10 * k + j)) for j in range(2)]
            images.append((f"s3://elsewhere/broken{k}.jpg", f"v{k}", None))
            written = write_first_release_fileset(output, d, f"{OLD_RUN}-{k:012x}", images, _at(60 * 24 * night + k))
            expected.append(written["class_stats"].append_column("run_date", pa.array([d] * written["class_stats"].num_rows)))
    return pa.concat_tables(expected)


def _key_rows(table: pa.Table) -> list[tuple]:
    cols = ["image_uri", "image_version", "class_id", "pixel_count", "run_id", "labeled_at", "run_date"]
    rows = table.select(cols).to_pylist()
    return sorted(tuple(str(r[c]) if c == "run_date" else r[c] for c in cols) for r in rows)


_config = partial(label_config, batch_size=2, rows_per_file=3, rows_per_read_task=3)


def test_default_readers_read_an_output_mixing_first_release_and_new_files(ray_session, tiny_checkpoint, tmp_path):
    """A user's nightly run on an output the first release wrote: the run upgrades its class_stats files once; then
    polars, pyarrow.dataset, pandas and DuckDB, each with its default options, read old and new rows alike."""
    ck, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {"a.png": good_image(1, 20, 24), "b.png": good_image(2, 22, 21), "bad.png": b"broken"})
    old = first_release_output(output, [storage.join(images, "a.png"), "s3://elsewhere/x.png", "s3://elsewhere/y.png"])

    summary = label_images(_config(images, ck, output, run_date="2026-02-01"))
    assert (summary["labelled"], summary["errors"]) == (2, 1)
    marker = json.loads(storage_util.read_text(storage.join(output, MARKER)))
    assert marker["schema_version"] == SCHEMA_VERSION and marker["upgraded_files"] == {"class_stats": 4}
    assert marker["upgraded_by_run"] == summary["run_id"]

    out = Location.of(output)
    files = list_table_files(out, "class_stats")
    assert len(files) > 4 and all(pq.read_schema(p).equals(SCHEMAS["class_stats"], check_metadata=False) for p in files)
    new = [pq.read_table(p).append_column("run_date", pa.array(["2026-02-01"] * pq.read_metadata(p).num_rows))
           for p in files if "2026-02-01" in p]
    expected = _key_rows(pa.concat_tables([old, *new]))
    assert len(expected) == old.num_rows + sum(t.num_rows for t in new) and all(r[5] is not None for r in expected)

    # The same rows, labeled_at included, from each reader with its default options.
    import duckdb
    import pandas as pd
    import polars as pl

    glob = f"{output}/class_stats/**/*.parquet"
    frame = pl.scan_parquet(glob, hive_partitioning=True).collect()
    assert frame.schema["run_date"] == pl.Date and frame.schema["labeled_at"] == pl.Datetime("us", "UTC")
    assert _key_rows(frame.to_arrow()) == expected
    dataset = pads.dataset(f"{output}/class_stats", format="parquet", partitioning="hive")
    assert _key_rows(dataset.to_table()) == expected
    assert _key_rows(pa.Table.from_pandas(pd.read_parquet(f"{output}/class_stats"), preserve_index=False)) == expected
    con = duckdb.connect()
    assert _key_rows(con.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true)").arrow().read_all()) == expected
    # The upgraded rows kept every other value: the old labels' rows and the old errors are read whole, too.
    labels = con.sql(f"SELECT run_id, count(*) FROM read_parquet('{output}/labels/**/*.parquet') GROUP BY ALL").fetchall()
    assert dict(labels) == {OLD_RUN: 8, summary["run_id"]: 2}


# ----------------------------------------------------------------------------------- crash safety


def _row_counts(output: str) -> dict[str, int]:
    """class_stats rows per image as a glob reader sees them now (union_by_name: old and new files mixed)."""
    return dict(duckdb_connection(output).sql(f"SELECT image_uri || ' ' || image_version || ' ' || class_id, count(*) FROM "
                           f"read_parquet('{output}/class_stats/**/*.parquet', union_by_name = true) GROUP BY ALL").fetchall())


@pytest.mark.parametrize("where,point", [("local", "label.upgrade:replaced:class_stats"),
                                         ("local", "label.upgrade:staged:class_stats"),
                                         ("s3", "label.upgrade:replaced:class_stats")])
def test_an_upgrade_stopped_midway_is_finished_by_the_next_run(ray_session, tmp_path, request, monkeypatch, where, point):
    """A worker dies in the middle of the upgrade (after replacing a file, or after writing the new file and before
    replacing): every row stays visible exactly once meanwhile, no marker is written, and the next run's recovery
    and upgrade finish it with the same rows."""
    if where == "s3":
        request.getfixturevalue("bucket")
        output = "s3://test-bucket/out"
    else:
        output = str(tmp_path / "out")
    old = first_release_output(output, ["s3://elsewhere/a.png", "s3://elsewhere/b.png", "s3://elsewhere/c.png"])
    out = Location.of(output)
    before = _row_counts(output)
    assert sum(before.values()) == old.num_rows and set(before.values()) == {1}

    monkeypatch.setenv(faults.ENV, f"{point}=raise")
    with pytest.raises(BaseException, match="InjectedFault|label.upgrade"):
        upgrade_tables(out)
    monkeypatch.delenv(faults.ENV)
    assert not out.child(MARKER).exists()
    assert _row_counts(output) == before  # every row once, old files and upgraded ones side by side
    upgraded = [p for p in list_table_files(out, "class_stats") if "labeled_at" in pq.read_schema(out.fs.open(p)).names]
    assert (len(upgraded) == 0) if "staged" in point else (1 <= len(upgraded) <= 4)

    recover(out)  # what the next run does first: drops what a killed local rewrite left in _staging/
    out.fs.invalidate_cache()
    assert not [p for p in out.fs.find(out.child("_staging").path) if not p.endswith("/")]
    done = upgrade_tables(out, "next-run")
    assert done == {"class_stats": 4 - len(upgraded)}
    assert _row_counts(output) == before
    reread = pads.dataset(list_table_files(out, "class_stats"), filesystem=out.fs, format="parquet").to_table()
    assert reread.schema.equals(SCHEMAS["class_stats"], check_metadata=False)
    got = _key_rows(reread.append_column("run_date", pa.array([""] * reread.num_rows)))
    assert got == _key_rows(old.set_column(old.schema.get_field_index("run_date"), "run_date",
                                           pa.array([""] * old.num_rows)))
    assert upgrade_tables(out) == {}  # once: the marker says the output is current


def test_an_output_of_a_newer_release_is_refused_in_one_line(ray_session, tiny_checkpoint, tmp_path, capsys):
    ck, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {"a.png": good_image(1, 16, 16)})
    storage_util.write_text(storage.join(output, MARKER), json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    code, out, err = run_label_cli(["--images", images, "--checkpoint", ck, "--output", output, "--max-side", "32",
                                    "--actors", "1", "--threads-per-actor", "1", "--cpus-per-actor", "1"], capsys)
    assert code == 2 and not os.path.exists(os.path.join(output, "labels"))
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: output ") and f"schema version {SCHEMA_VERSION + 1}" in last, err
