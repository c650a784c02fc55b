"""The example queries of docs/queries.md, verbatim, for every engine it names: the tests run them on real output
(DuckDB and, with `make test-spark`, Spark; the Athena/Trino forms through a parser of that dialect and, transpiled,
on DuckDB) and check the docs show them."""
from __future__ import annotations

# The DuckDB queries of docs/queries.md, verbatim (the tests run them and check the docs show them).
# 'out/' is the output root; $name are DuckDB prepared-statement parameters.
EXAMPLE_QUERIES = {
    # Per night: every row written that night.
    "class_coverage": """\
SELECT class_id, class_name,
       count(*)                                       AS images,
       sum(pixel_count)                               AS pixels,
       sum(pixel_count) / (SELECT sum(width::BIGINT * height)
                           FROM read_parquet('out/labels/**/*.parquet', hive_partitioning = true)
                           WHERE run_date = $run_date) AS coverage
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true)
WHERE run_date = $run_date
GROUP BY class_id, class_name
ORDER BY pixels DESC;""",
    "images_with_class": """\
SELECT image_uri, pixel_fraction, mean_confidence, bbox_x_min, bbox_y_min, bbox_x_max, bbox_y_max
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true)
WHERE class_name = $class_name AND pixel_fraction > $min_fraction
ORDER BY pixel_fraction DESC;""",
    "error_summary": """\
SELECT run_date, stage, trim(split_part(error, '(', 1)) AS reason,
       count(*) AS images, min(image_uri) AS example
FROM read_parquet('out/errors/**/*.parquet', hive_partitioning = true)
GROUP BY ALL
ORDER BY run_date DESC, images DESC;""",
    # Latest per image: an image relabelled (--force, a changed file, a new checkpoint) counts once, with the
    # rows of the run that labelled it last (class_stats rows belong to the labels row of the same run).
    "class_coverage_latest": """\
WITH latest AS (
    SELECT image_uri, arg_max(run_id, labeled_at) AS run_id, max(labeled_at) AS labeled_at,
           arg_max(width::BIGINT * height, labeled_at) AS pixels
    FROM read_parquet('out/labels/**/*.parquet', hive_partitioning = true)
    GROUP BY image_uri)
SELECT s.class_id, s.class_name,
       count(*)                                       AS images,
       sum(s.pixel_count)                             AS pixels,
       sum(s.pixel_count) / (SELECT sum(pixels) FROM latest) AS coverage
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true) AS s
JOIN latest ON s.image_uri = latest.image_uri AND s.run_id = latest.run_id
           AND coalesce(s.labeled_at = latest.labeled_at, true)  -- null only where an upgrade found no labels row
GROUP BY s.class_id, s.class_name
ORDER BY pixels DESC;""",
    "images_with_class_latest": """\
WITH latest AS (
    SELECT image_uri, arg_max(run_id, labeled_at) AS run_id, max(labeled_at) AS labeled_at
    FROM read_parquet('out/labels/**/*.parquet', hive_partitioning = true)
    GROUP BY image_uri)
SELECT s.image_uri, s.pixel_fraction, s.mean_confidence, s.bbox_x_min, s.bbox_y_min, s.bbox_x_max, s.bbox_y_max
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true) AS s
JOIN latest ON s.image_uri = latest.image_uri AND s.run_id = latest.run_id
           AND coalesce(s.labeled_at = latest.labeled_at, true)
WHERE s.class_name = $class_name AND s.pixel_fraction > $min_fraction
ORDER BY s.pixel_fraction DESC;""",
    # Images whose latest attempt failed (an image labelled since, or fixed and labelled, drops out).
    "errors_latest": """\
WITH attempts AS (
    SELECT image_uri, failed_at AS attempted_at, stage, error
    FROM read_parquet('out/errors/**/*.parquet', hive_partitioning = true)
    UNION ALL
    SELECT image_uri, labeled_at, NULL, NULL
    FROM read_parquet('out/labels/**/*.parquet', hive_partitioning = true)),
last AS (
    SELECT * FROM attempts QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY attempted_at DESC) = 1)
SELECT stage, trim(split_part(error, '(', 1)) AS reason, count(*) AS images, min(image_uri) AS example
FROM last
WHERE error IS NOT NULL
GROUP BY ALL
ORDER BY images DESC;""",
    # Label quality (labels' per-image uncertainty columns; docs/labeling.md "Output"). The night's K least
    # confident images: an image labelled twice that night (--force) counts once, with its latest row; rows without
    # the figures (files written before the columns existed) are no candidates.
    "least_confident_images": """\
WITH night AS (
    SELECT image_uri, mean_confidence, mean_margin, low_confidence_fraction, run_id
    FROM read_parquet('out/labels/**/*.parquet', hive_partitioning = true)
    WHERE run_date = $run_date
    QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY labeled_at DESC, run_id DESC) = 1)
SELECT image_uri, mean_confidence, mean_margin, low_confidence_fraction, run_id
FROM night
WHERE mean_confidence IS NOT NULL
ORDER BY mean_confidence, image_uri
LIMIT $k;""",
    # Each class's share of the night's class_stats pixels against its share over the 7 nights before it (every row
    # written in each period, as class_coverage counts them); a class missing from one period has share 0 there.
    "class_share_moved": """\
WITH pixels AS (
    SELECT class_id, class_name,
           CASE WHEN run_date = $run_date THEN pixel_count ELSE 0 END AS tonight,
           CASE WHEN run_date = $run_date THEN 0 ELSE pixel_count END AS previous_week
    FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true)
    WHERE run_date BETWEEN $run_date::DATE - 7 AND $run_date::DATE),
shares AS (
    SELECT class_id, class_name,
           sum(tonight) / (SELECT nullif(sum(tonight), 0) FROM pixels)             AS share_tonight,
           sum(previous_week) / (SELECT nullif(sum(previous_week), 0) FROM pixels) AS share_previous_week
    FROM pixels
    GROUP BY class_id, class_name)
SELECT class_id, class_name, share_tonight, share_previous_week, share_tonight - share_previous_week AS change
FROM shares
ORDER BY abs(change) DESC, class_id;""",
}


