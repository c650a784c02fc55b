"""The quality/ table: one row per run, computed from the run's committed tables after its last commit, so retries,
reruns and --force cannot skew it, and the same code recomputes any past run (jobs/quality.py).

It reads no label map: Ray tasks each take a few of the run's committed files (`part-<run_id>-*.parquet`, the names
every file set of the run has), read their few small columns (only those column chunks are fetched: no readahead,
ranges coalesced by pyarrow) and return small partial sums (per-class pixels, presence and confidence, image
confidence and low-confidence counts, stage counts), which the driver adds up. Then the run is compared with the
trailing window (the quality/ rows of the same model in the `window_nights` calendar nights before it, the latest row
of each night): the Jensen-Shannon distance between the class pixel distributions, and the changes in mean confidence
and in the share of low-confidence images.
The row is written to quality/run_date=<D>/part-<run_id>.parquet in one atomic write: a run's recomputation
replaces its row, so a reader sees one row per run. docs/labeling.md ("quality") documents every column.
"""
from __future__ import annotations

import io
import math
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..storage import Location
from .layout import QUALITY
from .readers import list_table_files

# An image is a low-confidence image when over this share of its pixels is below the run's --low-confidence.
LOW_IMAGE_SHARE_THRESHOLD = 0.5
LOW_SHARE_FLOOR = 0.01  # the window's low-confidence share the ratio divides by, at least
WINDOW_NIGHTS = 7
FILES_PER_TASK = 32      # at most; fewer on a small night, so that every CPU gets a task
READ_THREADS = 4         # files a task reads at once (object-store latency)
TASK_CPUS = 0.5

_F64, _I64, _I32 = pa.float64(), pa.int64(), pa.int32()
# The file's columns; run_date is the hive partition, as in the other tables (a file column of the same name breaks
# pandas' and pyarrow.dataset's default reading of the folder: "Unable to merge: Field run_date has incompatible types").
QUALITY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("model_id", pa.string()), ("computed_at", pa.timestamp("us", tz="UTC")),
    ("images_labeled", _I64), ("images_failed", _I64),
    ("error_stages", pa.list_(pa.string())), ("error_counts", pa.list_(_I64)), ("pixels", _I64),
    ("class_id", pa.list_(_I32)), ("class_name", pa.list_(pa.string())), ("pixel_share", pa.list_(_F64)),
    ("image_presence", pa.list_(_F64)), ("class_mean_confidence", pa.list_(_F64)),
    ("mean_confidence", _F64), ("low_confidence_threshold_share", _F64), ("low_confidence_image_share", _F64),
    ("canary_mean_iou", _F64), ("canary_pixel_accuracy", _F64), ("canary_per_class_iou", pa.list_(_F64)),
    ("canary_min_iou", _F64), ("canary_passed", pa.bool_()),
    ("window_runs", _I32), ("js_distance", _F64), ("mean_confidence_change", _F64),
    ("low_confidence_share_change", _F64), ("low_confidence_share_ratio", _F64),
])
# What is read of each table: never labels' label_map (nor its other large columns).
COLUMNS = {"labels": ("run_id", "mean_confidence", "low_confidence_fraction"),
           "class_stats": ("run_id", "class_id", "pixel_count", "mean_confidence"),
           "errors": ("run_id", "stage")}
_TYPES = {"run_id": pa.string(), "mean_confidence": _F64, "low_confidence_fraction": _F64, "class_id": _I32,
          "pixel_count": _I64, "stage": pa.string()}


@dataclass
class Sums:
    """Partial sums of some of a run's files; `add` merges two. Small whatever the files hold (O(classes))."""

    classes: int
    images: int = 0                # labels rows
    confidence_sum: float = 0.0    # of labels.mean_confidence, over its non-null values
    confidence_n: int = 0
    low_images: int = 0            # labels rows whose low_confidence_fraction is over the threshold
    low_n: int = 0                 # labels rows with a low_confidence_fraction
    class_pixels: np.ndarray = None
    presence: np.ndarray = None    # class_stats rows (images where the class is present)
    class_confidence: np.ndarray = None  # sum of pixel_count x mean_confidence
    stages: Counter = field(default_factory=Counter)
    files: int = 0
    bytes_read: int = 0            # what was fetched of the files (footers and the few column chunks)
    bytes_in_files: int = 0

    def __post_init__(self):
        for name, kind in (("class_pixels", np.int64), ("presence", np.int64), ("class_confidence", np.float64)):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.classes, kind))

    def add(self, other: Sums) -> Sums:
        for name in ("images", "confidence_sum", "confidence_n", "low_images", "low_n", "class_pixels", "presence",
                     "class_confidence", "files", "bytes_read", "bytes_in_files"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.stages.update(other.stages)
        return self


class _Counted:
    """A file opened for reading that counts the bytes read through it (pyarrow reads through this)."""

    def __init__(self, f):
        self._f, self.bytes = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.bytes += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:  # the `with` that opened it closes it
        pass


def read_columns(output: Location, path: str, table: str) -> tuple[pa.Table, int, int]:
    """COLUMNS[table] of one file (a column the file predates comes back null), the bytes fetched and its size.
    No readahead (s3fs's default would fetch 50 MiB blocks: the label maps); pyarrow coalesces the chunks' ranges."""
    with output.fs.open(path, "rb", cache_type="none") as raw:
        f = _Counted(raw)
        pf = pq.ParquetFile(f, pre_buffer=True)
        size = raw.size if hasattr(raw, "size") else output.fs.size(path)
        have = set(pf.schema_arrow.names)
        rows = pf.read(columns=[c for c in COLUMNS[table] if c in have])
        # What the store sent: what pyarrow read, or more where a cache read ahead (s3fs's counts what it fetched).
        read = max(f.bytes, getattr(getattr(raw, "cache", None), "total_requested_bytes", 0))
    for name in COLUMNS[table]:
        if name not in have:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, _TYPES[name]))
    return rows, read, int(size)


