"""The README's example DuckDB queries and snippet, verbatim: the tests run them on real output and check the
README shows them."""
from __future__ import annotations

# The example queries of the README, verbatim (the tests run them and check the README shows them).
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
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true, union_by_name = true)
WHERE run_date = $run_date
GROUP BY class_id, class_name
ORDER BY pixels DESC;""",
    "images_with_class": """\
SELECT image_uri, pixel_fraction, mean_confidence, bbox_x_min, bbox_y_min, bbox_x_max, bbox_y_max
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true, union_by_name = true)
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
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true, union_by_name = true) AS s
JOIN latest ON s.image_uri = latest.image_uri AND s.run_id = latest.run_id
           AND coalesce(s.labeled_at = latest.labeled_at, true)  -- files from before labeled_at: run_id decides
GROUP BY s.class_id, s.class_name
ORDER BY pixels DESC;""",
    "images_with_class_latest": """\
WITH latest AS (
    SELECT image_uri, arg_max(run_id, labeled_at) AS run_id, max(labeled_at) AS labeled_at
    FROM read_parquet('out/labels/**/*.parquet', hive_partitioning = true)
    GROUP BY image_uri)
SELECT s.image_uri, s.pixel_fraction, s.mean_confidence, s.bbox_x_min, s.bbox_y_min, s.bbox_x_max, s.bbox_y_max
FROM read_parquet('out/class_stats/**/*.parquet', hive_partitioning = true, union_by_name = true) AS s
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
}


def example_query(name: str, root: str) -> str:
    """An EXAMPLE_QUERIES entry pointed at an output root (local path or s3:// URI)."""
    return EXAMPLE_QUERIES[name].replace("'out/", f"'{root.rstrip('/')}/")

# The README's three lines that turn a `label_map` back into an array (raw encoding), verbatim.
LABEL_MAP_SNIPPET = """\
import duckdb, numpy as np
(data, h, w), = duckdb.sql("SELECT label_map, height, width FROM read_parquet('out/labels/**/*.parquet') LIMIT 1").fetchall()
labels = np.frombuffer(data, np.uint8).reshape(h, w)  # class ids; for --label-encoding png: np.asarray(PIL.Image.open(io.BytesIO(data)))"""
