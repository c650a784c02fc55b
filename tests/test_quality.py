"""The quality/ table (issue 32.3): one row per run from its committed tables, drift against the earlier nights,
recomputed by jobs/quality.py. One labeling output of three nights (the third of other pictures: constant colours);
the second has a broken file, a --force rerun whose run id starts with the first run's (so its files' names do too),
then an orchestrator's retry of the first run's id; named tests over it."""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.spatial.distance import jensenshannon

from pipeline.label.commit import parquet_bytes
from pipeline.label.quality import QUALITY_SCHEMA, compute_quality, read_columns, read_quality
from pipeline.label.readers import list_table_files
from pipeline.label.tables import LABELS_SCHEMA
from pipeline.storage import Location
from tests.images import broken_files, encode, gradient_rgb
from tests.jobs_util import one_error, run_failing_cli
from tests.label_fixtures import CLASS_NAMES, FAST_FLAGS, duckdb_connection, run_label_job, write_files

NIGHTS = ("2026-12-01", "2026-12-02", "2026-12-03")
RETRIED = "night2-run"  # the second night's --run-id, run twice
RERUN = "night2-run-b"  # the second night's --force rerun


def _photos(night: int) -> dict[str, bytes]:
    """Gradient pictures (nights 0 and 1: 4 and 5 of them, night 1 with a truncated file), or on night 2 pictures of
    one colour each: what a covered or broken camera sends."""
    if night == 2:
        return {f"flat-{i}.png": encode(np.full((36, 44, 3), colour, np.uint8), "PNG")
                for i, colour in enumerate([(0, 0, 0), (255, 255, 255), (200, 30, 30), (30, 30, 200)])}
    out = {f"n{night}-{i}.png": encode(gradient_rgb(36, 44, 10 * night + i), "PNG") for i in range(4 + night)}
    if night == 1:
        out["n1-broken.jpg"] = broken_files()["truncated.jpg"]
    return out


