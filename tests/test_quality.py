"""The quality/ table (issue 32.3): one row per run from its committed tables, drift against the earlier nights,
recomputed by jobs/quality.py. Three nights on one output (the third of other images), named tests over them."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.spatial.distance import jensenshannon

from pipeline.label.quality import QUALITY_SCHEMA, read_quality
from pipeline.label.readers import list_table_files
from pipeline.storage import Location
from tests.images import encode, gradient_rgb
from tests.jobs_util import one_error, run_failing_cli
from tests.label_fixtures import CLASS_NAMES, FAST_FLAGS, duckdb_connection, run_label_job, write_files

NIGHTS = ("2026-12-01", "2026-12-02", "2026-12-03")


def _photos(seed: int, invert: bool = False) -> dict[str, bytes]:
    out = {}
    for i in range(4):
        rgb = gradient_rgb(36, 44, seed + i)
        out[f"n{seed}-{i}.png"] = encode(255 - rgb if invert else rgb, "PNG")
    return out


@pytest.fixture(scope="module")
def nights(ray_module, tiny_checkpoint, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("quality")
    images, output = str(tmp / "photos"), str(tmp / "out")
    summaries = []
    for k, night in enumerate(NIGHTS):
        write_files(images, _photos(10 * k, invert=k == 2))
        code, out, err = run_label_job(["--images", images, "--checkpoint", tiny_checkpoint[0], "--output", output,
                                        "--run-date", night, *FAST_FLAGS])
        assert code == 0, err[-3000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    rows = {r["run_id"]: r for r in read_quality(Location.of(output))}
    return {"output": output, "summaries": summaries, "rows": [rows[s["run_id"]] for s in summaries]}


def test_one_row_per_run_with_the_summary_s_figures(nights):
    for summary, row in zip(nights["summaries"], nights["rows"], strict=True):
        assert (row["run_date"], row["images_labeled"], row["images_failed"]) == (summary["run_date"], 4, 0)
        assert summary["quality"]["images_labeled"] == 4
        assert summary["quality"]["js_distance"] == row["js_distance"]
    files = list_table_files(Location.of(nights["output"]), "quality")
    assert len(files) == 3 and all(pq.read_schema(f).equals(QUALITY_SCHEMA) for f in files)


def test_the_figures_equal_duckdb_s_over_the_same_tables(nights):
    con = duckdb_connection(nights["output"])
    out = nights["output"]
    for row in nights["rows"]:
        run = row["run_id"]
        images, pixels, conf, low = con.execute(
            f"SELECT count(*), sum(width::BIGINT * height), avg(mean_confidence), avg((low_confidence_fraction > 0.5)::INT) "
            f"FROM read_parquet('{out}/labels/**/*.parquet') WHERE run_id = ?", [run]).fetchone()
        assert (row["images_labeled"], row["pixels"]) == (images, pixels)
        assert row["mean_confidence"] == pytest.approx(conf) and row["low_confidence_image_share"] == pytest.approx(low)
        by_class = dict(con.execute(f"SELECT class_id, sum(pixel_count) FROM read_parquet('{out}/class_stats/**/*.parquet') "
                                    "WHERE run_id = ? GROUP BY ALL", [run]).fetchall())
        expected = np.array([by_class.get(i, 0) for i in range(len(CLASS_NAMES))], float)
        np.testing.assert_allclose(row["pixel_share"], expected / expected.sum())
        assert row["class_name"] == CLASS_NAMES and sum(row["pixel_share"]) == pytest.approx(1.0)


def test_drift_is_the_jensen_shannon_distance_to_the_earlier_nights(nights):
    first, second, third = nights["rows"]
    assert first["window_runs"] == 0 and first["js_distance"] is None and first["low_confidence_share_ratio"] is None
    assert second["window_runs"] == 1 and third["window_runs"] == 2
    assert second["js_distance"] == pytest.approx(jensenshannon(first["pixel_share"], second["pixel_share"], base=2), abs=1e-9)
    pooled = np.asarray(first["pixel_share"]) * first["pixels"] + np.asarray(second["pixel_share"]) * second["pixels"]
    assert third["js_distance"] == pytest.approx(jensenshannon(pooled, third["pixel_share"], base=2), abs=1e-9)
    before = (first["mean_confidence"] + second["mean_confidence"]) / 2
    assert third["mean_confidence_change"] == pytest.approx(third["mean_confidence"] - before)


def test_a_recomputed_night_replaces_its_row(nights, capsys):
    import jobs.quality as job
    from pipeline.cli import run_job

    second = nights["rows"][1]
    with pytest.raises(SystemExit) as exc:
        run_job(job.main, ["--output", nights["output"], "--run-date", NIGHTS[1]])
    assert exc.value.code == 0
    (again,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    for key in ("images_labeled", "pixel_share", "js_distance", "mean_confidence", "window_runs"):
        assert again[key] == second[key], key
    rows = read_quality(Location.of(nights["output"]))
    assert len(rows) == 3 and sorted(r["run_id"] for r in rows) == sorted(s["run_id"] for s in nights["summaries"])


def test_default_readers_read_quality(nights):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    glob = f"{nights['output']}/quality/**/*.parquet"
    assert duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall() == [(3,)]
    assert pl.scan_parquet(glob, hive_partitioning=True).collect().height == 3
    assert len(pd.read_parquet(f"{nights['output']}/quality")) == 3
    assert pads.dataset(f"{nights['output']}/quality", format="parquet", partitioning="hive").count_rows() == 3


def test_bad_recomputations_are_one_line(nights, tmp_path, capsys):
    code, err = run_failing_cli("quality", ["--output", str(tmp_path), "--run-id", "x"], capsys)
    assert "holds no finished labeling run" in one_error(code, err)
    code, err = run_failing_cli("quality", ["--output", nights["output"], "--run-id", "nope"], capsys)
    assert "no finished labeling run with id nope" in one_error(code, err)


@pytest.mark.ray_job  # the bench starts a Ray of its own (make test-fast leaves it out)
def test_the_bench_runs_small_and_reports_its_figures():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "bench/quality_bench.py", "--rows", "2000"], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["class_stats_rows"], result["images_labeled"]) == (2000, 400)
    assert result["quality_seconds"] > 0 and result["share_of_the_night"] > 0
