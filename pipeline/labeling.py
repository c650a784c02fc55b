"""The nightly labeling job on Ray Data: list images -> drop those already labelled -> read bytes -> decode
and preprocess (CPU tasks) -> model (actor pool: one actor per GPU, or CPU actors) -> postprocess (label map
encoding, per-class fractions; in the inference actor for raw maps, in small CPU actors for PNG) -> write
(the driver, with the exactly-once protocol of `pipeline.label_output`).

Every stage handles rows one by one: a file that cannot be read, decoded or labelled becomes an error row
(stage and reason) and travels on to `errors/`; every other row of the same block is labelled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from models import CheckpointError, load_checkpoint_bytes

from . import label_output as out
from . import storage
from .datasets import list_images
from .decode import DEFAULT_MAX_PIXELS, decode_image
from .inference import InferenceSettings, Predictor, Prepared, from_shippable, shippable
from .label_stages import TASK_CPUS, Postprocessor, list_column, decode_stage, postprocess_stage, read_stage

log = logging.getLogger(__name__)

ENCODINGS = ("raw", "png")
# Test-only: seconds to pause at every step of the commit protocol (widens the windows a kill can hit).
COMMIT_DELAY_ENV = "FCN_LABEL_TEST_COMMIT_DELAY_S"


@dataclass
class LabelConfig:
    """Arguments of the labeling job; see `jobs/label.py --help` for each."""

    images: str
    checkpoint: str
    output: str
    num_gpus: int | None = None          # None: every GPU of the cluster (0 on a CPU cluster)
    device: str = "auto"                  # auto | cpu | cuda
    actors: int | None = None            # CPU inference only; None: cores // threads_per_actor
    threads_per_actor: int | None = None  # None: min(8, cores) on CPU, 2 with GPUs
    cpus_per_actor: float | None = None   # Ray CPU request of an inference actor; None: see plan_resources
    batch_size: int | None = None        # images per forward pass; None: 8 on GPU, 4 on CPU
    max_side: int | None = 1024
    canvas_multiple: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    label_encoding: str = "raw"
    force: bool = False
    previews: int = 0
    rows_per_file: int = 1000
    bytes_per_file: int = 256 * 1024**2
    rows_per_read_task: int = 8
    rows_per_actor_call: int | None = None  # None: 4 x batch_size (room to fill equal-canvas batches)
    run_date: str | None = None          # YYYY-MM-DD; None: today (UTC)
    run_id: str | None = None
    ray_address: str | None = None
    progress: bool | None = None          # None: when stderr is a terminal
    amp: bool = True
    # Test-only fault injection, e.g. "kill_actor_once:/tmp/marker": the first inference actor call that
    # finds no marker file creates it and SIGKILLs its own process.
    fault: str | None = None

    def validate(self) -> None:
        if self.label_encoding not in ENCODINGS:
            raise ValueError(f"--label-encoding must be one of {', '.join(ENCODINGS)}, got {self.label_encoding!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("actors", "threads_per_actor", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"--num-gpus must be >= 0, got {self.num_gpus}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.previews < 0 or self.rows_per_file < 1 or self.rows_per_read_task < 1:
            raise ValueError("--previews must be >= 0 and --rows-per-file >= 1")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if self.run_date is not None:
            try:
                datetime.strptime(self.run_date, "%Y-%m-%d")
            except ValueError:
                raise ValueError(f"--run-date must be YYYY-MM-DD, got {self.run_date!r}") from None
        if self.run_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.run_id):
            raise ValueError(f"--run-id may hold letters, digits, '_', '.' and '-' only, got {self.run_id!r}")
        InferenceSettings(max_side=self.max_side, canvas_multiple=self.canvas_multiple)


# ----------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class ResourcePlan:
    pool: int              # inference actors
    actor_gpus: float
    actor_cpus: float      # Ray CPU request per actor
    threads: int           # torch threads per actor
    batch_size: int
    device: str
    task_cpus: float = TASK_CPUS


def plan_resources(config: LabelConfig, cluster: dict) -> ResourcePlan:
    """Actor pool size and per-actor requests from the flags and the cluster's resources.

    GPUs: one actor per GPU (num_gpus=1), pool size --num-gpus (default: all). CPU: --actors x
    --threads-per-actor torch threads, by default one actor per 8 cores; each actor asks Ray for half a CPU
    less than its threads, which leaves room for the small decode/postprocess tasks that feed it.
    """
    cpus = float(cluster.get("CPU", 0))
    gpus = int(cluster.get("GPU", 0))
    use_gpus = config.num_gpus if config.num_gpus is not None else gpus
    if cpus < TASK_CPUS:
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs; reading and decoding need at least {TASK_CPUS}")
    if use_gpus > 0:
        if use_gpus > gpus:
            raise ValueError(f"--num-gpus {use_gpus} but the Ray cluster has {gpus} GPU(s)")
        if config.actors is not None and config.actors != use_gpus:
            raise ValueError("--actors is for CPU inference; with GPUs the pool has one actor per GPU (--num-gpus)")
        threads = config.threads_per_actor or 2
        actor_cpus = config.cpus_per_actor or max(0.05, min(1.0, math.floor(20 * cpus / (2 * use_gpus)) / 20))
        device = "cuda" if config.device == "auto" else config.device
        return ResourcePlan(use_gpus, 1.0, actor_cpus, threads, config.batch_size or 8, device)
    threads = config.threads_per_actor or max(1, min(8, int(cpus)))
    actors = config.actors or max(1, int(cpus) // threads)
    actor_cpus = config.cpus_per_actor or max(0.5, threads - 0.5)
    if actors * actor_cpus > cpus - TASK_CPUS + 1e-9:
        raise ValueError(f"{actors} actor(s) x {actor_cpus:g} CPUs leave no CPU for decoding on a cluster of "
                         f"{cpus:g} CPUs; lower --actors, --threads-per-actor or --cpus-per-actor")
    device = "cpu" if config.device == "auto" else config.device
    return ResourcePlan(actors, 0.0, actor_cpus, threads, config.batch_size or 4, device)


# ------------------------------------------------------------------------------------- pipeline stages


class InferenceActor:
    """One model replica: loads the checkpoint from the object store, labels canvases (see inference.py)."""

    def __init__(self, checkpoint: list, settings: InferenceSettings, threads: int, fault: str | None = None,
                 postprocess_encoding: str | None = None):
        import ray
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        ck = from_shippable(ray.get(checkpoint[0]))
        self.predictor = Predictor(ck.model, ck.convention, settings)
        ctx = ray.get_runtime_context()
        self.info = json.dumps({"node_id": ctx.get_node_id(), "pid": os.getpid(),
                                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                                "device": str(self.predictor.device), "threads": threads,
                                "ready_at": round(time.time(), 3)}, sort_keys=True)
        self.fault = fault
        self.postprocess_encoding = postprocess_encoding

    def _maybe_fault(self) -> None:
        if self.fault and self.fault.startswith("kill_actor_once:"):
            marker = self.fault.split(":", 1)[1]
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._maybe_fault()
        n = batch.num_rows
        errors = batch["error"].to_pylist()
        stages = batch["stage"].to_pylist()
        cols = {k: batch[k].to_pylist() for k in ("width", "height", "h", "w", "canvas_h", "canvas_w")}
        canvases = batch["canvas"].to_pylist()
        todo, items = [], []
        for i in range(n):
            if errors[i] is None:
                canvas = np.frombuffer(canvases[i], np.uint8).reshape(cols["canvas_h"][i], cols["canvas_w"][i], 3)
                items.append(Prepared(canvas, cols["h"][i], cols["w"][i], cols["height"][i], cols["width"][i]))
                todo.append(i)
        preds = self.predictor.predict(items) if items else []
        empty_i32 = np.zeros(0, np.int32)
        labels: list[bytes | None] = [None] * n
        per_class = {k: [empty_i32] * n for k in ("class_id", "x_min", "y_min", "x_max", "y_max")}
        counts = [np.zeros(0, np.int64)] * n
        conf = [np.zeros(0, np.float64)] * n
        for i, pred in zip(todo, preds):
            if isinstance(pred, Exception):
                stages[i], errors[i] = "inference", f"{type(pred).__name__}: {pred}".splitlines()[0]
                continue
            labels[i] = pred.label.tobytes()
            for k in per_class:
                per_class[k][i] = getattr(pred, k)
            counts[i] = pred.pixel_count
            conf[i] = pred.confidence_sum
        i32 = pa.list_(pa.int32())
        result = pa.table({
            "image_uri": batch["image_uri"], "image_version": batch["image_version"],
            "width": batch["width"], "height": batch["height"], "label_raw": pa.array(labels, pa.binary()),
            "stat_class_id": list_column(per_class["class_id"], i32),
            "stat_pixel_count": list_column(counts, pa.list_(pa.int64())),
            "stat_confidence_sum": list_column(conf, pa.list_(pa.float64())),
            "stat_x_min": list_column(per_class["x_min"], i32), "stat_y_min": list_column(per_class["y_min"], i32),
            "stat_x_max": list_column(per_class["x_max"], i32), "stat_y_max": list_column(per_class["y_max"], i32),
            "stage": pa.array(stages, pa.string()), "error": pa.array(errors, pa.string()),
            "actor": pa.array([self.info] * n, pa.string()),
        })
        if self.postprocess_encoding is not None:  # fused: see build_dataset
            return postprocess_stage(result, encoding=self.postprocess_encoding)
        return result


def build_dataset(files: list[storage.FileInfo], *, checkpoint_ref, plan: ResourcePlan, config: LabelConfig):
    """The streaming Ray Dataset of result rows (RESULT_SCHEMA) for `files`."""
    import ray

    items = [{"image_uri": f.uri, "image_version": f.version, "image_size": int(f.size)} for f in files]
    blocks = max(1, min(len(items), math.ceil(len(items) / config.rows_per_read_task)))
    settings = InferenceSettings(max_side=config.max_side, canvas_multiple=config.canvas_multiple,
                                 batch_size=plan.batch_size, device=plan.device, amp=config.amp)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(read_stage, batch_size=None, batch_format="pyarrow", num_cpus=plan.task_cpus,
                        fn_kwargs={"max_bytes": max(256 * 1024**2, 8 * config.max_pixels)})
    ds = ds.map_batches(decode_stage, batch_size=None, batch_format="pyarrow", num_cpus=plan.task_cpus,
                        fn_kwargs={"max_pixels": config.max_pixels, "max_side": config.max_side,
                                   "canvas_multiple": config.canvas_multiple})
    # Postprocess: with raw label maps it is a few array operations, done by the inference actor at the end of
    # each batch; PNG encoding is real CPU work, kept off the (GPU) inference actors in its own small,
    # long-lived actors (tasks would start a worker process, torch import included, per call on small nodes).
    separate = config.label_encoding != "raw"
    ds = ds.map_batches(
        InferenceActor, batch_size=config.rows_per_actor_call or 4 * plan.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.pool), num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus,
        fn_constructor_kwargs={"checkpoint": [checkpoint_ref], "settings": settings, "threads": plan.threads,
                               "fault": config.fault,
                               "postprocess_encoding": None if separate else config.label_encoding})
    if separate:
        ds = ds.map_batches(Postprocessor, batch_size=None, batch_format="pyarrow", num_cpus=plan.task_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, plan.pool)),
                            fn_constructor_kwargs={"encoding": config.label_encoding})
    return ds


# --------------------------------------------------------------------------------------------- writer


@dataclass
class _Preview:
    uri: str
    label_map: bytes
    encoding: str
    height: int
    width: int


@dataclass
class FilesetWriter:
    """Driver side: buffers result rows and commits them in file sets of about rows_per_file images."""

    output: str
    run_id: str
    run_date: str
    model_id: str
    class_names: list[str]
    rows_per_file: int
    bytes_per_file: int
    previews_wanted: int = 0
    labelled: int = 0
    errors: int = 0
    filesets: int = 0
    files: dict = field(default_factory=lambda: {t: 0 for t in out.TABLES})
    actors: set = field(default_factory=set)
    previews: list = field(default_factory=list)
    _pending: dict = field(default_factory=lambda: {t: [] for t in out.TABLES})
    _rows: int = 0
    _bytes: int = 0

    def add(self, block: pa.Table) -> None:
        """Buffer result rows; commit a file set whenever rows_per_file images (or bytes_per_file) are pending."""
        start = 0
        while start < block.num_rows:
            take = max(1, self.rows_per_file - self._rows)
            self._add(block.slice(start, take))
            start += take

    def _add(self, block: pa.Table) -> None:
        self.actors.update(a for a in block["actor"].to_pylist() if a)
        tables = out.split_results(block, model_id=self.model_id, run_id=self.run_id, class_names=self.class_names)
        labels = tables["labels"]
        if len(self.previews) < self.previews_wanted and labels.num_rows:
            for row in labels.slice(0, self.previews_wanted - len(self.previews)).select(
                    ["image_uri", "label_map", "label_encoding", "height", "width"]).to_pylist():
                self.previews.append(_Preview(row["image_uri"], row["label_map"], row["label_encoding"],
                                              row["height"], row["width"]))
        for name, table in tables.items():
            if table.num_rows:
                self._pending[name].append(table)
        self._rows += block.num_rows
        self._bytes += labels["label_map"].nbytes if labels.num_rows else 0
        if self._rows >= self.rows_per_file or self._bytes >= self.bytes_per_file:
            self.flush()

    def flush(self, final: bool = False) -> None:
        tables = {name: pa.concat_tables(parts) for name, parts in self._pending.items() if parts}
        if final:
            # Readers glob each table's folder: make sure every table has at least one (maybe empty) file.
            for name in out.TABLES:
                if name not in tables and self.files[name] == 0 and not out.list_table_files(self.output, name):
                    tables[name] = out.SCHEMAS[name].empty_table()
        if not tables:
            return
        self.filesets += 1
        written = out.commit_fileset(self.output, f"{self.run_id}-{self.filesets:05d}", self.run_date, tables)
        for name, rows in written.items():
            self.files[name] += 1
        self.labelled += written.get("labels", 0)
        self.errors += written.get("errors", 0)
        self._pending = {t: [] for t in out.TABLES}
        self._rows = self._bytes = 0


# ----------------------------------------------------------------------------------------------- job


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def _load_checkpoint(uri: str):
    """(bytes, Checkpoint) with every problem as one CheckpointError/StorageError line."""
    uri = storage.normalize(uri)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {uri}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {uri} is a directory, not a file") from None
    return data, load_checkpoint_bytes(data, uri)


def _write_previews(writer: FilesetWriter, config: LabelConfig) -> int:
    from .previews import render_overlay

    written = 0
    for p in writer.previews:
        try:
            rgb = decode_image(storage.read_bytes(p.uri), max_pixels=config.max_pixels)
            label = out.decode_label_map(p.label_map, p.encoding, p.height, p.width)
            png = render_overlay(rgb, label, writer.class_names)
        except Exception as e:  # noqa: BLE001 - a preview is never worth failing the run
            log.warning("no preview for %s: %s", p.uri, e)
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.uri.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:80]
        name = f"{stem}-{hashlib.sha1(p.uri.encode()).hexdigest()[:8]}.png"
        storage.write_bytes(storage.join(config.output, "previews", f"run_date={writer.run_date}", writer.run_id, name), png)
        written += 1
    return written


def _init_ray(config: LabelConfig):
    import ray

    from .ray_setup import init_ray

    init_ray(config.ray_address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False,
             logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    progress = sys.stderr.isatty() if config.progress is None else config.progress
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    return ray


def label_images(config: LabelConfig) -> dict:
    """Run the labeling job; returns the summary (also written to runs/<run_id>.json).

    Fails fast, before any work, on bad arguments, an unusable checkpoint or an unreachable/missing
    images or output location (CheckpointError / StorageError / ValueError, one line each).
    """
    t0 = time.monotonic()
    t0_epoch = time.time()
    timings: dict[str, float] = {}
    config.validate()
    config.images = storage.normalize(config.images)
    config.output = storage.normalize(config.output)
    config.checkpoint = storage.normalize(config.checkpoint)
    data, ck = _load_checkpoint(config.checkpoint)
    model_id = ck.model_id
    class_names = list(ck.class_names)
    if ck.config.num_classes > 256:
        raise ValueError(f"label maps are uint8: at most 256 classes, the checkpoint has {ck.config.num_classes}")
    timings["checkpoint"] = time.monotonic() - t0
    storage.check_writable(config.output)
    files = list_images(config.images)
    started = datetime.now(timezone.utc)
    run_id = config.run_id or new_run_id(started)
    run_date = config.run_date or started.strftime("%Y-%m-%d")

    recovered = out.recover(config.output)
    prefix = config.output.rstrip("/") + "/"
    files = [f for f in files if not f.uri.startswith(prefix)]  # never label our own previews
    listed = len(files)
    done = set() if config.force else out.labelled_keys(config.output, model_id)
    todo = [f for f in files if (f.uri, f.version) not in done]
    skipped = listed - len(todo)
    timings["list_and_skip"] = time.monotonic() - t0 - timings["checkpoint"]

    run_uri = storage.join(config.output, "runs", f"{run_id}.json")
    record = {"run_id": run_id, "run_date": run_date, "status": "running", "started_at": started.isoformat(),
              "arguments": {k: v for k, v in asdict(config).items() if k != "fault"}, "model_id": model_id,
              "counts": {"listed": listed, "already_labelled": skipped, "to_label": len(todo)},
              "recovered": recovered}
    storage.write_text(run_uri, json.dumps(record, indent=1, sort_keys=True))

    writer = FilesetWriter(config.output, run_id, run_date, model_id, class_names, config.rows_per_file,
                           config.bytes_per_file, previews_wanted=config.previews)
    delay = float(os.environ.get(COMMIT_DELAY_ENV, "0") or 0)
    saved_hook = out._crash_hook
    if delay > 0:
        out._crash_hook = lambda step: time.sleep(delay)
    plan = None
    try:
        if todo:
            t = time.monotonic()
            ray = _init_ray(config)
            plan = plan_resources(config, ray.cluster_resources())
            ref = ray.put(shippable(ck))
            del data, ck
            timings["ray_start"] = time.monotonic() - t
            t = time.monotonic()
            ds = build_dataset(todo, checkpoint_ref=ref, plan=plan, config=config)
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if "first_result" not in timings:
                    timings["first_result"] = time.monotonic() - t
                writer.add(block)
            timings["pipeline"] = time.monotonic() - t
        writer.flush(final=True)
        t = time.monotonic()
        previews = _write_previews(writer, config) if config.previews else 0
        timings["previews"] = time.monotonic() - t
    except BaseException as e:
        record.update(status="failed", error=storage.redact(f"{type(e).__name__}: {e}").splitlines()[0] if str(e) else type(e).__name__,
                      finished_at=datetime.now(timezone.utc).isoformat(),
                      counts={**record["counts"], "labelled": writer.labelled, "errors": writer.errors})
        try:
            storage.write_text(run_uri, json.dumps(record, indent=1, sort_keys=True))
        except Exception:  # noqa: BLE001 - keep the original error
            pass
        raise
    finally:
        out._crash_hook = saved_hook
    wall = time.monotonic() - t0
    actors = sorted((json.loads(a) for a in writer.actors), key=lambda a: (a["node_id"], a["pid"]))
    if actors:  # job start -> first model loaded and ready: the fixed cost of a run
        timings["inference_ready"] = min(a["ready_at"] for a in actors) - t0_epoch
    summary = {
        "run_id": run_id, "run_date": run_date, "status": "succeeded", "model_id": model_id,
        "output": config.output, "listed": listed, "skipped": skipped, "labelled": writer.labelled,
        "errors": writer.errors, "wall_seconds": round(wall, 3),
        "images_per_second": round(writer.labelled / wall, 3) if wall > 0 else None,
        "files": writer.files, "previews": previews, "recovered": recovered,
        "inference_actors": actors, "resources": asdict(plan) if plan else None,
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    record.update(status="succeeded", finished_at=datetime.now(timezone.utc).isoformat(),
                  counts={**record["counts"], "labelled": writer.labelled, "errors": writer.errors},
                  wall_seconds=summary["wall_seconds"], images_per_second=summary["images_per_second"],
                  files=writer.files, previews=previews, inference_actors=actors, resources=summary["resources"])
    storage.write_text(run_uri, json.dumps(record, indent=1, sort_keys=True))
    return summary
