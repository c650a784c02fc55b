"""One schema per table: outputs written by the first release (class_stats without `labeled_at`) are upgraded once,
under the lease, crash-safely; a column change in tables.py without an upgrade step fails here. That a nightly run
upgrades such an output, after which every reader reads it with its default options, is checked on
tests/test_label_job.py's four nights."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import faults, storage
from pipeline.label.commit import recover
from pipeline.label.readers import list_table_files
from pipeline.label.tables import SCHEMAS, split_results
from pipeline.label.upgrade import FIRST_RELEASE, MARKER, SCHEMA_VERSION, STEPS, history, upgrade_tables
from pipeline.storage import Location
from tests import storage_util
from tests.first_release import at, first_release_output, key_rows, label_map, results
from tests.label_fixtures import CLASS_NAMES, duckdb_connection, good_image, run_label_cli, write_files

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
    written = split_results(results([("u", "v", label_map(1))], at=at(0)), model_id="m", run_id="r",
                            class_names=CLASS_NAMES)
    for table, rows in written.items():
        assert rows.schema.equals(history(table)[-1][1], check_metadata=False), table


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
    # labels/ files come after class_stats/ in the one failed batch: all four still need their step.
    assert done == {"class_stats": 4 - len(upgraded), "labels": 4}
    assert _row_counts(output) == before
    reread = pads.dataset(list_table_files(out, "class_stats"), filesystem=out.fs, format="parquet").to_table()
    assert reread.schema.equals(SCHEMAS["class_stats"], check_metadata=False)
    got = key_rows(reread.append_column("run_date", pa.array([""] * reread.num_rows)))
    assert got == key_rows(old.set_column(old.schema.get_field_index("run_date"), "run_date",
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
