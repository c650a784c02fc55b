"""The labeling job end to end on the shared local Ray: output rows and schema, exactness, bad input, DuckDB queries,
previews, four nightly runs on one output (incremental runs, --force, a first-release output upgraded, every query
and reader over it), fail-fast errors, a killed inference worker, the CLI's log."""
from __future__ import annotations

import json
import os
import re
from dataclasses import astuple
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from models import load_checkpoint
from pipeline import faults, storage
from pipeline.decode import decode_image
from pipeline.label.inference import predict_image
from pipeline.label.job import label_images
from pipeline.label.queries import EXAMPLE_QUERIES, example_query
from pipeline.label.readers import list_table_files
from pipeline.label.tables import INDEX, SCHEMAS
from pipeline.label.upgrade import MARKER, SCHEMA_VERSION
from pipeline.storage import Location
from tests import storage_util
from tests.first_release import FIRST_RELEASE_NIGHTS, OLD_RUN, first_release_output, key_rows
from tests.label_fixtures import (
    BATCH,
    CLASS_NAMES,
    MAX_SIDE,
    decode_row,
    duckdb_connection,
    good_image,
    label_config,
    mixed_images,
    png_ok,
    run_label_cli,
    tables,
    write_files,
)


def _files_under(root: str, sub: str) -> list[str]:
    fs, path = storage_util.filesystem(storage.join(root, sub))
    fs.invalidate_cache()
    try:
        return sorted(fs.find(path))
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("where,encoding", [("local", "raw"), ("s3", "png")])
def test_mixed_bucket_rows_schema_and_exact_labels(ray_session, tiny_checkpoint, tmp_path, request, where, encoding):
    ck_path, model_id = tiny_checkpoint
    if where == "s3":
        request.getfixturevalue("bucket")
        images, output = "s3://test-bucket/photos", "s3://test-bucket/labels-out"
    else:
        images, output = str(tmp_path / "photos"), str(tmp_path / "labels-out")
    files, bad, sizes = mixed_images()
    write_files(images, files)

    summary = label_images(label_config(images, ck_path, output, label_encoding=encoding, previews=2,
                                   run_date="2026-01-02"))
    assert (summary["listed"], summary["skipped"], summary["labelled"], summary["errors"]) == (15, 0, 10, 5)
    assert summary["model_id"] == model_id and summary["images_per_second"] > 0

    t = tables(output)
    labels, stats, errors = t["labels"].to_pylist(), t["class_stats"].to_pylist(), t["errors"].to_pylist()
    name_of = {storage.join(images, n): n for n in files}

    # errors/: every bad file once, with its stage and reason; nothing else.
    assert sorted(name_of[e["image_uri"]] for e in errors) == sorted(bad)
    for e in errors:
        assert e["stage"] == "decode" and bad[name_of[e["image_uri"]]] in e["error"], e
        assert e["run_id"] == summary["run_id"] and e["model_id"] == model_id and e["image_version"]

    # labels/: one row per good image, at its original (EXIF-oriented) size.
    assert sorted(name_of[r["image_uri"]] for r in labels) == sorted(sizes)
    ck = load_checkpoint(ck_path)
    stats_of: dict[str, list[dict]] = {}
    for s in stats:
        stats_of.setdefault(s["image_uri"], []).append(s)
    for r in labels:
        name = name_of[r["image_uri"]]
        assert (r["height"], r["width"]) == sizes[name], name
        assert r["label_encoding"] == encoding and r["model_id"] == model_id and r["run_id"] == summary["run_id"]
        assert r["labeled_at"].tzinfo is not None
        label = decode_row(r)
        assert label.shape == sizes[name] and label.dtype == np.uint8
        ids, counts = np.unique(label, return_counts=True)
        assert r["classes_present"] == ids.tolist()
        # Exactly what the library's single-image function gives, although the job batched the image with
        # neighbours of other sizes (same settings: max side, canvas multiple, batch slots).
        expected = predict_image(ck, None, decode_image(files[name]), max_side=MAX_SIDE, batch_size=BATCH)
        np.testing.assert_array_equal(label, expected.label, err_msg=name)
        # The image's uncertainty figures, as predict_image returns them.
        got = (r["mean_confidence"], r["mean_margin"], r["low_confidence_fraction"])
        assert got == pytest.approx(astuple(expected.uncertainty), rel=1e-5), name  # as class_stats below
        assert 0 <= r["mean_margin"] <= r["mean_confidence"] <= 1 and 0 <= r["low_confidence_fraction"] <= 1
        # class_stats/: one row per class present; pixel counts add up to width x height.
        rows = sorted(stats_of[r["image_uri"]], key=lambda s: s["class_id"])
        assert [s["class_id"] for s in rows] == ids.tolist()
        assert sum(s["pixel_count"] for s in rows) == r["width"] * r["height"]
        for s, c in zip(rows, counts, strict=True):
            assert s["pixel_count"] == c and s["class_name"] == CLASS_NAMES[s["class_id"]]
            assert s["pixel_fraction"] == pytest.approx(c / label.size)
            assert 1 / len(CLASS_NAMES) <= s["mean_confidence"] <= 1.0
            ys, xs = np.nonzero(label == s["class_id"])
            assert (s["bbox_x_min"], s["bbox_y_min"], s["bbox_x_max"], s["bbox_y_max"]) == \
                (xs.min(), ys.min(), xs.max(), ys.max())
        np.testing.assert_allclose([s["mean_confidence"] for s in rows], expected.mean_confidence, rtol=1e-5)

    # Files: plain Arrow types only, zstd, hive partition, a few files (not one per image).
    for name, schema in SCHEMAS.items():
        paths = [p for p in _files_under(output, name) if p.endswith(".parquet")]
        partition = f"/model_id={model_id}/" if name == INDEX else "/run_date=2026-01-02/"
        assert paths and all(partition in p for p in paths), paths
        assert len(paths) <= 4, paths  # 15 images in file sets of 4 rows
        fs, _ = storage_util.filesystem(output)
        with fs.open(paths[0], "rb") as f:
            pf = pq.ParquetFile(f)
            assert pf.schema_arrow.equals(schema, check_metadata=False), name
            assert b"ARROW:extension:name" not in repr(pf.schema_arrow).encode()
            assert all(f.metadata is None or not any(b"extension" in k for k in f.metadata) for f in pf.schema_arrow)
            md = pf.metadata
            if md.num_rows:
                assert {md.row_group(0).column(i).compression for i in range(md.num_columns)} == {"ZSTD"}
    assert not _files_under(output, "_staging") and not _files_under(output, "_commits")

    # runs/<run_id>.json and previews/.
    record = json.loads(storage_util.read_text(storage.join(output, "runs", f"{summary['run_id']}.json")))
    assert record["status"] == "succeeded" and record["model_id"] == model_id
    assert record["counts"] == {"listed": 15, "already_labelled": 0, "to_label": 15, "labelled": 10, "errors": 5}
    assert record["arguments"]["images"] == images and record["wall_seconds"] > 0
    previews = [p for p in _files_under(output, "previews") if p.endswith(".png")]
    assert len(previews) == 2 and summary["previews"] == 2
    fs, _ = storage_util.filesystem(output)
    for p in previews:
        img = png_ok(fs.cat_file(p))
        assert img.width >= 256 or img.height >= 256  # small images are enlarged for a person to see

    # The DuckDB queries of docs/queries.md run on this output and give the numbers computed from the label maps.
    _check_queries(output, labels, stats, errors, run_date="2026-01-02")


