"""The quality/ table: one row per run, computed from the run's committed tables after its last commit, so retries,
reruns and --force cannot skew it, and the same code recomputes any past run (jobs/quality.py).

It reads no label map: Ray tasks read each committed file's few columns and return small partial sums (per-class
pixels and presence, confidence sums, stage counts), which the driver adds up. Then the run is compared with the
trailing window (the `window_nights` nights before it, same model): the Jensen-Shannon distance between the class
pixel distributions, and the changes in mean confidence and in the share of low-confidence images.
The row is written to quality/run_date=<D>/part-<run_id>.parquet in one atomic write: a run's recomputation
replaces its row, so a reader sees one row per run. docs/labeling.md ("quality") documents every column.
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..storage import Location
from .readers import list_table_files

QUALITY = "quality"
LOW_IMAGE_SHARE = 0.5   # an image is a low-confidence image when over this share of its pixels is below --low-confidence
WINDOW_NIGHTS = 7
_F64, _I64, _I32 = pa.float64(), pa.int64(), pa.int32()
QUALITY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model_id", pa.string()),  # run_date is the hive partition, as in the other tables
    ("computed_at", pa.timestamp("us", tz="UTC")),
    ("images_labeled", _I64), ("images_failed", _I64),
    ("error_stages", pa.list_(pa.string())), ("error_counts", pa.list_(_I64)), ("pixels", _I64),
    ("class_id", pa.list_(_I32)), ("class_name", pa.list_(pa.string())), ("pixel_share", pa.list_(_F64)),
    ("image_presence", pa.list_(_F64)), ("class_mean_confidence", pa.list_(_F64)),
    ("mean_confidence", _F64), ("low_image_share_threshold", _F64), ("low_confidence_image_share", _F64),
    ("canary_mean_iou", _F64), ("canary_pixel_accuracy", _F64), ("canary_per_class_iou", pa.list_(_F64)),
    ("canary_min_iou", _F64), ("canary_passed", pa.bool_()),
    ("window_runs", _I32), ("js_distance", _F64), ("mean_confidence_change", _F64),
    ("low_confidence_share_change", _F64), ("low_confidence_share_ratio", _F64),
])


def _partial(batch: pa.Table, *, run_id: str, classes: int, low_share: float) -> pa.Table:
    """Ray task: one JSON row of partial sums per (table, path) of `batch`, for the rows of `run_id`."""
    from ..storage import Location as Loc

    out = []
    for table, uri in zip(batch["table"].to_pylist(), batch["uri"].to_pylist(), strict=True):
        source = Loc.of(uri)
        with source.fs.open(source.path, "rb") as f:
            if table == "labels":
                rows = pq.read_table(f, columns=["run_id", "width", "height", "mean_confidence", "low_confidence_fraction"])
            elif table == "class_stats":
                rows = pq.read_table(f, columns=["run_id", "class_id", "pixel_count", "mean_confidence"])
            else:
                rows = pq.read_table(f, columns=["run_id", "stage"])
        rows = rows.filter(pc.equal(rows["run_id"], run_id))
        part: dict = {"table": table}
        if table == "labels":
            conf, low = rows["mean_confidence"], rows["low_confidence_fraction"]
            part.update(images=rows.num_rows, pixels=int(pc.sum(pc.multiply(rows["width"].cast(_I64), rows["height"])).as_py() or 0),
                        conf_sum=float(pc.sum(conf).as_py() or 0.0), conf_n=len(conf) - conf.null_count,
                        low_images=int(pc.sum(pc.greater(low, low_share)).as_py() or 0), low_n=len(low) - low.null_count)
        elif table == "class_stats":
            ids = rows["class_id"].to_numpy()
            pixels = rows["pixel_count"].to_numpy().astype(np.float64)
            part.update(pixels=np.bincount(ids, weights=pixels, minlength=classes).tolist(),
                        present=np.bincount(ids, minlength=classes).tolist(),
                        conf=np.bincount(ids, weights=pixels * rows["mean_confidence"].to_numpy(), minlength=classes).tolist())
        else:
            part.update(stages=dict(Counter(rows["stage"].to_pylist())))
        out.append(json.dumps(part))
    return pa.table({"part": pa.array(out, pa.string())})


def _sums(output: Location, run_id: str, run_date: str, classes: int, low_share: float) -> dict:
    import ray

    files = [(t, output.uri_of(p)) for t in ("labels", "class_stats", "errors")
             for p in list_table_files(output, t, f"run_date={run_date}")]
    total = {"images": 0, "pixels": 0, "conf_sum": 0.0, "conf_n": 0, "low_images": 0, "low_n": 0,
             "class_pixels": np.zeros(classes), "present": np.zeros(classes), "class_conf": np.zeros(classes),
             "stages": Counter()}
    if not files:
        return total
    parts = ray.data.from_items([{"table": t, "uri": u} for t, u in files], override_num_blocks=min(len(files), 200))
    parts = parts.map_batches(_partial, batch_size=8, batch_format="pyarrow", num_cpus=0.25,
                              fn_kwargs={"run_id": run_id, "classes": classes, "low_share": low_share})
    for row in parts.iter_rows():
        part = json.loads(row["part"])
        if part["table"] == "labels":
            for key in ("images", "pixels", "conf_sum", "conf_n", "low_images", "low_n"):
                total[key] += part[key]
        elif part["table"] == "class_stats":
            total["class_pixels"] += np.asarray(part["pixels"])
            total["present"] += np.asarray(part["present"])
            total["class_conf"] += np.asarray(part["conf"])
        else:
            total["stages"].update(part["stages"])
    return total


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2 (0: the same distribution, 1: disjoint), of two non-negative weights."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float((a[keep] * np.log2(a[keep] / m[keep])).sum())

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def read_quality(output: Location) -> list[dict]:
    """Every quality/ row of the output (small: one per run), with its partition's run_date."""
    rows = []
    for path in list_table_files(output, QUALITY):
        run_date = path.split("/run_date=")[1].split("/")[0]
        with output.fs.open(path, "rb") as f:
            rows += [{**row, "run_date": run_date} for row in pq.read_table(f).to_pylist()]
    return rows