def file_sums(output: Location, path: str, table: str, *, run_id: str, classes: int, threshold: float) -> Sums:
    """The partial sums of one committed file's rows of `run_id`."""
    rows, read, size = read_columns(output, path, table)
    rows = rows.filter(pc.equal(rows["run_id"], run_id))
    s = Sums(classes, files=1, bytes_read=read, bytes_in_files=size)
    if table == "labels":
        conf, low = rows["mean_confidence"], rows["low_confidence_fraction"]
        s.images = rows.num_rows
        s.confidence_sum, s.confidence_n = float(pc.sum(conf).as_py() or 0.0), len(conf) - conf.null_count
        s.low_images = int(pc.sum(pc.greater(low, threshold).cast(_I64)).as_py() or 0)
        s.low_n = len(low) - low.null_count
    elif table == "class_stats":
        weighted = pc.multiply(rows["pixel_count"].cast(_F64), rows["mean_confidence"])
        by_class = pa.table({"class_id": rows["class_id"], "pixels": rows["pixel_count"], "conf": weighted}).group_by(
            "class_id").aggregate([("pixels", "sum"), ("pixels", "count"), ("conf", "sum")])
        ids = by_class["class_id"].to_numpy()
        if len(ids) and (ids.min() < 0 or ids.max() >= classes):
            raise ValueError(f"{path}: class id {int(ids.max())} outside the checkpoint's {classes} classes")
        s.class_pixels[ids] = by_class["pixels_sum"].to_numpy()
        s.presence[ids] = by_class["pixels_count"].to_numpy()
        s.class_confidence[ids] = by_class["conf_sum"].to_numpy()
    else:
        s.stages = Counter(rows["stage"].to_pylist())
    return s


def _group_sums(output: Location, files: list[tuple[str, str]], run_id: str, classes: int, threshold: float) -> Sums:
    """Ray task: the partial sums of a few files, READ_THREADS at a time."""
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(files))) as pool:
        parts = list(pool.map(lambda tf: file_sums(output, tf[1], tf[0], run_id=run_id, classes=classes,
                                                   threshold=threshold), files))
    total = Sums(classes)
    for part in parts:
        total.add(part)
    return total


_GROUP_SUMS = ray.remote(num_cpus=TASK_CPUS)(_group_sums)


def run_files(output: Location, run_id: str, run_date: str) -> list[tuple[str, str]]:
    """(table, path) of every committed file of the run: its file sets' names start with `<run_id>-`."""
    prefix = f"part-{run_id}-"
    return [(t, p) for t in COLUMNS for p in list_table_files(output, t, f"run_date={run_date}")
            if posixpath.basename(p).startswith(prefix)]


def run_sums(output: Location, *, run_id: str, run_date: str, classes: int,
             threshold: float = LOW_IMAGE_SHARE_THRESHOLD) -> Sums:
    """The run's sums over its committed files: one Ray task per few files, merged here as they finish."""
    files = run_files(output, run_id, run_date)
    total = Sums(classes)
    if not files:
        return total
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per = max(1, min(FILES_PER_TASK, math.ceil(len(files) / (4 * cpus))))
    pending = [_GROUP_SUMS.remote(output, files[i:i + per], run_id, classes, threshold)
               for i in range(0, len(files), per)]
    while pending:
        done, pending = ray.wait(pending, num_returns=min(len(pending), 16))
        for part in ray.get(done):
            total.add(part)
    return total


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance, base 2 (0: the same distribution, 1: disjoint), of two non-negative weights."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float((a[keep] * np.log2(a[keep] / m[keep])).sum())

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def read_quality(output: Location, run_dates: list[str] | None = None) -> list[dict]:
    """The quality/ rows of the output (small: one per run), each with its partition's run_date; only those of
    `run_dates` when given (one listing per night)."""
    if run_dates is None:
        paths = list_table_files(output, QUALITY)
    else:
        paths = [p for d in sorted(set(run_dates)) for p in list_table_files(output, QUALITY, f"run_date={d}")]
    rows = []
    for path in paths:
        run_date = path.split("/run_date=")[1].split("/")[0]
        with output.fs.open(path, "rb") as f:
            rows += [{**row, "run_date": run_date} for row in pq.read_table(f).to_pylist()]
    return rows