def _check_queries(output, labels, stats, errors, run_date):
    con = duckdb_connection(output)
    pixels: dict[int, int] = {}
    images: dict[int, int] = {}
    for r in labels:
        ids, counts = np.unique(decode_row(r), return_counts=True)
        for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
            pixels[i] = pixels.get(i, 0) + c
            images[i] = images.get(i, 0) + 1
    rows = con.execute(example_query("class_coverage", output), {"run_date": run_date}).fetchall()
    assert {r[0]: (r[1], r[2], r[3]) for r in rows} == {i: (CLASS_NAMES[i], images[i], pixels[i]) for i in pixels}
    assert sum(r[4] for r in rows) == pytest.approx(1.0)
    assert [r[3] for r in rows] == sorted(pixels.values(), reverse=True)
    assert con.execute(example_query("class_coverage", output), {"run_date": "1999-01-01"}).fetchall() == []

    top = max(stats, key=lambda s: s["pixel_fraction"])
    threshold = 0.3
    rows = con.execute(example_query("images_with_class", output),
                       {"class_name": top["class_name"], "min_fraction": threshold}).fetchall()
    expected = sorted((s["pixel_fraction"], s["image_uri"]) for s in stats
                      if s["class_name"] == top["class_name"] and s["pixel_fraction"] > threshold)
    assert sorted((r[1], r[0]) for r in rows) == expected and rows

    rows = con.execute(example_query("error_summary", output)).fetchall()
    assert sum(r[3] for r in rows) == len(errors)
    reasons = {r[2] for r in rows}
    assert {"empty file", "not a recognised image format", "truncated or corrupt image header"} <= reasons
    assert all(r[1] == "decode" for r in rows) and str(rows[0][0]) == run_date