def _window(output: Location, run_date: str, model_id: str, nights: int) -> list[dict]:
    """The latest row of each of the `nights` nights before `run_date` that the same model labeled."""
    latest: dict[str, dict] = {}
    for row in sorted(read_quality(output), key=lambda r: r["computed_at"]):
        if row["model_id"] == model_id and row["run_date"] < run_date and row["pixels"]:
            latest[row["run_date"]] = row
    return [latest[d] for d in sorted(latest)[-nights:]]


def compute_quality(output: Location, *, run_id: str, run_date: str, model_id: str, class_names: list[str],
                    canary: dict | None = None, window_nights: int = WINDOW_NIGHTS,
                    low_image_share: float = LOW_IMAGE_SHARE) -> dict:
    """The run's quality row, from its committed tables; written to quality/ and returned."""
    c = len(class_names)
    s = _sums(output, run_id, run_date, c, low_image_share)
    pixels = s["class_pixels"]
    share = pixels / pixels.sum() if pixels.sum() else np.zeros(c)
    mean_conf = s["conf_sum"] / s["conf_n"] if s["conf_n"] else None
    low = s["low_images"] / s["low_n"] if s["low_n"] else None
    window = _window(output, run_date, model_id, window_nights)
    drift: dict = {"window_runs": len(window), "js_distance": None, "mean_confidence_change": None,
                   "low_confidence_share_change": None, "low_confidence_share_ratio": None}
    if window and pixels.sum():
        pooled = np.zeros(c)
        for row in window:
            pooled[: len(row["pixel_share"])] += np.asarray(row["pixel_share"][:c]) * row["pixels"]
        if pooled.sum():
            drift["js_distance"] = js_distance(pixels, pooled)
        confs = [r["mean_confidence"] for r in window if r["mean_confidence"] is not None]
        if mean_conf is not None and confs:
            drift["mean_confidence_change"] = mean_conf - float(np.mean(confs))
        lows = [r["low_confidence_image_share"] for r in window if r["low_confidence_image_share"] is not None]
        if low is not None and lows:
            before = float(np.mean(lows))
            drift["low_confidence_share_change"] = low - before
            drift["low_confidence_share_ratio"] = low / before if before else None
    canary = canary or {}
    stages = sorted(s["stages"])
    row = {
        "run_id": run_id, "run_date": run_date, "model_id": model_id, "computed_at": datetime.now(timezone.utc),
        "images_labeled": s["images"], "images_failed": sum(s["stages"].values()),
        "error_stages": stages, "error_counts": [s["stages"][k] for k in stages], "pixels": s["pixels"],
        "class_id": list(range(c)), "class_name": list(class_names), "pixel_share": share.tolist(),
        "image_presence": (s["present"] / s["images"]).tolist() if s["images"] else [0.0] * c,
        "class_mean_confidence": [float(s["class_conf"][i] / pixels[i]) if pixels[i] else None for i in range(c)],
        "mean_confidence": mean_conf, "low_image_share_threshold": low_image_share, "low_confidence_image_share": low,
        "canary_mean_iou": canary.get("mean_iou"), "canary_pixel_accuracy": canary.get("pixel_accuracy"),
        "canary_per_class_iou": canary.get("per_class_iou"), "canary_min_iou": canary.get("min_iou"),
        "canary_passed": canary.get("passed"), **drift,
    }
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "run_date"}], schema=QUALITY_SCHEMA), buf,
                   compression="zstd")
    output.child(QUALITY, f"run_date={run_date}", f"part-{run_id}.parquet").write_bytes(buf.getvalue())
    return {**row, "computed_at": row["computed_at"].isoformat(timespec="seconds")}