def example_query(name: str, root: str) -> str:
    """An EXAMPLE_QUERIES entry pointed at an output root (local path or s3:// URI)."""
    return EXAMPLE_QUERIES[name].replace("'out/", f"'{root.rstrip('/')}/")

# The three lines of docs/queries.md that turn a `label_map` back into an array (raw encoding), verbatim.
LABEL_MAP_SNIPPET = """\
import duckdb, numpy as np
(data, h, w), = duckdb.sql("SELECT label_map, height, width FROM read_parquet('out/labels/**/*.parquet') LIMIT 1").fetchall()
labels = np.frombuffer(data, np.uint8).reshape(h, w)  # class ids; for --label-encoding png: np.asarray(PIL.Image.open(io.BytesIO(data)))"""

# The same queries in SQL that Spark SQL and Athena/Trino both accept: tables by name ({labels}, {class_stats},
# {errors}), parameters as {name}; `spark_query` and `trino_query` render them. What differs from DuckDB: no `::`
# (CAST), max_by for arg_max, no QUALIFY (a row_number() subquery), explicit GROUP BY columns (Trino's GROUP BY ALL
# is not DuckDB's), a DOUBLE numerator wherever a ratio is taken (bigint / bigint is integer division in Trino), no
# select-list alias used in the same select list, and date arithmetic on CAST(... AS DATE) with INTERVAL '7' DAY
# (run_date is a string in Athena's tables, a date in Spark's views).
PORTABLE_QUERIES = {
    "class_coverage": """\
SELECT class_id, class_name,
       count(*)                                       AS images,
       sum(pixel_count)                               AS pixels,
       CAST(sum(pixel_count) AS DOUBLE) / (SELECT sum(CAST(width AS BIGINT) * height)
                                           FROM {labels}
                                           WHERE run_date = {run_date}) AS coverage
FROM {class_stats}
WHERE run_date = {run_date}
GROUP BY class_id, class_name
ORDER BY pixels DESC""",
    "images_with_class": """\
SELECT image_uri, pixel_fraction, mean_confidence, bbox_x_min, bbox_y_min, bbox_x_max, bbox_y_max
FROM {class_stats}
WHERE class_name = {class_name} AND pixel_fraction > {min_fraction}
ORDER BY pixel_fraction DESC""",
    "error_summary": """\
SELECT run_date, stage, trim(split_part(error, '(', 1)) AS reason,
       count(*) AS images, min(image_uri) AS example
FROM {errors}
GROUP BY run_date, stage, trim(split_part(error, '(', 1))
ORDER BY run_date DESC, images DESC""",
    "class_coverage_latest": """\
WITH latest AS (
    SELECT image_uri, max_by(run_id, labeled_at) AS run_id, max(labeled_at) AS labeled_at,
           max_by(CAST(width AS BIGINT) * height, labeled_at) AS pixels
    FROM {labels}
    GROUP BY image_uri)
SELECT s.class_id, s.class_name,
       count(*)                                       AS images,
       sum(s.pixel_count)                             AS pixels,
       CAST(sum(s.pixel_count) AS DOUBLE) / (SELECT sum(pixels) FROM latest) AS coverage
FROM {class_stats} AS s
JOIN latest ON s.image_uri = latest.image_uri AND s.run_id = latest.run_id
           AND coalesce(s.labeled_at = latest.labeled_at, true)
GROUP BY s.class_id, s.class_name
ORDER BY pixels DESC""",
    "images_with_class_latest": """\
WITH latest AS (
    SELECT image_uri, max_by(run_id, labeled_at) AS run_id, max(labeled_at) AS labeled_at
    FROM {labels}
    GROUP BY image_uri)
SELECT s.image_uri, s.pixel_fraction, s.mean_confidence, s.bbox_x_min, s.bbox_y_min, s.bbox_x_max, s.bbox_y_max
FROM {class_stats} AS s
JOIN latest ON s.image_uri = latest.image_uri AND s.run_id = latest.run_id
           AND coalesce(s.labeled_at = latest.labeled_at, true)
WHERE s.class_name = {class_name} AND s.pixel_fraction > {min_fraction}
ORDER BY s.pixel_fraction DESC""",
    "errors_latest": """\
WITH attempts AS (
    SELECT image_uri, failed_at AS attempted_at, stage, error
    FROM {errors}
    UNION ALL
    SELECT image_uri, labeled_at, NULL, NULL
    FROM {labels}),
last AS (
    SELECT image_uri, stage, error,
           row_number() OVER (PARTITION BY image_uri ORDER BY attempted_at DESC) AS attempt
    FROM attempts)
SELECT stage, trim(split_part(error, '(', 1)) AS reason, count(*) AS images, min(image_uri) AS example
FROM last
WHERE attempt = 1 AND error IS NOT NULL
GROUP BY stage, trim(split_part(error, '(', 1))
ORDER BY images DESC""",
    "least_confident_images": """\
WITH night AS (
    SELECT image_uri, mean_confidence, mean_margin, low_confidence_fraction, run_id,
           row_number() OVER (PARTITION BY image_uri ORDER BY labeled_at DESC, run_id DESC) AS recency
    FROM {labels}
    WHERE run_date = {run_date})
SELECT image_uri, mean_confidence, mean_margin, low_confidence_fraction, run_id
FROM night
WHERE recency = 1 AND mean_confidence IS NOT NULL
ORDER BY mean_confidence, image_uri
LIMIT {k}""",
    "class_share_moved": """\
WITH pixels AS (
    SELECT class_id, class_name,
           CASE WHEN run_date = {run_date} THEN pixel_count ELSE 0 END AS tonight,
           CASE WHEN run_date = {run_date} THEN 0 ELSE pixel_count END AS previous_week
    FROM {class_stats}
    WHERE CAST(run_date AS DATE) BETWEEN CAST({run_date} AS DATE) - INTERVAL '7' DAY AND CAST({run_date} AS DATE)),
shares AS (
    SELECT class_id, class_name,
           CAST(sum(tonight) AS DOUBLE) / (SELECT nullif(sum(tonight), 0) FROM pixels)             AS share_tonight,
           CAST(sum(previous_week) AS DOUBLE) / (SELECT nullif(sum(previous_week), 0) FROM pixels) AS share_previous_week
    FROM pixels
    GROUP BY class_id, class_name)
SELECT class_id, class_name, share_tonight, share_previous_week, share_tonight - share_previous_week AS change
FROM shares
ORDER BY abs(share_tonight - share_previous_week) DESC, class_id""",
}

