"""The CPU stages of the labeling job (read, decode and preprocess, postprocess), as Ray Data batch functions.

Every stage handles rows one by one: a file that cannot be read or decoded becomes an error row (stage and
reason) and travels on; every other row of the block goes on. No torch here: on a small node each stage
task may start a fresh worker process, and importing torch there would cost ~1.5 s of CPU per process,
taken from the inference actor.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from ..decode import DecodeError, decode_image
from ..errors import one_line
from ..storage import Location, UnreadableFile, read_listed_uri, storage_error
from .canvas import preprocess
from .codec import encode_label_map
from .tables import RESULT_SCHEMA, UTC_TS

TASK_CPUS = 0.25          # Ray CPU request of a read/decode/postprocess task: they never starve the actors
READ_THREADS = 8          # concurrent object reads inside one read task (I/O bound)


def read_stage(batch: pa.Table, *, listed_by: Location | None, max_bytes: int) -> pa.Table:
    """image_uri, image_version, image_size -> + data (bytes), stage, error. Each file is opened through the
    filesystem that listed it (`listed_by`; a manifest's rows: the one their URI names) and read up to
    `max_bytes`. Non-regular files and files over the limit are error rows. One failure costs one row."""
    uris = batch["image_uri"].to_pylist()
    sizes = batch["image_size"].to_pylist()

    def read(i: int):
        size = sizes[i]
        if size is not None and size > max_bytes:
            return None, f"file is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:g} MB limit (--max-bytes)"
        try:
            return read_listed_uri(uris[i], max_bytes, listed_by), None
        except UnreadableFile as e:
            return None, str(e)
        except FileNotFoundError:
            return None, "file not found (deleted since it was listed?)"
        except IsADirectoryError:
            return None, "is a directory"
        except Exception as e:  # noqa: BLE001 - an unreachable store and anything else: this row only
            return None, one_line(storage_error(uris[i], e))

    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(uris)))) as pool:
        results = list(pool.map(read, range(len(uris))))
    return pa.table({
        "image_uri": batch["image_uri"], "image_version": batch["image_version"],
        "data": pa.array([d for d, _ in results], pa.binary()),
        "stage": pa.array(["read" if e else None for _, e in results], pa.string()),
        "error": pa.array([e for _, e in results], pa.string()),
    })


def decode_stage(batch: pa.Table, *, max_pixels: int, max_side: int | None, canvas_multiple: int) -> pa.Table:
    """Bytes -> RGB -> canvas (resize to max_side, edge-pad to the canvas), per row."""
    sizes = ("width", "height", "resized_h", "resized_w", "canvas_h", "canvas_w")
    cols: dict[str, list] = {k: [] for k in (*sizes, "canvas", "stage", "error")}
    for data, stage, error in zip(batch["data"].to_pylist(), batch["stage"].to_pylist(), batch["error"].to_pylist()):
        prepared = None
        if error is None:
            try:
                prepared = preprocess(decode_image(data, max_pixels=max_pixels), max_side, canvas_multiple)
            except DecodeError as e:
                stage, error = "decode", str(e)
            except Exception as e:  # noqa: BLE001 - an unexpected decoder failure costs this row only
                stage, error = "decode", one_line(e)
        if prepared is None:
            for k in sizes:
                cols[k].append(0)
            cols["canvas"].append(None)
        else:
            cols["width"].append(prepared.width)
            cols["height"].append(prepared.height)
            cols["resized_h"].append(prepared.resized_h)
            cols["resized_w"].append(prepared.resized_w)
            cols["canvas_h"].append(prepared.canvas.shape[0])
            cols["canvas_w"].append(prepared.canvas.shape[1])
            cols["canvas"].append(prepared.canvas.tobytes())
        cols["stage"].append(stage)
        cols["error"].append(error)
    table = {"image_uri": batch["image_uri"], "image_version": batch["image_version"]}
    for k in sizes:
        table[k] = pa.array(cols[k], pa.int32())
    table["canvas"] = pa.array(cols["canvas"], pa.binary())
    table["stage"] = pa.array(cols["stage"], pa.string())
    table["error"] = pa.array(cols["error"], pa.string())
    return pa.table(table)


def list_column(arrays: list[np.ndarray], type_: pa.DataType) -> pa.Array:
    """A list column from per-row numpy arrays, without going through Python objects."""
    value_type = type_.value_type
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                    pa.array(values.astype(value_type.to_pandas_dtype()), value_type))


class Postprocessor:
    """The postprocess stage as a small long-lived actor: no new worker process per task on small nodes."""

    def __init__(self, encoding: str):
        self.encoding = encoding

    def __call__(self, batch: pa.Table) -> pa.Table:
        return postprocess_stage(batch, encoding=self.encoding)


def postprocess_stage(batch: pa.Table, *, encoding: str) -> pa.Table:
    """Label maps encoded, per-class fractions and mean confidences; rows in RESULT_SCHEMA."""
    n = batch.num_rows
    errors = batch["error"].to_pylist()
    stages = batch["stage"].to_pylist()
    widths, heights = batch["width"].to_pylist(), batch["height"].to_pylist()
    raw = batch["label_raw"].to_pylist()
    counts = batch["stat_pixel_count"].to_pylist()
    conf = batch["stat_confidence_sum"].to_pylist()
    label_maps: list[bytes | None] = [None] * n
    fractions, means = [], []
    for i in range(n):
        c = np.asarray(counts[i] or [], np.float64)
        total = max(1, widths[i] * heights[i])
        fractions.append(c / total)
        means.append(np.asarray(conf[i] or [], np.float64) / np.maximum(c, 1))
        if errors[i] is not None:
            continue
        try:
            label = np.frombuffer(raw[i], np.uint8).reshape(heights[i], widths[i])
            label_maps[i] = encode_label_map(label, encoding)
        except Exception as e:  # noqa: BLE001
            stages[i], errors[i] = "postprocess", one_line(e)
    now = datetime.now(timezone.utc)
    f64 = pa.list_(pa.float64())
    return pa.table({
        "image_uri": batch["image_uri"], "image_version": batch["image_version"],
        "width": batch["width"], "height": batch["height"],
        "label_map": pa.array(label_maps, pa.binary()),
        "label_encoding": pa.array([encoding] * n, pa.string()),
        "classes_present": batch["stat_class_id"],
        "stat_class_id": batch["stat_class_id"], "stat_pixel_count": batch["stat_pixel_count"],
        "stat_pixel_fraction": list_column(fractions, f64), "stat_mean_confidence": list_column(means, f64),
        "stat_x_min": batch["stat_x_min"], "stat_y_min": batch["stat_y_min"],
        "stat_x_max": batch["stat_x_max"], "stat_y_max": batch["stat_y_max"],
        "at": pa.array([now] * n, UTC_TS),
        "stage": pa.array(stages, pa.string()), "error": pa.array(errors, pa.string()),
        "actor": batch["actor"],
    }, schema=RESULT_SCHEMA)
