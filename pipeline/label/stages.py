"""The CPU stages of the labeling job (read, decode and preprocess, postprocess), as Ray Data batch functions.

Every stage handles rows one by one: a file that cannot be read or decoded becomes an error row (stage and
reason) and travels on; every other row of the block goes on. No torch here: on a small node each stage
task may start a fresh worker process, and importing torch there would cost ~1.5 s of CPU per process,
taken from the inference actor.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..decode import DecodeError, decode_image
from ..errors import one_line
from ..storage import Location, UnreadableFile, storage_error
from .canvas import preprocess
from .codec import encode_label_map
from .columns import binary_column, binary_views, list_from_values, list_values
from .tables import RESULT_SCHEMA, UNCERTAINTY, UTC_TS
from .tiling import Tiling

TASK_CPUS = 0.25          # Ray CPU request of a read/decode/postprocess task: they never starve the actors
READ_THREADS = 8          # concurrent object reads inside one read task (I/O bound)


def read_stage(batch: pa.Table, *, listed_by: Location | None, max_bytes: int) -> pa.Table:
    """image_uri, image_version, image_size -> + data (bytes), stage, error. Each file is opened through the
    filesystem that listed it (`listed_by`; a manifest's rows: the one their URI names) and read up to
    `max_bytes`. Non-regular files and files over the limit are error rows. One failure costs one row."""
    uris = batch["image_uri"].to_pylist()
    sizes = batch["image_size"].to_pylist()
    # Why the listing could not make a row labelable (a name that is not UTF-8): that row fails at stage "list".
    listed = batch["list_error"].to_pylist() if "list_error" in batch.column_names else [None] * len(uris)

    def read(i: int):
        if listed[i]:
            return None, listed[i]
        size = sizes[i]
        if size is not None and size > max_bytes:
            return None, f"file is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:g} MB limit (--max-bytes)"
        try:
            source = Location.of_listed(uris[i], listed_by)
            return source.read_listed(source.path, max_bytes), None
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
        "stage": pa.array(["list" if listed[i] else "read" if e else None for i, (_, e) in enumerate(results)],
                          pa.string()),
        "error": pa.array([e for _, e in results], pa.string()),
    })


# Decoded canvases of one output block at most (then the block goes on): a task's rows may be 100 MP images kept at
# their own size for tiling (300 MB each), and a block of eight would hold 2.4 GB in the task and the object store.
DECODE_BLOCK_BYTES = 64 * 2**20
_SIZES = ("width", "height", "resized_h", "resized_w", "canvas_h", "canvas_w")


def decode_stage(batch: pa.Table, *, max_pixels: int, max_side: int | None, canvas_multiple: int,
                 tiling: Tiling | None = None) -> pa.Table:
    """Bytes -> RGB -> canvas (resize to max_side, edge-pad to the canvas), per row; an image that `tiling`
    applies to keeps its own size (the actor cuts it into tiles). One table of every row."""
    return pa.concat_tables(decode_blocks(batch, max_pixels=max_pixels, max_side=max_side,
                                          canvas_multiple=canvas_multiple, tiling=tiling, block_bytes=None))


def decode_blocks(batch: pa.Table, *, max_pixels: int, max_side: int | None, canvas_multiple: int,
                  tiling: Tiling | None = None, block_bytes: int | None = DECODE_BLOCK_BYTES) -> Iterator[pa.Table]:
    """decode_stage's rows as the pipeline's decode tasks yield them: a table whenever its canvases reach
    `block_bytes` (None: one table), so a task holds one large image's canvas at a time, not its whole batch's."""
    cols: dict[str, list] = {k: [] for k in (*_SIZES, "canvas", "stage", "error")}
    start, held = 0, 0
    rows = zip(batch["data"].to_pylist(), batch["stage"].to_pylist(), batch["error"].to_pylist(), strict=True)
    for i, (data, stage, error) in enumerate(rows):
        prepared = None
        if error is None:
            try:
                prepared = preprocess(decode_image(data, max_pixels=max_pixels), max_side, canvas_multiple, tiling)
            except DecodeError as e:
                stage, error = "decode", str(e)
            except Exception as e:  # noqa: BLE001 - an unexpected decoder failure costs this row only
                stage, error = "decode", one_line(e)
        del data
        if prepared is None:
            for k in _SIZES:
                cols[k].append(0)
            cols["canvas"].append(None)
        else:
            cols["width"].append(prepared.width)
            cols["height"].append(prepared.height)
            cols["resized_h"].append(prepared.resized_h)
            cols["resized_w"].append(prepared.resized_w)
            cols["canvas_h"].append(prepared.canvas.shape[0])
            cols["canvas_w"].append(prepared.canvas.shape[1])
            cols["canvas"].append(prepared.canvas)
            held += prepared.canvas.nbytes
        cols["stage"].append(stage)
        cols["error"].append(error)
        if block_bytes is not None and held >= block_bytes:
            yield _decoded(batch.slice(start, i + 1 - start), cols)
            cols = {k: [] for k in cols}
            start, held = i + 1, 0
    if cols["stage"] or start == 0:
        yield _decoded(batch.slice(start), cols)


def _decoded(rows: pa.Table, cols: dict[str, list]) -> pa.Table:
    table = {"image_uri": rows["image_uri"], "image_version": rows["image_version"]}
    for k in _SIZES:
        table[k] = pa.array(cols[k], pa.int32())
    table["canvas"] = binary_column(cols["canvas"])  # one copy of each canvas, no bytes objects
    table["stage"] = pa.array(cols["stage"], pa.string())
    table["error"] = pa.array(cols["error"], pa.string())
    return pa.table(table)


class Postprocessor:
    """The postprocess stage as a small long-lived actor: no new worker process per task on small nodes."""

    def __init__(self, encoding: str):
        self.encoding = encoding

    def __call__(self, batch: pa.Table) -> pa.Table:
        return postprocess_stage(batch, encoding=self.encoding)


def postprocess_stage(batch: pa.Table, *, encoding: str) -> pa.Table:
    """Label maps encoded, per-class fractions and mean confidences; rows in RESULT_SCHEMA.

    Column-wise: raw label maps pass through as they are (their size checked), the fractions and means are one
    numpy operation over every row's classes; only PNG encoding works image by image."""
    n = batch.num_rows
    errors = batch["error"].to_pylist()
    stages = batch["stage"].to_pylist()
    widths = batch["width"].to_numpy().astype(np.int64)
    heights = batch["height"].to_numpy().astype(np.int64)
    counts, lengths = list_values(batch["stat_pixel_count"], np.float64)
    conf, _ = list_values(batch["stat_confidence_sum"], np.float64)
    totals = np.repeat(np.maximum(1, widths * heights), lengths)
    raw = batch["label_raw"]
    if encoding == "raw":  # the cell already is the row-major map: check its size, keep its bytes
        sizes = pc.binary_length(raw).fill_null(-1).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero((sizes != widths * heights) & np.array([e is None for e in errors], bool)):
            stages[i], errors[i] = "postprocess", f"label map has {sizes[i]} bytes, expected {widths[i] * heights[i]}"
        ok = [e is None for e in errors]
        # Nulls where a row failed; when none did, the column as it came (a 100 MP map is 100 MB: no copy of it).
        label_maps = raw if all(ok) and raw.null_count == 0 else pc.if_else(pa.array(ok, pa.bool_()), raw,
                                                                              pa.scalar(None, pa.binary()))
    else:
        cells: list[bytes | None] = [None] * n
        for i, data in enumerate(binary_views(raw)):
            if errors[i] is not None:
                continue
            try:
                cells[i] = encode_label_map(data.reshape(heights[i], widths[i]), encoding)
            except Exception as e:  # noqa: BLE001
                stages[i], errors[i] = "postprocess", one_line(e)
        label_maps = pa.array(cells, pa.binary())
    now = datetime.now(timezone.utc)
    f64 = pa.list_(pa.float64())
    return pa.table({
        "image_uri": batch["image_uri"], "image_version": batch["image_version"],
        "width": batch["width"], "height": batch["height"],
        "label_map": label_maps,
        "label_encoding": pa.array([encoding] * n, pa.string()),
        "classes_present": batch["stat_class_id"],
        "stat_class_id": batch["stat_class_id"], "stat_pixel_count": batch["stat_pixel_count"],
        "stat_pixel_fraction": list_from_values(counts / totals, lengths, f64),
        "stat_mean_confidence": list_from_values(conf / np.maximum(counts, 1), lengths, f64),
        "stat_x_min": batch["stat_x_min"], "stat_y_min": batch["stat_y_min"],
        "stat_x_max": batch["stat_x_max"], "stat_y_max": batch["stat_y_max"],
        **{name: batch[name] for name in UNCERTAINTY}, "tiles": batch["tiles"],
        "at": pa.array([now] * n, UTC_TS),
        "stage": pa.array(stages, pa.string()), "error": pa.array(errors, pa.string()),
        "actor": batch["actor"],
    }, schema=RESULT_SCHEMA)