# Athena/Trino: the tables of docs/athena/*.sql in this database.
TRINO_DATABASE = "segmentation"
_PARAMETERS = ("run_date", "class_name", "min_fraction", "k")
_TABLES = ("labels", "class_stats", "errors")


def spark_query(name: str) -> str:
    """The Spark SQL form: temporary views named labels, class_stats, errors; named parameters (`:run_date`)."""
    return PORTABLE_QUERIES[name].format(**{t: t for t in _TABLES}, **{p: f":{p}" for p in _PARAMETERS})


def trino_query(name: str) -> str:
    """The Athena/Trino form: the tables of TRINO_DATABASE; positional parameters (`?`, in the order they appear)."""
    return PORTABLE_QUERIES[name].format(**{t: f"{TRINO_DATABASE}.{t}" for t in _TABLES}, **{p: "?" for p in _PARAMETERS})


def trino_parameters(name: str, values: dict) -> list:
    """The values of a Trino form's `?` parameters, in order (Athena's ExecutionParameters, Trino's EXECUTE USING)."""
    import re

    return [values[p] for p in re.findall(r"\{(" + "|".join(_PARAMETERS) + r")\}", PORTABLE_QUERIES[name])]

# docs/queries.md's Spark set-up, verbatim: each table's folder as a view (never the output root, whose folders are
# not all tables; never a **/*.parquet glob, which loses run_date), timestamps shown in UTC, named parameters.
SPARK_SNIPPET = """\
from pyspark.sql import SparkSession
spark = SparkSession.builder.config("spark.sql.session.timeZone", "UTC").getOrCreate()
for table in ("labels", "class_stats", "errors"):  # run_date comes back as a date column
    spark.read.parquet(f"out/{table}").createOrReplaceTempView(table)
rows = spark.sql(QUERY, args={"run_date": "2026-11-24", "class_name": "person", "min_fraction": 0.3, "k": 20}).collect()"""

