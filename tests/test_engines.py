"""The query recipes of docs/queries.md for every engine it names, on one output of three nights (raw and PNG maps,
a forced relabel, a second run on one night, a changed image, errors, uncertainty figures and rows without them):
each engine's answers are DuckDB's. Spark runs under `make test-spark` (marker `spark`: pyspark and Java 17, ~1 min);
Athena/Trino cannot run here, so their DDL is checked against the files' Parquet schema and their queries are parsed
as Trino SQL and, transpiled, run on DuckDB."""
from __future__ import annotations

import datetime
import glob
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.label.commit import commit_fileset
from pipeline.label.queries import (
    EXAMPLE_QUERIES,
    LABEL_MAP_SNIPPET,
    PANDAS_SNIPPET,
    POLARS_SNIPPET,
    PORTABLE_QUERIES,
    SPARK_SNIPPET,
    TRINO_DATABASE,
    example_query,
    spark_query,
    trino_parameters,
    trino_query,
)
from pipeline.label.tables import SCHEMAS, TABLES, split_results
from pipeline.storage import Location
from tests import query_output
from tests.label_fixtures import CLASS_NAMES
from tests.query_output import write_engine_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
NIGHT = "2026-03-02"
RERUN = "20260302T030000Z-dddddd"  # a second run on NIGHT (--force), two hours after the first
# labels' mean_confidence per (night or RERUN, image); mean_margin and low_confidence_fraction follow from it.
# tests/query_output.py writes none: its first night keeps nulls (as files written before the columns existed), and so
# does d on NIGHT. a's latest row on NIGHT is RERUN's (0.6, not 0.5), which ties with b: image_uri decides.
CONFIDENCE = {(NIGHT, "a"): 0.5, (NIGHT, "b"): 0.6, ("2026-03-03", "c"): 0.8, (RERUN, "a"): 0.6, (RERUN, "c"): 0.55}


def _with_confidence(rows: pa.Table, key: str) -> pa.Table:
    """Result rows with the uncertainty figures CONFIDENCE gives their images under key (null where it has none)."""
    names = [uri.rsplit("/", 1)[1].split(".")[0] for uri in rows["image_uri"].to_pylist()]
    confidence = pa.array([CONFIDENCE.get((key, n)) for n in names], pa.float64())
    figures = {"mean_confidence": confidence, "mean_margin": pc.multiply(confidence, 0.5),
               "low_confidence_fraction": pc.subtract(1.0, confidence)}
    for name, values in figures.items():
        rows = rows.set_column(rows.schema.get_field_index(name), name, values)
    return rows


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("engines") / "out")
    made = query_output.results
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(query_output, "results", lambda images, at, encoding: _with_confidence(made(images, at, encoding),
                                                                                               at.date().isoformat()))
        write_engine_output(root)
    # RERUN labels a and c (still its first version) again on NIGHT: the night's latest rows of both are RERUN's.
    images = [(f"s3://photos/incoming/{n}.jpg", "v1", query_output.label_map(40 + i, 26, 30)) for i, n in enumerate("ac")]
    at = datetime.datetime(2026, 3, 2, 3, 5, tzinfo=datetime.timezone.utc)
    tables = split_results(_with_confidence(made(images, at, "raw"), RERUN), model_id=query_output.MODEL, run_id=RERUN,
                           class_names=CLASS_NAMES)
    commit_fileset(Location.of(root), f"{RERUN}-{0:012x}", NIGHT, query_output.MODEL, tables)
    return root


@pytest.fixture(scope="module")
def params(output) -> dict:
    """Parameters that select rows: the class with the largest fraction somewhere, a fraction below it."""
    import duckdb

    ((name, fraction),) = duckdb.sql(f"SELECT class_name, max(pixel_fraction) FROM read_parquet('{output}/class_stats/**/*.parquet') "
                                     "WHERE class_id > 0 GROUP BY ALL ORDER BY 2 DESC LIMIT 1").fetchall()
    return {"run_date": NIGHT, "class_name": name, "min_fraction": round(fraction / 2, 3), "k": 2}


# Queries whose ORDER BY is a total order: their rows are compared in order.
ORDERED = ("least_confident_images", "class_share_moved")


def _normal(rows, ordered: bool = False) -> list[tuple]:
    """Rows comparable across engines: dates as text, floats to 9 digits, sorted (ties may come in any order) unless
    the query's order is total."""
    def cell(v):
        if isinstance(v, float):
            return round(v, 9)
        if isinstance(v, (datetime.date, datetime.datetime)):
            return str(v)
        return v
    rows = [tuple(cell(v) for v in row) for row in rows]
    return rows if ordered else sorted(rows)


