"""The labeling job end to end on the shared local Ray: output rows and schema, exactness, incremental runs,
bad input, DuckDB queries, previews, fail-fast errors, a killed inference worker."""
from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from models import load_checkpoint
from pipeline import faults, storage
from pipeline.decode import decode_image
from pipeline.label.inference import predict_image
from pipeline.label.job import label_images
from pipeline.label.queries import EXAMPLE_QUERIES, example_query
from pipeline.label.tables import INDEX, SCHEMAS
from tests import storage_util
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


def _write_first_release_rows(output: str, image_uri: str) -> None:
    """labels and class_stats files as the first release wrote them (class_stats without labeled_at)."""
    import pyarrow as pa

    from pipeline.label.tables import CLASS_STATS_SCHEMA, LABELS_SCHEMA

    stats = pa.Table.from_pylist(
        [{"image_uri": image_uri, "image_version": "v0", "class_id": 0, "class_name": CLASS_NAMES[0], "pixel_count": 12,
          "pixel_fraction": 1.0, "mean_confidence": 0.9, "bbox_x_min": 0, "bbox_y_min": 0, "bbox_x_max": 3,
          "bbox_y_max": 2, "model_id": "m0", "run_id": "old"}],
        schema=pa.schema([f for f in CLASS_STATS_SCHEMA if f.name != "labeled_at"]))
    labels = pa.Table.from_pylist(
        [{"image_uri": image_uri, "image_version": "v0", "width": 4, "height": 3, "label_map": bytes(12),
          "label_encoding": "raw", "classes_present": [0], "model_id": "m0", "run_id": "old",
          "labeled_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}], schema=LABELS_SCHEMA)
    for table, data in (("class_stats", stats), ("labels", labels)):
        path = os.path.join(output, table, "run_date=2026-01-01", "part-old-00001.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(data, path)


def test_readme_queries_count_each_image_once_after_relabels(ray_session, tiny_checkpoint, tmp_path):
    """Every DuckDB query of docs/queries.md on an output holding a first-release file, a forced relabel, a changed image, an image
    that failed and was repaired, and one that always fails."""
    ck_path, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    old_uri = "s3://elsewhere/old.png"
    _write_first_release_rows(output, old_uri)
    write_files(images, {"a.png": good_image(1, 20, 24), "b.png": good_image(2, 22, 21), "c.png": good_image(3, 25, 23),
                         "fixed.png": b"broken", "bad.png": b"never an image"})
    label_images(label_config(images, ck_path, output, run_date="2026-02-01"))
    write_files(images, {"fixed.png": good_image(4, 21, 21)})
    forced = label_images(label_config(images, ck_path, output, force=True, run_date="2026-02-02"))
    write_files(images, {"a.png": good_image(50, 26, 27)})  # a new version
    third = label_images(label_config(images, ck_path, output, run_date="2026-02-03"))
    assert (forced["labelled"], third["labelled"]) == (4, 1)

    t = tables(output)
    labels, stats = t["labels"].to_pylist(), t["class_stats"].to_pylist()
    latest = {}
    for r in sorted(labels, key=lambda r: r["labeled_at"]):
        latest[r["image_uri"]] = r
    assert len(labels) > len(latest) == 5
    latest_stats = [s for s in stats if latest[s["image_uri"]]["run_id"] == s["run_id"]]
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
    rows = con.execute(example_query("errors_latest", output)).fetchall()
    assert rows == [("decode", "not a recognised image format", 1, storage.join(images, "bad.png"))]

    # The per-night forms still read first-release files beside new ones, and count that night's rows.
    night = [s for s in stats if s["run_id"] == third["run_id"]]
    rows = con.execute(example_query("class_coverage", output), {"run_date": "2026-02-03"}).fetchall()
    assert sum(r[3] for r in rows) == sum(s["pixel_count"] for s in night) == 26 * 27
    rows = con.execute(example_query("class_coverage", output), {"run_date": "2026-01-01"}).fetchall()
    assert [(r[1], r[2], r[3]) for r in rows] == [(CLASS_NAMES[0], 1, 12)]
    rows = con.execute(example_query("images_with_class", output),
                       {"class_name": top["class_name"], "min_fraction": 0.2}).fetchall()
    assert len(rows) == sum(1 for s in stats if s["class_name"] == top["class_name"] and s["pixel_fraction"] > 0.2)
    rows = con.execute(example_query("error_summary", output)).fetchall()
    assert sum(r[3] for r in rows) == len(t["errors"]) == 4  # bad.png three times, fixed.png once
    new_stats = [s for s in stats if s["run_id"] != "old"]
    assert all(s["labeled_at"] == next(r["labeled_at"] for r in labels if r["run_id"] == s["run_id"]
                                       and r["image_uri"] == s["image_uri"]) for s in new_stats)


def test_incremental_runs_label_only_what_is_new(ray_session, tiny_checkpoint, tmp_path):
    ck_path, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"i{i}.png": good_image(i, 20 + i, 24) for i in range(4)})
    first = label_images(label_config(images, ck_path, output))
    assert (first["listed"], first["skipped"], first["labelled"], first["errors"]) == (4, 0, 4, 0)

    second = label_images(label_config(images, ck_path, output))
    assert (second["listed"], second["skipped"], second["labelled"], second["errors"]) == (4, 4, 0, 0)
    assert second["inference_actors"] == []  # nothing reached the model
    assert tables(output)["labels"].num_rows == 4

    # Two new images and one rewritten (new version): only those three are labeled.
    write_files(images, {"i4.png": good_image(4, 30, 30), "new/i5.png": good_image(5, 21, 22),
                         "i0.png": good_image(50, 26, 27)})
    third = label_images(label_config(images, ck_path, output))
    assert (third["listed"], third["skipped"], third["labelled"]) == (6, 3, 3)
    labels = tables(output)["labels"].to_pylist()
    by_run = {}
    for r in labels:
        by_run.setdefault(r["run_id"], set()).add(os.path.basename(r["image_uri"]))
    assert by_run[third["run_id"]] == {"i0.png", "i4.png", "i5.png"}
    keys = [(r["image_uri"], r["image_version"]) for r in labels]
    assert len(keys) == len(set(keys)) == 7  # i0 twice: its old and its new version

    forced = label_images(label_config(images, ck_path, output, force=True))
    assert (forced["skipped"], forced["labelled"]) == (0, 6)
    stats = tables(output)["class_stats"]
    assert set(stats["run_id"].to_pylist()) == {first["run_id"], third["run_id"], forced["run_id"]}


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


@pytest.mark.ray_job  # starts jobs with their own Ray (make test-fast leaves it out)
def test_cli_log_with_both_streams_together_is_short_and_ends_with_the_json(tiny_checkpoint, tmp_path):
    """As `ray job submit` collects it (stdout and stderr in one file, not a terminal): a few lines, the progress
    line no more often than asked, and the summary as the very last line."""
    import subprocess
    import sys

    ck_path, _ = tiny_checkpoint
    images = str(tmp_path / "imgs")
    write_files(images, {**{f"g{i}.png": good_image(i, 20 + i, 24) for i in range(6)}, "bad.jpg": b"\xff\xd8broken"})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}
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
