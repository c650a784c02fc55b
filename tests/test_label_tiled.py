"""jobs/label.py --tile on a bucket of real files (issue 34): large images labeled at their own size in tiles, small
ones whole, a 1x100,000 strip, an image over --max-pixels; then a rerun that labels nothing. One run, many named
checks. Below the job (agreement, seams, batches): tests/test_tiling.py; a kill mid-run: tests/test_label_kill.py."""
from __future__ import annotations

import glob
import io
import json

import numpy as np
import pytest
from PIL import Image

from models import load_checkpoint
from pipeline.label.inference import predict_image
from pipeline.label.inference_settings import InferenceSettings
from pipeline.label.tiling import Tiling
from tests.images import gradient_rgb
from tests.label_fixtures import decode_row, duckdb_connection, run_label_job, tables, write_files

TILE = 64
FLAGS = ["--tile", str(TILE), "--batch-size", "3", "--max-side", "48", "--max-pixels", "200000", "--actors", "1",
         "--threads-per-actor", "1", "--cpus-per-actor", "1", "--no-progress", "--previews", "4", "--rows-per-file", "2"]
SIZES = {"big.png": (300, 200), "wide.jpg": (90, 250), "small.png": (60, 40), "edge.png": (64, 64),
         "strip.png": (1, 100_000), "huge.png": (500, 500)}


def _encode(rgb: np.ndarray, name: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG" if name.endswith(".jpg") else "PNG")
    return buf.getvalue()


def _image(name: str) -> np.ndarray:
    h, w = SIZES[name]
    if name == "strip.png":
        return np.tile(gradient_rgb(1, 2000, 5), (1, 50, 1))
    return gradient_rgb(h, w, len(name))


@pytest.fixture(scope="module")
def run(ray_module, tiny_checkpoint, tmp_path_factory):
    ck_path, model_id = tiny_checkpoint
    root = tmp_path_factory.mktemp("tiled")
    images, output = str(root / "imgs"), str(root / "out")
    files = {name: _encode(_image(name), name) for name in SIZES}
    write_files(images, files)
    argv = ["--images", images, "--checkpoint", ck_path, "--output", output, *FLAGS]
    code, out, err = run_label_job(argv)
    again = run_label_job(argv)
    return {"code": code, "out": out, "err": err, "summary": json.loads(out.strip().splitlines()[-1]),
            "again": again, "images": images, "output": output, "files": files, "ck": ck_path}


def _rows(run) -> dict[str, dict]:
    return {r["image_uri"].rsplit("/", 1)[1]: r for r in tables(run["output"])["labels"].to_pylist()}


def test_the_run_succeeds_and_says_so_last(run):
    assert run["code"] == 0, run["err"][-3000:]
    s = run["summary"]
    assert (s["status"], s["listed"], s["labelled"], s["errors"]) == ("succeeded", 6, 5, 1)


def test_the_summary_and_run_record_state_the_tiling(run):
    tiling = run["summary"]["inference"]["tiling"]
    assert tiling["tile"] == TILE and tiling["tile_overlap"] == 0.25 and tiling["tile_blend"] == "gaussian"
    assert tiling["tile_step"] == 48 and "model's own score cells" in tiling["score_cells"]
    (record,) = [r for r in map(json.loads, (open(p).read() for p in glob.glob(f"{run['output']}/runs/*.json")))
                 if r["run_id"] == run["summary"]["run_id"]]
    assert record["inference"]["tiling"] == tiling and record["arguments"]["tile"] == TILE


def test_each_labels_row_says_how_many_tiles_it_took(run):
    rows, t = _rows(run), Tiling(TILE)
    assert {n: r["tiles"] for n, r in rows.items()} == {
        "big.png": t.count(300, 200), "wide.jpg": t.count(90, 250), "strip.png": t.count(1, 100_000),
        "small.png": 0, "edge.png": 0}  # no larger than a tile: whole, today's path
    assert rows["big.png"]["tiles"] == 24


def test_label_maps_have_the_original_size(run):
    for name, row in _rows(run).items():
        assert (row["height"], row["width"]) == SIZES[name] and decode_row(row).shape == SIZES[name]


def test_the_job_writes_what_predict_image_gives(run):
    """Tiled or whole, the job's labels are the single-image function's with the same settings."""
    ck = load_checkpoint(run["ck"])
    rows = _rows(run)
    for name in ("big.png", "wide.jpg", "small.png"):  # the strip: tests/test_tiling.py
        rgb = np.asarray(Image.open(io.BytesIO(run["files"][name])).convert("RGB"))
        settings = InferenceSettings(max_side=48, batch_size=3, device="cpu", tile=TILE)
        assert np.array_equal(decode_row(rows[name]), predict_image(ck, None, rgb, settings=settings).label), name


def test_pixel_counts_sum_to_the_image_and_boxes_are_right(run):
    con = duckdb_connection(run["output"])
    stats = con.execute(f"""SELECT image_uri, class_id, pixel_count, bbox_x_min, bbox_y_min, bbox_x_max, bbox_y_max
        FROM read_parquet('{run['output']}/class_stats/**/*.parquet', hive_partitioning = true)""").fetchall()
    for name, row in _rows(run).items():
        label = decode_row(row)
        mine = [s for s in stats if s[0] == row["image_uri"]]
        assert sum(s[2] for s in mine) == row["width"] * row["height"], name
        for _, c, count, x0, y0, x1, y1 in mine:
            ys, xs = np.nonzero(label == c)
            assert (count, x0, y0, x1, y1) == (len(ys), xs.min(), ys.min(), xs.max(), ys.max()), (name, c)


def test_an_image_over_max_pixels_is_an_errors_row(run):
    (err,) = [e for e in tables(run["output"])["errors"].to_pylist() if e["run_id"] == run["summary"]["run_id"]]
    assert err["image_uri"].endswith("/huge.png") and err["stage"] == "decode" and "--max-pixels" in err["error"]


def test_duckdb_reads_the_tiles_column(run):
    con = duckdb_connection(run["output"])
    tiled = con.execute(f"SELECT count(*), sum(tiles) FROM read_parquet('{run['output']}/labels/**/*.parquet') "
                        "WHERE tiles > 0").fetchone()
    rows = _rows(run)
    assert tiled == (3, sum(rows[n]["tiles"] for n in ("big.png", "wide.jpg", "strip.png")))


def test_previews_of_large_images_are_downscaled(run):
    pngs = glob.glob(f"{run['output']}/previews/**/*.png", recursive=True)
    assert len(pngs) == 4
    for path in pngs:
        with Image.open(path) as im:
            assert im.width <= 1024 and im.height <= 1024 + 200  # the label map, then the legend below it


def test_a_rerun_labels_nothing_again(run):
    code, out, err = run["again"]
    again = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and again["labelled"] == 0 and again["skipped"] == 5, err[-2000:]
    con = duckdb_connection(run["output"])
    counts = con.execute(f"SELECT image_uri, count(*) FROM read_parquet('{run['output']}/labels/**/*.parquet') "
                         "GROUP BY ALL").fetchall()
    assert len(counts) == 5 and all(n == 1 for _, n in counts)


def test_the_log_is_short_and_ends_with_the_summary(run):
    lines = (run["err"] + run["out"]).strip().splitlines()
    assert len(lines) < 40, "\n".join(lines)
    assert json.loads(run["out"].strip().splitlines()[-1]) == run["summary"]