@pytest.fixture(scope="module")
def duckdb_answers(output, params) -> dict[str, list[tuple]]:
    import duckdb

    con = duckdb.connect()
    answers = {}
    for name in EXAMPLE_QUERIES:
        query = example_query(name, output)
        used = {k: v for k, v in params.items() if f"${k}" in query}
        answers[name] = _normal(con.execute(query, used).fetchall(), name in ORDERED)
    # Answers worth comparing: every query finds rows, and the latest forms count fewer images than all nights.
    assert all(answers.values()), answers
    ((rows,),) = duckdb.sql(f"SELECT count(*) FROM read_parquet('{output}/class_stats/**/*.parquet')").fetchall()
    assert sum(r[2] for r in answers["class_coverage_latest"]) < rows
    # The k least confident of NIGHT's latest rows (d has no figures; a's is RERUN's, tied with b's), and every class
    # of NIGHT or the week before it, each period's shares summing to 1.
    assert [(r[0].rsplit("/", 1)[1], r[1], r[4]) for r in answers["least_confident_images"]] == [
        ("c.jpg", 0.55, RERUN), ("a.jpg", 0.6, RERUN)]
    moved = answers["class_share_moved"]
    assert sum(r[2] for r in moved) == pytest.approx(1) and sum(r[3] for r in moved) == pytest.approx(1)
    return answers


# ------------------------------------------------------------------------------------------ Athena / Trino


def _sqlglot_arrow(kind) -> pa.DataType:
    """A DDL column type (sqlglot) as the Arrow type of the Parquet column it reads."""
    from sqlglot import exp

    t = kind.this
    simple = {exp.DataType.Type.TEXT: pa.string(), exp.DataType.Type.VARCHAR: pa.string(),
              exp.DataType.Type.INT: pa.int32(), exp.DataType.Type.BIGINT: pa.int64(),
              exp.DataType.Type.DOUBLE: pa.float64(), exp.DataType.Type.BINARY: pa.binary(),
              exp.DataType.Type.VARBINARY: pa.binary(), exp.DataType.Type.TIMESTAMP: pa.timestamp("us", tz="UTC")}
    if t in simple:
        return simple[t]
    if t == exp.DataType.Type.ARRAY:
        return pa.list_(_sqlglot_arrow(kind.expressions[0]))
    raise AssertionError(f"unexpected DDL type {kind.sql()}")


def _ddl_tables(path: str, dialect: str):
    import sqlglot
    from sqlglot import exp

    statements = sqlglot.parse(open(path).read(), read=dialect, error_level=sqlglot.ErrorLevel.RAISE)
    return [s for s in statements if isinstance(s, exp.Create) and s.kind == "TABLE"]


def _parquet_schema(output: str, table: str) -> pa.Schema:
    """The Arrow schema of every Parquet file of the table (they must agree), plus the run_date partition."""
    schemas = {pq.read_schema(p).remove_metadata() for p in glob.glob(f"{output}/{table}/run_date=*/*.parquet")}
    assert len(schemas) == 1, schemas
    return schemas.pop()


@pytest.mark.parametrize("table", TABLES)
def test_athena_ddl_matches_the_parquet_files(output, table):
    from sqlglot import exp

    path = os.path.join(DOCS, "athena", f"{table}.sql")
    (create,) = _ddl_tables(path, "athena")
    assert create.this.this.name == table and create.this.this.db == TRINO_DATABASE
    columns = [(c.name, _sqlglot_arrow(c.args["kind"])) for c in create.this.expressions]
    files = _parquet_schema(output, table)
    assert [n for n, _ in columns] == files.names == SCHEMAS[table].names
    for (name, declared), field in zip(columns, files, strict=True):
        assert declared == field.type, (table, name, declared, field.type)
    props = create.args["properties"].expressions
    (partition,) = [p for p in props if isinstance(p, exp.PartitionedByProperty)]
    assert [(c.name, c.args["kind"].this) for c in partition.this.expressions] == [("run_date", exp.DataType.Type.TEXT)]
    assert any(isinstance(p, exp.FileFormatProperty) and p.name.upper() == "PARQUET" for p in props)
    (location,) = [p.this.this for p in props if isinstance(p, exp.LocationProperty)]
    tbl = {p.this.this: p.args["value"].this for p in props if type(p) is exp.Property}
    assert tbl["projection.enabled"] == "true" and tbl["projection.run_date.type"] == "date"
    assert tbl["projection.run_date.format"] == "yyyy-MM-dd"  # the folders' run_date=YYYY-MM-DD
    assert tbl["storage.location.template"] == f"{location}run_date=${{run_date}}/"
    assert location.endswith(f"/{table}/") and re.fullmatch(r"\d{4}-\d{2}-\d{2},NOW", tbl["projection.run_date.range"])