# docs/queries.md's polars recipe, verbatim: a glob with hive_partitioning=True (run_date as a Date), then the
# night's class coverage.
POLARS_SNIPPET = """\
import datetime, polars as pl
labels = pl.scan_parquet("out/labels/**/*.parquet", hive_partitioning=True)  # run_date: Date
class_stats = pl.scan_parquet("out/class_stats/**/*.parquet", hive_partitioning=True)
night = datetime.date(2026, 11, 24)
pixels = labels.filter(pl.col("run_date") == night).select((pl.col("width").cast(pl.Int64) * pl.col("height")).sum())
coverage = (class_stats.filter(pl.col("run_date") == night)
            .group_by("class_id", "class_name").agg(images=pl.len(), pixels=pl.col("pixel_count").sum())
            .with_columns(coverage=pl.col("pixels") / pixels.collect().item())
            .sort("pixels", descending=True).collect())"""

# docs/queries.md's pandas recipe, verbatim: run_date as a date (pyarrow's default makes it a category of strings),
# Arrow-backed columns (int32 stays int32, timestamps keep UTC).
PANDAS_SNIPPET = """\
import pandas as pd, pyarrow as pa, pyarrow.dataset as ds
by_date = ds.partitioning(pa.schema([("run_date", pa.date32())]), flavor="hive")
class_stats = pd.read_parquet("out/class_stats", partitioning=by_date, dtype_backend="pyarrow")
found = class_stats[(class_stats.class_name == "person") & (class_stats.pixel_fraction > 0.3)]
found = found.sort_values("pixel_fraction", ascending=False)"""