def test_docs_show_the_example_queries():
    """docs/queries.md documents exactly the queries the test above runs."""
    docs = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "queries.md")).read()
    squash = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    for name, query in EXAMPLE_QUERIES.items():
        assert squash(query) in squash(docs), f"docs/queries.md lacks the {name} query of pipeline.label.queries"


def test_labels_do_not_depend_on_batch_neighbours(ray_session, tiny_checkpoint, tmp_path):
    """One image labeled alone, and among others of other sizes sharing its canvas: identical bytes."""
    ck_path, _ = tiny_checkpoint
    crowd = {f"n{i:02d}.png": good_image(i, 33 + 3 * i, 40 + 2 * (i % 5)) for i in range(7)}
    target = good_image(99, 41, 45)
    write_files(str(tmp_path / "crowd"), {**crowd, "target.png": target})
    write_files(str(tmp_path / "alone"), {"target.png": target})
    kw = dict(batch_size=4, max_side=None, rows_per_file=100)
    label_images(label_config(str(tmp_path / "crowd"), ck_path, str(tmp_path / "out1"), **kw))
    label_images(label_config(str(tmp_path / "alone" / "target.png"), ck_path, str(tmp_path / "out2"), **kw))
    in_crowd = [r for r in tables(str(tmp_path / "out1"))["labels"].to_pylist() if r["image_uri"].endswith("target.png")]
    alone = tables(str(tmp_path / "out2"))["labels"].to_pylist()
    assert len(in_crowd) == 1 and len(alone) == 1
    assert in_crowd[0]["label_map"] == alone[0]["label_map"]
    assert len(set(np.frombuffer(alone[0]["label_map"], np.uint8).tolist())) > 1  # a non-trivial label map


# ------------------------------------------------------------------------------ four nights on one output