def window_rows(output: Location, run_date: str, model_id: str, nights: int = WINDOW_NIGHTS) -> list[dict]:
    """The rows of the model in the `nights` calendar nights before `run_date`, the latest computed of each night
    among those that labeled something; oldest night first."""
    night = date.fromisoformat(run_date)
    dates = [(night - timedelta(days=k)).isoformat() for k in range(1, nights + 1)]
    latest: dict[str, dict] = {}
    for row in sorted(read_quality(output, dates), key=lambda r: r["computed_at"]):
        if row["model_id"] == model_id and row["pixels"]:
            latest[row["run_date"]] = row
    return [latest[d] for d in sorted(latest)]


def _pooled(rows: list[dict], key: str) -> float | None:
    """A per-image figure of the window: its nights' values weighted by their labeled images (nulls left out)."""
    have = [(r[key], r["images_labeled"]) for r in rows if r.get(key) is not None and r["images_labeled"]]
    n = sum(w for _, w in have)
    return sum(v * w for v, w in have) / n if n else None


def drift(pixels: np.ndarray, mean_confidence: float | None, low_share: float | None, window: list[dict]) -> dict:
    """This night against the window: all null (window_runs 0) without an earlier night."""
    out: dict = {"window_runs": len(window), "js_distance": None, "mean_confidence_change": None,
                 "low_confidence_share_change": None, "low_confidence_share_ratio": None}
    if not window:
        return out
    c = len(pixels)
    pooled = np.zeros(c)
    for row in window:  # shares x pixels: each night's class pixels
        share = np.array([v or 0.0 for v in row["pixel_share"][:c]])
        pooled[: len(share)] += share * row["pixels"]
    if pixels.sum() and pooled.sum():
        out["js_distance"] = js_distance(pixels, pooled)
    before = _pooled(window, "mean_confidence")
    if mean_confidence is not None and before is not None:
        out["mean_confidence_change"] = mean_confidence - before
    before = _pooled(window, "low_confidence_image_share")
    if low_share is not None and before is not None:
        out["low_confidence_share_change"] = low_share - before
        # Against at least 1 %: a window without a low-confidence image still shows a jump to many as doubled.
        out["low_confidence_share_ratio"] = low_share / max(before, LOW_SHARE_FLOOR)
    return out


def _finite(values) -> list | None:
    return None if values is None else [v if v is not None and math.isfinite(v) else None for v in values]


def compute_quality(output: Location, *, run_id: str, run_date: str, model_id: str, class_names: list[str],
                    canary: dict | None = None, window_nights: int = WINDOW_NIGHTS,
                    low_image_share_threshold: float = LOW_IMAGE_SHARE_THRESHOLD) -> dict:
    """The run's quality row, from its committed tables; written to quality/ (replacing the run's earlier row) and
    returned (computed_at as ISO text, with run_date)."""
    c = len(class_names)
    s = run_sums(output, run_id=run_id, run_date=run_date, classes=c, threshold=low_image_share_threshold)
    pixels = s.class_pixels
    total = int(pixels.sum())
    mean_conf = s.confidence_sum / s.confidence_n if s.confidence_n else None
    low = s.low_images / s.low_n if s.low_n else None
    window = window_rows(output, run_date, model_id, window_nights)
    canary = canary or {}
    stages = sorted(s.stages)
    row = {
        "run_id": run_id, "run_date": run_date, "model_id": model_id, "computed_at": datetime.now(timezone.utc),
        "images_labeled": s.images, "images_failed": sum(s.stages.values()),
        "error_stages": stages, "error_counts": [s.stages[k] for k in stages], "pixels": total,
        "class_id": list(range(c)), "class_name": [str(n) for n in class_names],
        "pixel_share": (pixels / total).tolist() if total else [None] * c,
        "image_presence": (s.presence / s.images).tolist() if s.images else [None] * c,
        "class_mean_confidence": [float(s.class_confidence[i] / pixels[i]) if pixels[i] else None for i in range(c)],
        "mean_confidence": mean_conf, "low_confidence_threshold_share": float(low_image_share_threshold),
        "low_confidence_image_share": low,
        "canary_mean_iou": canary.get("mean_iou"), "canary_pixel_accuracy": canary.get("pixel_accuracy"),
        "canary_per_class_iou": _finite(canary.get("per_class_iou")), "canary_min_iou": canary.get("min_iou"),
        "canary_passed": canary.get("passed"), **drift(pixels, mean_conf, low, window),
    }
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: row[k] for k in QUALITY_SCHEMA.names}], schema=QUALITY_SCHEMA), buf,
                   compression="zstd")
    output.child(QUALITY, f"run_date={run_date}", f"part-{run_id}.parquet").write_bytes(buf.getvalue())
    return {**row, "computed_at": row["computed_at"].isoformat(timespec="seconds")}
