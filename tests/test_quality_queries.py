"""docs/queries.md's label-quality queries (least_confident_images, class_share_moved) against an independent
computation (pandas over the same Parquet files), on an output written here in the tables' exact schemas with rows
of known values: a --force rerun on the night, rows without uncertainty figures, ties, nights just inside and just
outside the week before (across a month's end), a class seen in only one period, a night with no week before. Each
form that runs here is checked: DuckDB's, and the Athena/Trino form transpiled to DuckDB (Spark's run on the engine
output in tests/test_engines.py under `make test-spark`)."""
from __future__ import annotations

import datetime
import os

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.label.queries import TRINO_DATABASE, example_query, trino_parameters, trino_query
from pipeline.label.tables import SCHEMAS, TABLES

NIGHT = "2026-03-05"
FIRST, FORCED = "20260305T010000Z-aaaaaa", "20260305T050000Z-bbbbbb"  # the night's run and its --force rerun
UTC = datetime.timezone.utc
FORMS = ("duckdb", "trino")


def _labels_row(name: str, run_id: str, at: datetime.datetime, confidence: float | None) -> dict:
    return {"image_uri": f"s3://photos/{name}.jpg", "image_version": "v1", "width": 5, "height": 4,
            "label_map": bytes(20), "label_encoding": "raw", "classes_present": [0], "model_id": "0123456789abcdef",
            "run_id": run_id, "labeled_at": at,
            "mean_confidence": confidence, "mean_margin": None if confidence is None else confidence / 4,
            "low_confidence_fraction": None if confidence is None else 1 - confidence}


def _stats_row(name: str, class_id: int, pixels: int, run_id: str) -> dict:
    return {"image_uri": f"s3://photos/{name}.jpg", "image_version": "v1", "class_id": class_id,
            "class_name": f"class{class_id}", "pixel_count": pixels, "pixel_fraction": pixels / 100,
            "mean_confidence": 0.8, "bbox_x_min": 0, "bbox_y_min": 0, "bbox_x_max": 9, "bbox_y_max": 9,
            "model_id": "0123456789abcdef", "run_id": run_id, "labeled_at": None}


def _write(root: str, table: str, run_date: str, part: str, rows: list[dict]) -> None:
    folder = os.path.join(root, table, f"run_date={run_date}")
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[table]), os.path.join(folder, f"part-{part}.parquet"),
                   compression="zstd")


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("quality") / "out")
    first, forced = (datetime.datetime(2026, 3, 5, h, 0, 7, tzinfo=UTC) for h in (1, 5))
    # The night: i1 was the least confident in the first run, but the rerun's row (its latest) is confident; i2 and
    # i3 tie; i4 has no figures (a file written before the columns existed); i6 only in the rerun.
    _write(root, "labels", NIGHT, f"{FIRST}-0", [
        _labels_row("i1", FIRST, first, 0.30), _labels_row("i2", FIRST, first, 0.50),
        _labels_row("i3", FIRST, first, 0.50), _labels_row("i4", FIRST, first, None)])
    _write(root, "labels", NIGHT, f"{FORCED}-0", [
        _labels_row("i1", FORCED, forced, 0.90), _labels_row("i6", FORCED, forced, 0.45)])
    # Other nights' images are less confident still, and never this night's answer.
    _write(root, "labels", "2026-03-04", "20260304T010000Z-cccccc-0",
           [_labels_row("old", "20260304T010000Z-cccccc", first - datetime.timedelta(days=1), 0.05)])

    # class_stats: tonight's pixels, and the nights around the week before (2026-02-26 to 2026-03-04).
    def night(run_date: str, classes: dict[int, int]) -> None:
        run = run_date.replace("-", "") + "T010000Z-dddddd"
        _write(root, "class_stats", run_date, f"{run}-0", [_stats_row(f"s{c}", c, px, run) for c, px in classes.items()])
    night("2026-02-25", {0: 1000, 3: 9000})  # 8 nights before: outside the week (class 3 only here)
    night("2026-02-26", {0: 300, 2: 100})    # 7 nights before: inside (class 2 only in the week before)
    night("2026-03-04", {0: 400, 5: 200})
    night(NIGHT, {0: 520, 1: 130, 5: 350})   # class 1 only tonight
    night("2026-03-06", {0: 10, 4: 990})     # the night after: outside (class 4 only here)
    for table in TABLES:  # every table present, as a labeling run leaves them
        if not os.path.isdir(os.path.join(root, table)):
            _write(root, table, NIGHT, f"{FIRST}-0", [])
    return root


def _frame(output: str, table: str):
    by_date = pads.partitioning(pa.schema([("run_date", pa.date32())]), flavor="hive")
    return pads.dataset(os.path.join(output, table), format="parquet", partitioning=by_date).to_table().to_pandas()