@pytest.fixture(scope="module")
def nights(ray_module, tiny_checkpoint, tmp_path_factory):
    """Four nightly runs on one output that the first release wrote two nights of (tests/first_release.py):
    1. a, b, c, fixed.png (broken) and bad.png (never an image): the run upgrades the first release's files;
    2. fixed.png repaired, --force: every image labeled again;
    3. a.png rewritten (a new version), i4.png and new/i5.png added: only those three labeled;
    4. bad.png deleted, nothing else changed: nothing to label."""
    ck_path, _ = tiny_checkpoint
    tmp = tmp_path_factory.mktemp("nights")
    images, output = str(tmp / "imgs"), str(tmp / "out")
    old = first_release_output(output, [storage.join(images, "a.png"), "s3://elsewhere/x.png", "s3://elsewhere/y.png"])
    write_files(images, {"a.png": good_image(1, 20, 24), "b.png": good_image(2, 22, 21), "c.png": good_image(3, 25, 23),
                         "fixed.png": b"broken", "bad.png": b"never an image"})
    runs = [label_images(label_config(images, ck_path, output, run_date="2026-02-01"))]
    write_files(images, {"fixed.png": good_image(4, 21, 21)})
    runs.append(label_images(label_config(images, ck_path, output, force=True, run_date="2026-02-02")))
    write_files(images, {"a.png": good_image(50, 26, 27), "i4.png": good_image(5, 30, 30),
                         "new/i5.png": good_image(6, 21, 22)})
    runs.append(label_images(label_config(images, ck_path, output, run_date="2026-02-03")))
    os.remove(os.path.join(images, "bad.png"))
    runs.append(label_images(label_config(images, ck_path, output, run_date="2026-02-04")))
    t = tables(output)
    return {"images": images, "output": output, "old": old, "runs": runs, "labels": t["labels"].to_pylist(),
            "stats": t["class_stats"].to_pylist(), "errors": t["errors"].to_pylist()}


def test_each_night_labels_only_what_is_new(nights):
    first, forced, third, _ = nights["runs"]
    assert (first["listed"], first["skipped"], first["labelled"], first["errors"]) == (5, 0, 3, 2)
    assert (forced["skipped"], forced["labelled"], forced["errors"]) == (0, 4, 1)
    # Two new images and one rewritten (new version): only those three are labeled.
    assert (third["listed"], third["skipped"], third["labelled"], third["errors"]) == (7, 3, 3, 1)
    by_run: dict[str, set] = {}
    for r in nights["labels"]:
        by_run.setdefault(r["run_id"], set()).add(os.path.basename(r["image_uri"]))
    assert by_run[third["run_id"]] == {"a.png", "i4.png", "i5.png"}
    assert by_run[forced["run_id"]] == {"a.png", "b.png", "c.png", "fixed.png"}


def test_a_night_with_nothing_new_reaches_no_model_and_writes_no_rows(nights):
    fourth = nights["runs"][3]
    assert (fourth["listed"], fourth["skipped"], fourth["labelled"], fourth["errors"]) == (6, 6, 0, 0)
    assert fourth["inference_actors"] == []  # nothing reached the model
    assert not [r for r in nights["labels"] + nights["stats"] if r["run_id"] == fourth["run_id"]]


def test_without_force_no_image_version_is_labeled_twice(nights):
    forced = nights["runs"][1]["run_id"]
    keys = [(r["image_uri"], r["image_version"]) for r in nights["labels"] if r["run_id"] != forced]
    assert len(keys) == len(set(keys)) == 8 + 3 + 3  # the first release's rows, night 1, night 3
    # a.png three times since the first release: night 1, --force (the same version again), its new version on night 3.
    assert sum(1 for r in nights["labels"] if r["image_uri"].endswith("imgs/a.png") and r["run_id"] != OLD_RUN) == 3
    assert {s["run_id"] for s in nights["stats"]} == {OLD_RUN, *(r["run_id"] for r in nights["runs"][:3])}