def test_trino_hive_connector_ddl_matches_the_parquet_files(output):
    creates = _ddl_tables(os.path.join(DOCS, "trino", "tables.sql"), "trino")
    assert sorted(c.this.this.name for c in creates) == sorted(TABLES)
    for create in creates:
        table = create.this.this.name
        columns = [(c.name, c.args["kind"]) for c in create.this.expressions]
        assert columns[-1][0] == "run_date"
        files = _parquet_schema(output, table)
        assert [n for n, _ in columns[:-1]] == files.names
        for (name, kind), field in zip(columns[:-1], files, strict=True):  # run_date: the partition, not in the files
            declared = _sqlglot_arrow(kind)
            assert declared == field.type or (pa.types.is_timestamp(declared) and pa.types.is_timestamp(field.type)), name
        text = create.sql(dialect="trino")
        assert f"external_location='s3://lake/segmentation/{table}'" in text.replace(" ", "")
        assert "partitioned_by=array['run_date']" in text.replace(" ", "").lower()
    calls = re.findall(r"^CALL hive\.system\.sync_partition_metadata\('segmentation', '(\w+)', 'ADD'\);$",
                       open(os.path.join(DOCS, "trino", "tables.sql")).read(), re.M)
    assert sorted(calls) == sorted(TABLES)  # Trino's MSCK REPAIR, after each night


@pytest.mark.parametrize("name", list(PORTABLE_QUERIES))
def test_trino_forms_parse_and_avoid_duckdbs_dialect(name):
    """Athena/Trino forms: Trino SQL, none of DuckDB's `::`, arg_max, QUALIFY, GROUP BY ALL; every ratio divides a
    DOUBLE (bigint / bigint is integer division there: coverage would come out 0)."""
    import sqlglot
    from sqlglot import exp

    query = trino_query(name)
    tree = sqlglot.parse_one(query, read="trino", error_level=sqlglot.ErrorLevel.RAISE)
    assert "::" not in query and not re.search(r"\barg_max\b|\bQUALIFY\b|GROUP BY ALL", query, re.I)
    assert not list(tree.find_all(exp.Qualify))
    for div in tree.find_all(exp.Div):
        assert isinstance(div.this, exp.Cast) and div.this.to.this == exp.DataType.Type.DOUBLE, div.sql()
    assert {t.name for t in tree.find_all(exp.Table) if t.db} <= set(TABLES)
    assert all(t.db == TRINO_DATABASE for t in tree.find_all(exp.Table) if t.name in TABLES)
    assert query.count("?") == len(trino_parameters(name, {"run_date": 0, "class_name": 0, "min_fraction": 0, "k": 0}))


def test_trino_forms_give_duckdbs_answers(output, params, duckdb_answers):
    """Transpiled from Trino to DuckDB and run over tables like the DDL's (run_date a string): DuckDB's answers."""
    import duckdb
    import sqlglot

    con = duckdb.connect()
    con.execute(f"CREATE SCHEMA {TRINO_DATABASE}")
    for table in TABLES:
        con.execute(f"CREATE VIEW {TRINO_DATABASE}.{table} AS SELECT * FROM read_parquet('{output}/{table}/**/*.parquet', "
                    "hive_partitioning = true, hive_types = {'run_date': VARCHAR})")
    for name in PORTABLE_QUERIES:
        (query,) = sqlglot.transpile(trino_query(name), read="trino", write="duckdb")
        rows = con.execute(query, trino_parameters(name, params)).fetchall()
        assert _normal(rows, name in ORDERED) == duckdb_answers[name], name


# -------------------------------------------------------------------------------------- polars and pandas