def _least_confident(output: str, run_date: str, k: int) -> list[tuple]:
    """pandas: the night's rows, the latest per image, those with figures, least confident first."""
    labels = _frame(output, "labels")
    night = labels[labels.run_date == datetime.date.fromisoformat(run_date)]
    latest = night.sort_values(["labeled_at", "run_id"]).drop_duplicates("image_uri", keep="last")
    found = latest[latest.mean_confidence.notna()].sort_values(["mean_confidence", "image_uri"]).head(k)
    columns = ["image_uri", "mean_confidence", "mean_margin", "low_confidence_fraction", "run_id"]
    return [tuple(r) for r in found[columns].itertuples(index=False)]


def _share_moved(output: str, run_date: str) -> list[tuple]:
    """pandas: each class's share of the night's pixels and of the 7 nights before's, 0 where it is absent."""
    stats = _frame(output, "class_stats")
    day = datetime.date.fromisoformat(run_date)
    week = (stats.run_date >= day - datetime.timedelta(days=7)) & (stats.run_date <= day - datetime.timedelta(days=1))
    periods = [stats[stats.run_date == day], stats[week]]
    names = dict(zip(stats.class_id, stats.class_name, strict=True))
    sums = [p.groupby("class_id").pixel_count.sum().to_dict() for p in periods]
    totals = [sum(s.values()) for s in sums]
    rows = []
    for c in sorted(set(sums[0]) | set(sums[1])):
        tonight, before = (s.get(c, 0) / t if t else None for s, t in zip(sums, totals, strict=True))
        rows.append((c, names[c], tonight, before, None if tonight is None or before is None else tonight - before))
    return sorted(rows, key=lambda r: (r[4] is None, -abs(r[4] or 0), r[0]))


def _run(form: str, output: str, name: str, params: dict) -> list[tuple]:
    import duckdb
    import sqlglot

    con = duckdb.connect()
    if form == "duckdb":
        query = example_query(name, output)
        return con.execute(query, {k: v for k, v in params.items() if f"${k}" in query}).fetchall()
    con.execute(f"CREATE SCHEMA {TRINO_DATABASE}")
    for table in TABLES:  # as docs/athena/*.sql declares them: run_date a string
        con.execute(f"CREATE VIEW {TRINO_DATABASE}.{table} AS SELECT * FROM read_parquet('{output}/{table}/**/*.parquet', "
                    "hive_partitioning = true, hive_types = {'run_date': VARCHAR})")
    (query,) = sqlglot.transpile(trino_query(name), read="trino", write="duckdb")
    return con.execute(query, trino_parameters(name, params)).fetchall()


def _approx(rows: list[tuple]) -> list[tuple]:
    return [tuple(pytest.approx(v, abs=1e-12) if isinstance(v, float) else v for v in r) for r in rows]


@pytest.mark.parametrize("form", FORMS)
def test_least_confident_images_latest_row_per_image_with_figures(output, form):
    want = _least_confident(output, NIGHT, 10)
    # The independent answer is the one meant: i1's rerun row (0.9) replaces its first (0.3), i4 has no figures,
    # i2 and i3 tie and come in image_uri order, the other night's 0.05 is not tonight's.
    assert [(r[0].rsplit("/", 1)[1], r[1], r[4]) for r in want] == [
        ("i6.jpg", 0.45, FORCED), ("i2.jpg", 0.5, FIRST), ("i3.jpg", 0.5, FIRST), ("i1.jpg", 0.9, FORCED)]
    for k in (1, 2, 3, 10):  # k = 2 cuts between the tied i2 and i3
        rows = _run(form, output, "least_confident_images", {"run_date": NIGHT, "k": k})
        assert rows == _approx(_least_confident(output, NIGHT, k)), (form, k)
    assert _run(form, output, "least_confident_images", {"run_date": "2026-03-03", "k": 5}) == []


@pytest.mark.parametrize("form", FORMS)
def test_class_share_moved_against_the_seven_nights_before(output, form):
    want = _share_moved(output, NIGHT)
    # Tonight 520/130/350 of 1000; the week before (2026-02-26 and 2026-03-04) 700/100/200 of 1000; class 3 is 8 nights
    # back and class 4 the night after: neither counts.
    assert [(r[0], r[2], r[3]) for r in want] == [(0, 0.52, 0.7), (5, 0.35, 0.2), (1, 0.13, 0.0), (2, 0.0, 0.1)]
    rows = _run(form, output, "class_share_moved", {"run_date": NIGHT})
    assert rows == _approx(want), form
    # A night with nothing labeled in the week before: tonight's shares, the week before's and the change unknown.
    first = _share_moved(output, "2026-02-25")
    assert [(r[0], r[2], r[3]) for r in first] == [(0, 0.1, None), (3, 0.9, None)]
    assert _run(form, output, "class_share_moved", {"run_date": "2026-02-25"}) == _approx(first), form