def test_readme_queries_count_each_image_once_after_relabels(nights):
    """Every DuckDB query of docs/queries.md on the four nights' output: first-release files, a forced relabel, a
    changed image, an image that failed and was repaired, and one that always failed."""
    output, labels, stats = nights["output"], nights["labels"], nights["stats"]
    latest = {}
    for r in sorted(labels, key=lambda r: r["labeled_at"]):
        latest[r["image_uri"]] = r
    assert len(labels) > len(latest) == 8  # a, b, c, fixed, i4, i5 and two images only the first release labeled
    # A class_stats row belongs to its image's labels row of the same run and time (the first release labeled an
    # image several times in one run).
    latest_stats = [s for s in stats if (latest[s["image_uri"]]["run_id"], latest[s["image_uri"]]["labeled_at"])
                    == (s["run_id"], s["labeled_at"])]
    pixels, counted = {}, {}
    for s in latest_stats:
        pixels[s["class_id"]] = pixels.get(s["class_id"], 0) + s["pixel_count"]
        counted[s["class_id"]] = counted.get(s["class_id"], 0) + 1
    con = duckdb_connection(output)

    rows = con.execute(example_query("class_coverage_latest", output)).fetchall()
    assert {r[0]: (r[2], r[3]) for r in rows} == {c: (counted[c], pixels[c]) for c in pixels}
    assert sum(r[4] for r in rows) == pytest.approx(1.0)
    top = max(latest_stats, key=lambda s: s["pixel_fraction"])
    rows = con.execute(example_query("images_with_class_latest", output),
                       {"class_name": top["class_name"], "min_fraction": 0.2}).fetchall()
    expected = sorted((s["image_uri"], s["pixel_fraction"]) for s in latest_stats
                      if s["class_name"] == top["class_name"] and s["pixel_fraction"] > 0.2)
    assert sorted((r[0], r[1]) for r in rows) == expected and len({r[0] for r in rows}) == len(rows)
    # bad.png's last attempt failed (and the first release's four broken images'); fixed.png's last one labeled it.
    old_failed = {e["image_uri"] for e in nights["errors"] if e["run_id"] == OLD_RUN}
    rows = con.execute(example_query("errors_latest", output)).fetchall()
    assert rows == [("decode", "not a recognised image format", 1 + len(old_failed), storage.join(nights["images"], "bad.png"))]

    # The per-night forms still read first-release files beside new ones, and count that night's rows.
    third = nights["runs"][2]
    night = [s for s in stats if s["run_id"] == third["run_id"]]
    rows = con.execute(example_query("class_coverage", output), {"run_date": "2026-02-03"}).fetchall()
    assert sum(r[3] for r in rows) == sum(s["pixel_count"] for s in night) == 26 * 27 + 30 * 30 + 21 * 22
    old = nights["old"].to_pylist()
    first_night = [s for s in old if s["run_date"] == FIRST_RELEASE_NIGHTS[0]]
    by_class: dict[int, tuple[str, int, int]] = {}
    for s in first_night:
        name, n, px = by_class.get(s["class_id"], (s["class_name"], 0, 0))
        by_class[s["class_id"]] = (name, n + 1, px + s["pixel_count"])
    rows = con.execute(example_query("class_coverage", output), {"run_date": FIRST_RELEASE_NIGHTS[0]}).fetchall()
    assert {r[0]: (r[1], r[2], r[3]) for r in rows} == by_class and by_class
    rows = con.execute(example_query("images_with_class", output),
                       {"class_name": top["class_name"], "min_fraction": 0.2}).fetchall()
    assert len(rows) == sum(1 for s in stats if s["class_name"] == top["class_name"] and s["pixel_fraction"] > 0.2)
    rows = con.execute(example_query("error_summary", output)).fetchall()
    # bad.png on three nights, fixed.png on one, and the first release's four
    assert sum(r[3] for r in rows) == len(nights["errors"]) == 3 + 1 + len(old_failed) == 8
    new_stats = [s for s in stats if s["run_id"] != OLD_RUN]
    assert all(s["labeled_at"] == next(r["labeled_at"] for r in labels if r["run_id"] == s["run_id"]
                                       and r["image_uri"] == s["image_uri"]) for s in new_stats)

    # The label-quality forms: the night's least confident images (the first release's rows have no figures: none on
    # its nights), and each class's share against the 7 nights before (2026-01-02's reaches back into 2025; nothing
    # before 2026-02-01's for a week).
    labels, stats = _rows_by_night(output, "labels"), _rows_by_night(output, "class_stats")
    for run_date, k, found in (("2026-02-02", 3, 3), ("2026-02-03", 10, 3), (FIRST_RELEASE_NIGHTS[0], 10, 0)):
        rows = con.execute(example_query("least_confident_images", output), {"run_date": run_date, "k": k}).fetchall()
        assert rows == _least_confident(labels, run_date, k) and len(rows) == found, run_date
    for run_date in ("2026-02-03", "2026-02-01", FIRST_RELEASE_NIGHTS[1]):
        rows = con.execute(example_query("class_share_moved", output), {"run_date": run_date}).fetchall()
        want = _class_share_moved(stats, run_date)
        assert [r[:2] for r in rows] == [r[:2] for r in want] and rows, run_date
        assert [r[2:] for r in rows] == [tuple(v if v is None else pytest.approx(v) for v in r[2:]) for r in want]
        assert sum(r[2] for r in rows) == pytest.approx(1.0)
        assert all(r[3] is None for r in rows) == (run_date == "2026-02-01")