def test_polars_recipe_gives_duckdbs_class_coverage(output, duckdb_answers):
    night = datetime.date.fromisoformat(NIGHT)
    code = POLARS_SNIPPET.replace('"out/', f'"{output}/').replace("datetime.date(2026, 11, 24)", repr(night))
    scope: dict = {}
    exec(code, scope)
    import polars as pl

    assert scope["labels"].collect_schema()["run_date"] == pl.Date
    assert scope["class_stats"].collect_schema()["labeled_at"] == pl.Datetime("us", "UTC")
    assert _normal(scope["coverage"].rows()) == duckdb_answers["class_coverage"]


def test_pandas_recipe_types_and_rows(output, params, duckdb_answers):
    code = PANDAS_SNIPPET.replace('"out/', f'"{output}/').replace('"person"', repr(params["class_name"]))
    code = code.replace("> 0.3", f"> {params['min_fraction']}")
    scope: dict = {}
    exec(code, scope)
    frame, found = scope["class_stats"], scope["found"]
    assert str(frame.dtypes["run_date"]) == "date32[day][pyarrow]"
    assert str(frame.dtypes["labeled_at"]) == "timestamp[us, tz=UTC][pyarrow]"
    assert str(frame.dtypes["class_id"]) == "int32[pyarrow]"
    columns = ["image_uri", "pixel_fraction", "mean_confidence", "bbox_x_min", "bbox_y_min", "bbox_x_max", "bbox_y_max"]
    assert _normal(found[columns].itertuples(index=False)) == duckdb_answers["images_with_class"]


# ----------------------------------------------------------------------------------------------- Spark


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark", reason="make test-spark installs pyspark (the 'spark' extra)")
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("fcn-queries")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.mark.spark
def test_spark_forms_give_duckdbs_answers(spark, output, params, duckdb_answers):
    """docs/queries.md's Spark set-up, then every Spark SQL form: DuckDB's answers; the rows themselves too (values,
    microsecond timestamps, decoded label maps)."""
    import duckdb

    from pipeline.label.codec import decode_label_map

    for name in PORTABLE_QUERIES:
        code = SPARK_SNIPPET.replace('f"out/', f'f"{output}/')
        code = code.replace('args={"run_date": "2026-11-24", "class_name": "person", "min_fraction": 0.3, "k": 20}',
                            "args=PARAMS")
        assert "args=PARAMS" in code
        scope = {"QUERY": spark_query(name), "PARAMS": params}
        exec(code, scope)
        assert _normal(scope["rows"], name in ORDERED) == duckdb_answers[name], name
    assert dict(spark.table("labels").dtypes)["run_date"] == "date"
    got = spark.sql("SELECT image_uri, run_id, unix_micros(labeled_at) AS at, label_map, label_encoding, height, width "
                    "FROM labels").collect()
    want = duckdb.sql(f"SELECT image_uri, run_id, epoch_us(labeled_at), label_map, label_encoding, height, width "
                      f"FROM read_parquet('{output}/labels/**/*.parquet')").fetchall()
    assert sorted((r[0], r[1], r[2]) for r in got) == sorted((r[0], r[1], r[2]) for r in want)
    maps = {(r[0], r[1]): decode_label_map(bytes(r[3]), r[4], r[5], r[6]) for r in want}
    for r in got:
        np.testing.assert_array_equal(decode_label_map(bytes(r.label_map), r.label_encoding, r.height, r.width),
                                      maps[(r.image_uri, r.run_id)])


# ------------------------------------------------------------------------------------------------ docs


def test_docs_show_every_form_verbatim():
    """docs/queries.md shows exactly what the tests above run, and the README points at it."""
    squash = lambda s: re.sub(r"\s+", " ", s).strip()  # noqa: E731
    docs = squash(open(os.path.join(DOCS, "queries.md")).read())
    for name in EXAMPLE_QUERIES:
        assert squash(EXAMPLE_QUERIES[name]) in docs, f"docs/queries.md lacks the DuckDB {name} query"
    for name in PORTABLE_QUERIES:
        assert squash(spark_query(name)) in docs, f"docs/queries.md lacks the Spark SQL {name} query"
        assert squash(trino_query(name)) in docs, f"docs/queries.md lacks the Athena/Trino {name} query"
    for snippet in (SPARK_SNIPPET, POLARS_SNIPPET, PANDAS_SNIPPET, LABEL_MAP_SNIPPET):
        assert squash(snippet) in docs, snippet.splitlines()[0]
    for ddl in ("athena/labels.sql", "athena/class_stats.sql", "athena/errors.sql", "trino/tables.sql"):
        assert f"]({ddl})" in docs, ddl
    assert "docs/queries.md" in open(os.path.join(ROOT, "README.md")).read()