def _label(images: str, output: str, checkpoint: str, night: str, *extra: str) -> dict:
    code, out, err = run_label_job(["--images", images, "--checkpoint", checkpoint, "--output", output,
                                    "--run-date", night, *FAST_FLAGS, *extra])
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def nights(ray_module, tiny_checkpoint, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("quality")
    output = str(tmp / "out")
    summaries, before_retry = [], None
    for k, night in enumerate(NIGHTS):
        images = str(tmp / f"photos-{k}")
        write_files(images, _photos(k))
        extra = ("--run-id", RETRIED) if k == 1 else ()
        summaries.append(_label(images, output, tiny_checkpoint[0], night, *extra))
        if k == 1:
            before_retry = next(r for r in read_quality(Location.of(output)) if r["run_id"] == RETRIED)
            rerun = _label(images, output, tiny_checkpoint[0], night, "--run-id", RERUN, "--force")
            assert (rerun["labelled"], rerun["errors"]) == (5, 1)
            # The orchestrator retries the first run's id: nothing new to label, the broken file fails again.
            retry = _label(images, output, tiny_checkpoint[0], night, *extra)
            assert (retry["run_id"], retry["labelled"], retry["errors"]) == (RETRIED, 0, 1)
    rows = {r["run_id"]: r for r in read_quality(Location.of(output))}
    return {"output": output, "summaries": summaries, "rows": [rows[s["run_id"]] for s in summaries], "rerun": rows[RERUN],
            "rerun_summary": rerun, "before_retry": before_retry, "model_id": tiny_checkpoint[1]}


def test_one_row_per_run_in_the_table_s_schema(nights):
    for summary, row in zip([*nights["summaries"], nights["rerun_summary"]], [*nights["rows"], nights["rerun"]], strict=True):
        assert (row["run_id"], row["run_date"], row["model_id"]) == (summary["run_id"], summary["run_date"], nights["model_id"])
        assert summary["quality"]["js_distance"] == row["js_distance"]
        assert row["class_id"] == list(range(len(CLASS_NAMES))) and row["class_name"] == CLASS_NAMES
    assert [r["images_labeled"] for r in [*nights["rows"], nights["rerun"]]] == [4, 5, 4, 5]
    files = list_table_files(Location.of(nights["output"]), "quality")
    assert len(files) == 4 and all(pq.read_schema(f).equals(QUALITY_SCHEMA) for f in files)


def test_the_figures_equal_duckdb_s_over_the_same_tables(nights):
    con, out = duckdb_connection(nights["output"]), nights["output"]
    for row in [*nights["rows"], nights["rerun"]]:
        run = row["run_id"]
        images, pixels, conf, low = con.execute(
            f"SELECT count(*), sum(width::BIGINT * height), avg(mean_confidence), avg((low_confidence_fraction > 0.5)::INT) "
            f"FROM read_parquet('{out}/labels/**/*.parquet') WHERE run_id = ?", [run]).fetchone()
        assert (row["images_labeled"], row["pixels"]) == (images, pixels)
        assert row["mean_confidence"] == pytest.approx(conf) and row["low_confidence_image_share"] == pytest.approx(low)
        stages = con.execute(f"SELECT stage, count(*) FROM read_parquet('{out}/errors/**/*.parquet') WHERE run_id = ? "
                             "GROUP BY stage ORDER BY stage", [run]).fetchall()
        assert list(zip(row["error_stages"], row["error_counts"], strict=True)) == stages
        assert row["images_failed"] == sum(n for _, n in stages)
        by_class = {c: (p, n, w) for c, p, n, w in con.execute(
            f"SELECT class_id, sum(pixel_count), count(DISTINCT image_uri), sum(pixel_count * mean_confidence) "
            f"FROM read_parquet('{out}/class_stats/**/*.parquet') WHERE run_id = ? GROUP BY ALL", [run]).fetchall()}
        for c in range(len(CLASS_NAMES)):
            p, n, w = by_class.get(c, (0, 0, 0.0))
            assert row["pixel_share"][c] == pytest.approx(p / pixels, abs=1e-12)
            assert row["image_presence"][c] == pytest.approx(n / images, abs=1e-12)
            assert row["class_mean_confidence"][c] == (pytest.approx(w / p) if p else None)
    # The retry failed the broken file again: two errors rows of the run (docs/labeling.md says so).
    assert [r["images_failed"] for r in [*nights["rows"], nights["rerun"]]] == [0, 2, 0, 1]


def test_pixel_shares_sum_to_one(nights):
    for row in [*nights["rows"], nights["rerun"]]:
        assert sum(row["pixel_share"]) == pytest.approx(1.0, abs=1e-12) and min(row["pixel_share"]) >= 0


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(row["pixel_share"]) * row["pixels"]


def test_js_distance_is_null_first_then_scipy_s_against_the_pooled_window(nights):
    first, second, third = nights["rows"]
    assert first["window_runs"] == 0
    assert all(first[k] is None for k in ("js_distance", "mean_confidence_change", "low_confidence_share_change",
                                          "low_confidence_share_ratio"))
    assert (second["window_runs"], third["window_runs"]) == (1, 2)
    assert second["js_distance"] == pytest.approx(jensenshannon(_pixels(first), _pixels(second), base=2), abs=1e-9)
    pooled = _pixels(first) + _pixels(second)
    assert third["js_distance"] == pytest.approx(jensenshannon(pooled, _pixels(third), base=2), abs=1e-9)
    # The window's per-image figures are over its images (4 and 5 of them), not a mean of its nights'.
    images = first["images_labeled"] + second["images_labeled"]
    conf = (first["mean_confidence"] * first["images_labeled"] + second["mean_confidence"] * second["images_labeled"]) / images
    assert third["mean_confidence_change"] == pytest.approx(third["mean_confidence"] - conf, abs=1e-12)
    low = (first["low_confidence_image_share"] * 4 + second["low_confidence_image_share"] * 5) / images
    assert third["low_confidence_share_change"] == pytest.approx(third["low_confidence_image_share"] - low, abs=1e-12)
    assert third["low_confidence_share_ratio"] == pytest.approx(third["low_confidence_image_share"] / max(low, 0.01))


def test_pictures_of_one_colour_drift_further_than_an_in_distribution_night(nights):
    _, second, third = nights["rows"]
    assert third["js_distance"] > 2 * second["js_distance"] and third["js_distance"] > 0.1


def test_a_retry_of_the_run_id_leaves_one_row_from_everything_it_committed(nights):
    row, before = nights["rows"][1], nights["before_retry"]
    assert row["computed_at"] > before["computed_at"]  # the retry computed it again...
    assert (row["images_labeled"], row["pixel_share"], row["js_distance"]) == (
        before["images_labeled"], before["pixel_share"], before["js_distance"])  # ...from both attempts' files
    paths = list_table_files(Location.of(nights["output"]), "quality", f"run_date={NIGHTS[1]}")
    assert sorted(os.path.basename(p) for p in paths) == sorted([f"part-{RETRIED}.parquet", f"part-{RERUN}.parquet"])
    con = duckdb_connection(nights["output"])
    assert con.execute(f"SELECT count(*) FROM read_parquet('{nights['output']}/quality/**/*.parquet') WHERE run_id = ?",
                       [RETRIED]).fetchone() == (1,)


def _same_row(a: dict, b: dict) -> None:
    for key in QUALITY_SCHEMA.names:
        if key == "computed_at":
            continue
        if isinstance(a[key], float) or (isinstance(a[key], list) and any(isinstance(v, float) for v in a[key])):
            assert b[key] == pytest.approx(a[key], abs=1e-12), key  # partial sums merge in any order
        else:
            assert b[key] == a[key], key


def test_jobs_quality_recomputes_a_past_night_to_the_same_row(nights, capsys):
    import jobs.quality as job
    from pipeline.cli import run_job

    earlier = {r["run_id"]: r for r in [*nights["rows"], nights["rerun"]]}
    for argv, runs in ((["--run-date", NIGHTS[1]], [RERUN, RETRIED]), (["--run-id", nights["rows"][2]["run_id"]], None)):
        with pytest.raises(SystemExit) as exc:
            run_job(job.main, ["--output", nights["output"], *argv])
        assert exc.value.code == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
        # A night's runs are computed in the order they ran: the retry started last, its row stays the latest.
        assert [p["run_id"] for p in printed] == (runs or [nights["rows"][2]["run_id"]])
        rows = {r["run_id"]: r for r in read_quality(Location.of(nights["output"]))}
        assert len(rows) == 4
        for again in printed:
            _same_row(earlier[again["run_id"]], rows[again["run_id"]])
            _same_row(earlier[again["run_id"]], again)
            assert rows[again["run_id"]]["computed_at"] > earlier[again["run_id"]]["computed_at"]


def test_default_readers_read_quality(nights):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    folder = f"{nights['output']}/quality"
    expected = sorted((r["run_date"], r["run_id"]) for r in [*nights["rows"], nights["rerun"]])
    got = duckdb.connect().execute(f"SELECT run_date::VARCHAR, run_id, images_labeled, pixel_share[1] "
                                   f"FROM read_parquet('{folder}/**/*.parquet') ORDER BY 1, 2").fetchall()
    assert [g[:2] for g in got] == expected
    frame = pl.scan_parquet(f"{folder}/**/*.parquet", hive_partitioning=True).collect()
    assert sorted(zip(frame["run_date"].cast(pl.Utf8), frame["run_id"], strict=True)) == expected
    frame = pd.read_parquet(folder)
    assert sorted(zip(frame["run_date"].astype(str), frame["run_id"], strict=True)) == expected
    table = pads.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 4 and set(QUALITY_SCHEMA.names) <= set(table.column_names)


def test_the_window_is_the_model_s_last_nights_the_latest_row_of_each(nights, tmp_path):
    """Rows written by hand beside the real ones: a night 8 days before (outside), two rows of the night 7 days before
    (the later one counts), another model's night and an empty run's row (neither counts)."""
    out = str(tmp_path / "out")
    shutil.copytree(nights["output"], out)
    third, model = nights["rows"][2], nights["model_id"]
    t0, c = datetime(2026, 12, 1, tzinfo=timezone.utc), len(CLASS_NAMES)

    def share(*classes: int) -> list[float]:
        return [1 / len(classes) if i in classes else 0.0 for i in range(c)]

    hand = [("2026-11-25", "outside", model, 1000, share(0)), ("2026-11-26", "early", model, 9000, share(1)),
            ("2026-11-26", "later", model, 300, share(2, 3)), ("2026-11-28", "other-model", "m2", 5000, share(4)),
            ("2026-11-29", "empty", model, 0, [None] * c)]
    for k, (night, run, model_id, pixels, shares) in enumerate(hand):
        row = {"run_id": run, "model_id": model_id, "computed_at": t0 + timedelta(minutes=k), "pixels": pixels,
               "images_labeled": 3 if pixels else 0, "pixel_share": shares, "mean_confidence": 0.5 if pixels else None,
               "low_confidence_image_share": 0.25 if pixels else None}
        os.makedirs(f"{out}/quality/run_date={night}", exist_ok=True)
        pq.write_table(pa.Table.from_pylist([row], schema=QUALITY_SCHEMA), f"{out}/quality/run_date={night}/part-{run}.parquet")
    row = compute_quality(Location.of(out), run_id=third["run_id"], run_date=third["run_date"], model_id=model,
                          class_names=CLASS_NAMES)
    first, second = nights["rows"][:2]
    assert row["window_runs"] == 3  # later, and the first two nights
    pooled = np.asarray(share(2, 3)) * 300 + _pixels(first) + _pixels(second)
    assert row["js_distance"] == pytest.approx(jensenshannon(pooled, _pixels(third), base=2), abs=1e-9)
    conf = (0.5 * 3 + first["mean_confidence"] * 4 + second["mean_confidence"] * 5) / 12
    assert row["mean_confidence_change"] == pytest.approx(third["mean_confidence"] - conf, abs=1e-12)
    low = (0.25 * 3 + first["low_confidence_image_share"] * 4 + second["low_confidence_image_share"] * 5) / 12
    assert row["low_confidence_share_change"] == pytest.approx(third["low_confidence_image_share"] - low, abs=1e-12)
    assert row["low_confidence_share_ratio"] == pytest.approx(third["low_confidence_image_share"] / max(low, 0.01))
    narrow = compute_quality(Location.of(out), run_id=third["run_id"], run_date=third["run_date"], model_id=model,
                             class_names=CLASS_NAMES, window_nights=1)
    assert narrow["window_runs"] == 1
    assert narrow["js_distance"] == pytest.approx(jensenshannon(_pixels(second), _pixels(third), base=2), abs=1e-9)


def test_on_s3_the_same_row_without_fetching_a_label_map(nights, bucket, s3):
    s3.put(nights["output"] + "/", f"{bucket}/out/", recursive=True)
    third = nights["rows"][2]
    row = compute_quality(Location.of(f"{bucket}/out"), run_id=third["run_id"], run_date=third["run_date"],
                          model_id=nights["model_id"], class_names=CLASS_NAMES)
    _same_row(third, row)
    # A labels file of 24 MB of label maps in 6 row groups (the job's have 256 rows each): its few other columns come
    # in under 1 % of it (s3fs's readahead would fetch the label maps after the first row group's small columns).
    n, rng = 24, np.random.default_rng(0)
    rows = pa.table({"image_uri": [f"s3://b/{i}.jpg" for i in range(n)], "image_version": ["v"] * n,
                     "width": pa.array([1000] * n, pa.int32()), "height": pa.array([500] * n, pa.int32()),
                     "label_map": [rng.bytes(1_000_000) for _ in range(n)], "label_encoding": ["raw"] * n,
                     "classes_present": [[0]] * n, "model_id": ["m"] * n, "run_id": ["r"] * n,
                     "labeled_at": [datetime.now(timezone.utc)] * n, "mean_confidence": rng.random(n),
                     "mean_margin": rng.random(n), "low_confidence_fraction": rng.random(n),
                     "tiles": pa.array([0] * n, pa.int32())}, schema=LABELS_SCHEMA)
    s3.pipe(f"{bucket}/big/part-r-x.parquet", parquet_bytes(rows, row_group_rows=4))
    big = Location.of(f"{bucket}/big/part-r-x.parquet")
    got, fetched, size = read_columns(big, big.path, "labels")
    assert got.num_rows == n and size > 24_000_000 and fetched < size / 100, (fetched, size)


def test_bad_recomputations_are_one_line(nights, tmp_path, capsys):
    code, err = run_failing_cli("quality", ["--output", str(tmp_path), "--run-id", "x"], capsys)
    assert "holds no labeling run" in one_error(code, err)
    code, err = run_failing_cli("quality", ["--output", nights["output"], "--run-id", "nope"], capsys)
    assert "no labeling run with id nope" in one_error(code, err)
    code, err = run_failing_cli("quality", ["--output", nights["output"], "--run-date", "2026-11-30"], capsys)
    assert "no labeling run on 2026-11-30" in one_error(code, err)
    code, err = run_failing_cli("quality", ["--output", nights["output"], "--run-date", "yesterday"], capsys)
    assert "run-date" in one_error(code, err)
    code, err = run_failing_cli("quality", ["--output", nights["output"], "--run-id", "x", "--window-nights", "0"], capsys)
    assert "--window-nights" in one_error(code, err)
    code, err = run_failing_cli("quality", ["--output", nights["output"]], capsys)
    assert "--run-id" in one_error(code, err)


@pytest.mark.ray_job  # the bench starts a Ray of its own (make test-fast leaves it out)
def test_the_bench_runs_small_and_reports_its_figures():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "bench/quality_bench.py", "--rows", "2000"], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"quality_seconds", "rows_per_second", "driver_peak_rss_mb", "share_of_the_night", "files",
            "bytes_read_share"} <= set(result)
    assert (result["class_stats_rows"], result["images_labeled"], result["images_failed"]) == (2000, 400, 4)
    assert result["quality_seconds"] > 0 and result["bytes_read_share"] > 0  # a tiny file: its footer is most of it