def _rows_by_night(output: str, table: str) -> list[dict]:
    """A table's rows, each with its run_date (the partition, as text)."""
    by_date = pads.partitioning(pa.schema([("run_date", pa.string())]), flavor="hive")
    return pads.dataset(os.path.join(output, table), format="parquet", partitioning=by_date).to_table().to_pylist()


def _least_confident(labels: list[dict], run_date: str, k: int) -> list[tuple]:
    """The night's latest row per image, those with figures, least confident first (image_uri breaks ties)."""
    latest = {}
    for r in sorted((r for r in labels if r["run_date"] == run_date), key=lambda r: (r["labeled_at"], r["run_id"])):
        latest[r["image_uri"]] = r
    found = sorted((r for r in latest.values() if r["mean_confidence"] is not None),
                   key=lambda r: (r["mean_confidence"], r["image_uri"]))
    return [(r["image_uri"], r["mean_confidence"], r["mean_margin"], r["low_confidence_fraction"], r["run_id"])
            for r in found[:k]]


def _class_share_moved(stats: list[dict], run_date: str) -> list[tuple]:
    """Each class's share of the night's pixels and of the 7 nights before's (0 where absent, None if none)."""
    day = date.fromisoformat(run_date)
    week = {str(day - timedelta(days=n)) for n in range(1, 8)}
    sums: list[dict[tuple[int, str], int]] = [{}, {}]
    for s in stats:
        if s["run_date"] == run_date or s["run_date"] in week:
            period = sums[s["run_date"] != run_date]
            period[(s["class_id"], s["class_name"])] = period.get((s["class_id"], s["class_name"]), 0) + s["pixel_count"]
    totals = [sum(p.values()) for p in sums]
    rows = []
    for key in set(sums[0]) | set(sums[1]):
        tonight, before = (p.get(key, 0) / t if t else None for p, t in zip(sums, totals, strict=True))
        rows.append((*key, tonight, before, None if tonight is None or before is None else tonight - before))
    return sorted(rows, key=lambda r: (r[4] is None, -abs(r[4] or 0), r[0]))


def test_the_first_night_upgrades_the_first_releases_files_once(nights):
    marker = json.loads(storage_util.read_text(storage.join(nights["output"], MARKER)))
    assert marker["schema_version"] == SCHEMA_VERSION and marker["upgraded_files"] == {"class_stats": 4, "labels": 4}
    assert marker["upgraded_by_run"] == nights["runs"][0]["run_id"]


