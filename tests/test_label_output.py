"""The labeling output (pipeline.label: tables, codec, commit, readers, queries) without Ray: schema,
encodings, and the commit protocol stopped at every step."""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from pipeline import faults
from pipeline.label.codec import decode_label_map, encode_label_map
from pipeline.label.commit import commit_fileset, final_name, recover
from pipeline.label.queries import LABEL_MAP_SNIPPET
from pipeline.label.readers import list_table_files, read_table
from pipeline.label.tables import INDEX, RESULT_SCHEMA, SCHEMAS, split_results
from pipeline.storage import Location
from tests import storage_util
from tests.label_fixtures import duckdb_connection

RUN_DATE = "2026-03-04"


def _results(names: list[str], fail: tuple[str, ...] = ()) -> pa.Table:
    """RESULT_SCHEMA rows for fake images: 4x5 label maps with two classes; names in `fail` are errors."""
    rows = []
    for n in names:
        label = np.zeros((4, 5), np.uint8)
        label[:, 3:] = 2
        ok = n not in fail
        rows.append({
            "image_uri": f"s3://photos/{n}", "image_version": "v1", "width": 5, "height": 4,
            "label_map": label.tobytes() if ok else None, "label_encoding": "raw",
            "classes_present": [0, 2] if ok else [], "stat_class_id": [0, 2] if ok else [],
            "stat_pixel_count": [12, 8] if ok else [], "stat_pixel_fraction": [0.6, 0.4] if ok else [],
            "stat_mean_confidence": [0.9, 0.8] if ok else [], "stat_x_min": [0, 3] if ok else [],
            "stat_y_min": [0, 0] if ok else [], "stat_x_max": [2, 4] if ok else [], "stat_y_max": [3, 3] if ok else [],
            "at": datetime.now(timezone.utc), "stage": None if ok else "decode", "error": None if ok else "empty file",
            "actor": "a",
        })
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _commit(root: str, fileset: str, names: list[str], fail=()) -> None:
    tables = split_results(_results(names, fail), model_id="m1", run_id=fileset.split("-")[0],
                           class_names=["bg", "a", "b"])
    commit_fileset(Location.of(root), fileset, RUN_DATE, "m1", tables)


def _counts(root: str, table: str) -> dict:
    con = duckdb_connection(root)
    key = "image_uri, class_id" if table == "class_stats" else "image_uri"
    try:
        rows = con.execute(f"SELECT {key}, count(*) FROM read_parquet('{root}/{table}/**/*.parquet', "
                           "hive_partitioning = true) GROUP BY ALL").fetchall()
    except Exception as e:  # noqa: BLE001 - DuckDB: no file matches the glob yet
        assert "No files found" in str(e), e
        return {}
    return {tuple(r[:-1]): r[-1] for r in rows}


STEPS = ["staged", "committed", "published:class_stats", "published:errors", "published:index", "published:labels"]


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("step", STEPS)
def test_crash_at_every_commit_step_then_rerun_is_exactly_once(tmp_path, request, monkeypatch, where, step):
    if where == "s3":
        request.getfixturevalue("bucket")
        root = "s3://test-bucket/out"
    else:
        root = str(tmp_path / "out")
    images = [f"img{i}.jpg" for i in range(6)]
    _commit(root, "run1-00001", images[:2])

    # The process "dies" at this step: InjectedFault is a BaseException, so nothing after it runs.
    monkeypatch.setenv(faults.ENV, f"label.commit:{step}=raise")
    with pytest.raises(faults.InjectedFault):
        _commit(root, "run1-00002", images[2:4], fail=("img3.jpg",))
    monkeypatch.delenv(faults.ENV)

    # What a reader sees right after the crash: complete files only, never staging, never a duplicate.
    labels = _counts(root, "labels")
    assert set(labels.values()) == {1}
    published_labels = step == "published:labels"
    assert (("s3://photos/img2.jpg",) in labels) == published_labels

    # The next run: recover, read what is labeled, label the rest.
    rec = recover(Location.of(root))
    committed = step != "staged"
    assert rec == {"rolled_forward": int(committed), "discarded": int(not committed)}
    index = read_table(Location.of(root), INDEX)  # the skip list: exactly what labels/ holds
    assert sorted(index["image_uri"].to_pylist()) == sorted(u for (u,) in _counts(root, "labels"))
    done = set(index["image_uri"].to_pylist())
    todo = [n for n in images if f"s3://photos/{n}" not in done]
    assert todo == (["img3.jpg", *images[4:]] if committed else images[2:])  # errors are retried
    _commit(root, "run2-00001", todo, fail=("img3.jpg",))

    labels, stats = _counts(root, "labels"), _counts(root, "class_stats")
    good = [n for n in images if n != "img3.jpg"]
    assert labels == {(f"s3://photos/{n}",): 1 for n in good}
    assert stats == {(f"s3://photos/{n}", c): 1 for n in good for c in (0, 2)}
    errors = read_table(Location.of(root), "errors").to_pylist()
    assert [e["image_uri"] for e in errors].count("s3://photos/img3.jpg") == 1 + int(committed)
    fs, path = storage_util.filesystem(root)
    fs.invalidate_cache()
    leftovers = [p for p in fs.find(path) if "/_staging/" in p or "/_commits/" in p]
    assert leftovers == []
    assert recover(Location.of(root)) == {"rolled_forward": 0, "discarded": 0}


def test_files_are_plain_zstd_parquet_any_reader_understands(tmp_path):
    import pyarrow.parquet as pq

    root = str(tmp_path / "out")
    _commit(root, "r-00001", ["a.jpg", "b.jpg"], fail=("b.jpg",))
    for table, schema in SCHEMAS.items():
        (path,) = list_table_files(Location.of(root), table)
        assert path.endswith("/" + final_name(table, RUN_DATE, "r-00001", "m1"))
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.equals(schema, check_metadata=False)
        for field in pf.schema_arrow:
            assert not isinstance(field.type, pa.ExtensionType)
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
    row = read_table(Location.of(root), "labels").to_pylist()[0]
    assert decode_label_map(row["label_map"], "raw", 4, 5)[0].tolist() == [0, 0, 0, 2, 2]


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_label_map_encodings_round_trip(encoding):
    label = np.random.default_rng(0).integers(0, 21, (37, 53), dtype=np.uint8)
    data = encode_label_map(label, encoding)
    np.testing.assert_array_equal(decode_label_map(data, encoding, 37, 53), label)
    if encoding == "png":
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.mode == "P"  # palette PNG: viewable, values = class ids


def test_readme_snippet_turns_a_label_map_into_an_array(tmp_path, monkeypatch):
    root = str(tmp_path / "out")
    _commit(root, "r-00001", ["a.jpg"])
    monkeypatch.chdir(tmp_path)  # the snippet reads 'out/labels/...'
    scope: dict = {}
    exec(LABEL_MAP_SNIPPET, scope)
    assert scope["labels"].shape == (4, 5) and scope["labels"][:, 3:].min() == 2
    assert len(LABEL_MAP_SNIPPET.strip().splitlines()) == 3


def test_docs_show_the_snippet():
    docs = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "queries.md")).read()
    squash = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    assert squash(LABEL_MAP_SNIPPET) in squash(docs), "docs/queries.md lacks pipeline.label.queries.LABEL_MAP_SNIPPET"