def test_default_readers_read_an_output_mixing_first_release_and_new_files(nights):
    """polars, pyarrow.dataset, pandas and DuckDB, each with its default options, read the upgraded first-release
    rows and the four nights' alike (tests/test_table_upgrade.py has the upgrade's rule and its crash safety)."""
    import duckdb
    import pandas as pd
    import polars as pl

    output, old = nights["output"], nights["old"]
    files = list_table_files(Location.of(output), "class_stats")
    assert len(files) > 4 and all(pq.read_schema(p).equals(SCHEMAS["class_stats"], check_metadata=False) for p in files)
    new = [pq.read_table(p).append_column("run_date", pa.array([_run_date(p)] * pq.read_metadata(p).num_rows))
           for p in files if OLD_RUN not in p]
    expected = key_rows(pa.concat_tables([old, *new]))
    assert len(expected) == old.num_rows + sum(t.num_rows for t in new) and all(r[5] is not None for r in expected)
    assert {_run_date(p) for p in files if OLD_RUN not in p} == {"2026-02-01", "2026-02-02", "2026-02-03"}

    glob = f"{output}/class_stats/**/*.parquet"
    frame = pl.scan_parquet(glob, hive_partitioning=True).collect()
    assert frame.schema["run_date"] == pl.Date and frame.schema["labeled_at"] == pl.Datetime("us", "UTC")
    assert key_rows(frame.to_arrow()) == expected
    dataset = pads.dataset(f"{output}/class_stats", format="parquet", partitioning="hive")
    assert key_rows(dataset.to_table()) == expected
    assert key_rows(pa.Table.from_pandas(pd.read_parquet(f"{output}/class_stats"), preserve_index=False)) == expected
    con = duckdb.connect()
    assert key_rows(con.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true)").arrow().read_all()) == expected
    # The upgraded rows kept every other value: the old labels' rows and the old errors are read whole, too.
    labels = con.sql(f"SELECT run_id, count(*) FROM read_parquet('{output}/labels/**/*.parquet') GROUP BY ALL").fetchall()
    runs = nights["runs"]
    assert dict(labels) == {OLD_RUN: 8, runs[0]["run_id"]: 3, runs[1]["run_id"]: 4, runs[2]["run_id"]: 3}
    # Uncertainty figures: null where the first release labeled (never a made-up value), set for every new row.
    figures = con.sql(f"SELECT run_id = '{OLD_RUN}', count(mean_confidence), count(mean_margin), "
                      f"count(low_confidence_fraction), count(*) FROM read_parquet('{output}/labels/**/*.parquet') "
                      "GROUP BY ALL").fetchall()
    assert sorted(figures) == [(False, 10, 10, 10, 10), (True, 0, 0, 0, 8)]


def _run_date(path: str) -> str:
    return path.split("/run_date=")[1].split("/")[0]


# ------------------------------------------------------------------------------ faults, the CLI


@pytest.mark.parametrize("fault", ["label.inference=kill_once", "label.forward=cuda_error_sticky:{m};label.device_check=cuda_error_sticky"])
def test_killed_inference_worker_still_exactly_once(ray_session, tiny_checkpoint, tmp_path, monkeypatch, fault, capsys):
    """The inference actor SIGKILLs itself mid-batch once, or its device fails for good (a sticky CUDA error:
    every later forward pass in that process fails too): Ray restarts it and retries; no loss, no duplicate,
    nothing in errors/."""
    ck_path, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"k{i:02d}.png": good_image(i, 20 + i, 30 - i) for i in range(10)})
    marker = tmp_path / "killed"
    monkeypatch.setenv(faults.ENV, f"{fault}:{marker}".replace("{m}", str(marker)))  # reaches the actor via runtime_env
    summary = label_images(label_config(images, ck_path, output, rows_per_file=3, progress_interval_s=0.5))
    assert marker.exists()  # the fault did fire
    # While it waits for the restarted actor, the job still says where it is, at most every interval.
    progress = re.findall(r"\[label\] progress: (\d+) of 10 images committed \(\d+%\), 0 errors, [\d.]+ images/s over \d+ s",
                          capsys.readouterr().err)
    assert progress and all(0 <= int(n) <= 10 for n in progress)
    assert summary["labelled"] == 10 and summary["errors"] == 0
    t = tables(output)
    uris = t["labels"]["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == 10
    pairs = list(zip(t["class_stats"]["image_uri"].to_pylist(), t["class_stats"]["class_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs))


def test_cli_summary_line(ray_session, tiny_checkpoint, tmp_path, capsys):
    ck_path, model_id = tiny_checkpoint
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 22, 26), "b.jpg": b""})
    code, stdout, _ = run_label_cli(["--images", str(tmp_path / "imgs"), "--checkpoint", ck_path, "--output",
                                str(tmp_path / "out"), "--actors", "1", "--threads-per-actor", "1", "--no-progress"], capsys)
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert {"run_id", "listed", "skipped", "labelled", "errors", "images_per_second"} <= set(summary)
    assert (summary["listed"], summary["skipped"], summary["labelled"], summary["errors"]) == (2, 0, 1, 1)
    assert summary["model_id"] == model_id
    # The inference actor keeps freed memory for its next call (pipeline/host_memory.py), on this Linux (glibc).
    assert [a["keep_freed_memory"] for a in summary["inference_actors"]] == [True]


def test_help_documents_every_flag(capsys):
    import jobs.label as job

    with pytest.raises(SystemExit):
        job.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--images", "--checkpoint", "--output", "--num-gpus", "--actors", "--threads-per-actor",
                 "--max-side", "--label-encoding", "--force", "--previews", "--batch-size", "--device"):
        assert flag in text
    assert "(default: raw)" in text or "default: raw" in text


def test_fail_fast_with_one_line(tiny_checkpoint, tmp_path, capsys, s3, monkeypatch):
    """A bad checkpoint, a missing bucket or an unreachable endpoint: one line, exit 2, nothing written."""
    ck_path, _ = tiny_checkpoint
    images = tmp_path / "imgs"
    write_files(str(images), {"a.png": good_image(1, 20, 20)})
    broken = tmp_path / "broken.pt"
    broken.write_bytes(open(ck_path, "rb").read()[:5000])
    cases = [
        (["--checkpoint", str(broken), "--images", str(images)], f"checkpoint {broken} is truncated or corrupt"),
        (["--checkpoint", str(tmp_path / "nope.pt"), "--images", str(images)], "checkpoint not found"),
        (["--checkpoint", ck_path, "--images", "s3://no-such-bucket/photos"], "bucket does not exist"),
        (["--checkpoint", ck_path, "--images", str(tmp_path / "missing")], "directory not found"),
        (["--checkpoint", ck_path, "--images", str(images), "--label-encoding", "jpeg"], "invalid choice"),
    ]
    for n, (args, message) in enumerate(cases):
        output = tmp_path / f"out{n}"
        code, stdout, stderr = run_label_cli([*args, "--output", str(output)], capsys)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
        assert not (output / "runs").exists() and not (output / "labels").exists()
    # An endpoint nobody listens on.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    code, _, stderr = run_label_cli(["--checkpoint", ck_path, "--images", "s3://test-bucket/photos",
                                "--output", str(tmp_path / "out9")], capsys)
    s3fs.S3FileSystem.clear_instance_cache()
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot reach the storage endpoint" in lines[0], stderr


def test_cli_log_with_both_streams_together_is_short_and_ends_with_the_json(ray_session, tiny_checkpoint, tmp_path):
    """As `ray job submit` runs it: a driver process joining a running Ray (the session's), stdout and stderr
    collected in one file, not a terminal. A few lines, and the summary as the very last line. (A job that starts
    its own Ray is logged as briefly: tests/test_storage_faults.py, tests/test_demo.py.)"""
    import subprocess
    import sys

    ck_path, _ = tiny_checkpoint
    images = str(tmp_path / "imgs")
    write_files(images, {**{f"g{i}.png": good_image(i, 20 + i, 24) for i in range(6)}, "bad.jpg": b"\xff\xd8broken"})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(tmp_path / "job.log", "wb") as log:
        code = subprocess.run([sys.executable, os.path.join(root, "jobs", "label.py"), "--images", images,
                               "--checkpoint", ck_path, "--output", str(tmp_path / "out"), "--actors", "1",
                               "--threads-per-actor", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=300).returncode
    lines = (tmp_path / "job.log").read_text().strip().splitlines()
    assert code == 0 and len(lines) <= 30, "\n".join(lines)
    assert not any("\x1b[" in line for line in lines)  # no progress-bar cursor codes off a terminal
    summary = json.loads(lines[-1])
    assert (summary["labelled"], summary["errors"]) == (6, 1)
