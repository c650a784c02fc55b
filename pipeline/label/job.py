"""The nightly labeling job on Ray Data: list images -> drop those already labeled -> read bytes -> decode
and preprocess (CPU tasks) -> model (actor pool: one actor per GPU, or CPU actors) -> postprocess (label map
encoding, per-class fractions; in the inference actor for raw maps, in small CPU actors for PNG) -> write
(the driver, with the exactly-once protocol of `pipeline.label.commit`).

Every stage handles rows one by one: a file that cannot be read, decoded or labeled becomes an error row
(stage and reason) and travels on to `errors/`; every other row of the same block is labeled.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone

from models import Checkpoint, CheckpointError, load_checkpoint_bytes

from ..dataset_formats import list_images
from ..errors import one_line
from ..ray_setup import init_ray
from ..storage import Location, redact
from .commit import OWN_FOLDERS, PREVIEWS, RUNS, recover
from .config import LabelConfig
from .dataset import build_dataset
from .inference import shippable
from .previews import write_previews
from .readers import labeled_keys
from .resources import plan_resources
from .run_record import RunRecord
from .writer import FilesetWriter


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def load_checkpoint_at(location: Location) -> Checkpoint:
    """The checkpoint, with every problem as one CheckpointError/StorageError line."""
    try:
        data = location.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {location.uri}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {location.uri} is a directory, not a file") from None
    ck = load_checkpoint_bytes(data, location.uri)
    if ck.config.num_classes > 256:
        raise ValueError(f"label maps are uint8: at most 256 classes, the checkpoint has {ck.config.num_classes}")
    return ck


def _start_ray(config: LabelConfig):
    import ray

    # A job submitted to a cluster joins it ($RAY_ADDRESS); otherwise it starts its own local Ray, never a stray one.
    init_ray(config.ray_address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False,
             logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    progress = sys.stderr.isatty() if config.progress is None else config.progress
    ctx.enable_progress_bars = progress
    ctx.enable_operator_progress_bars = progress
    return ray


def label_images(config: LabelConfig) -> dict:
    """Run the labeling job; returns the summary (the run record `runs/<run_id>.json` holds the same numbers).

    Fails fast, before any work, on bad arguments, an unusable checkpoint or an unreachable/missing
    images or output location (CheckpointError / StorageError / ValueError, one line each).
    """
    t0, t0_epoch = time.monotonic(), time.time()
    timings: dict[str, float] = {}
    config.validate()
    checkpoint = Location.of(config.checkpoint)
    ck = load_checkpoint_at(checkpoint)
    images, output = Location.of(config.images), Location.of(config.output)
    timings["checkpoint"] = time.monotonic() - t0
    output.check_writable()
    files = list_images(images)
    started = datetime.now(timezone.utc)
    run_id = config.run_id or new_run_id(started)
    run_date = config.run_date or started.strftime("%Y-%m-%d")

    recovered = recover(output)
    own = tuple(output.child(folder).uri + "/" for folder in OWN_FOLDERS)
    files = [f for f in files if not f.uri.startswith(own)]  # never label our own previews
    done = set() if config.force else labeled_keys(output, ck.model_id)
    todo = [f for f in files if (f.uri, f.version) not in done]
    timings["list_and_skip"] = time.monotonic() - t0 - timings["checkpoint"]

    arguments = {**config.to_dict(), "images": images.uri, "output": output.uri, "checkpoint": checkpoint.uri}
    record = RunRecord(output.child(RUNS, f"{run_id}.json"), run_id, run_date, ck.model_id, output.uri, arguments,
                       started, listed=len(files), already_labeled=len(files) - len(todo), recovered=recovered)
    record.save()

    writer = FilesetWriter(output, run_id, run_date, ck.model_id, list(ck.class_names), config.rows_per_file,
                           config.bytes_per_file, previews_wanted=config.previews)
    plan = None
    try:
        if todo:
            t = time.monotonic()
            ray = _start_ray(config)
            plan = plan_resources(config, ray.cluster_resources())
            ref = ray.put(shippable(ck))
            del ck  # the object store holds the weights now
            timings["ray_start"] = time.monotonic() - t
            t = time.monotonic()
            ds = build_dataset(todo, images, checkpoint_ref=ref, plan=plan, config=config)
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                timings.setdefault("first_result", time.monotonic() - t)
                writer.add(block)
            timings["pipeline"] = time.monotonic() - t
        writer.flush(final=True)
        t = time.monotonic()
        previews = write_previews(writer.previews, images=images, class_names=writer.class_names,
                                  folder=output.child(PREVIEWS, f"run_date={run_date}", run_id),
                                  max_pixels=config.max_pixels, max_bytes=config.read_limit)
        timings["previews"] = time.monotonic() - t
    except BaseException as e:
        try:
            record.finish("failed", labeled=writer.labeled, errors=writer.errors, wall_seconds=time.monotonic() - t0,
                          error=redact(one_line(e)) if str(e) else type(e).__name__)
        except Exception:  # noqa: BLE001 - keep the original error
            pass
        raise
    actors = sorted((json.loads(a) for a in writer.actors), key=lambda a: (a["node_id"], a["pid"]))
    if actors:  # job start -> first model loaded and ready: the fixed cost of a run
        timings["inference_ready"] = min(a["ready_at"] for a in actors) - t0_epoch
    record.finish("succeeded", labeled=writer.labeled, errors=writer.errors, wall_seconds=time.monotonic() - t0,
                  files=writer.files, previews=previews, inference_actors=actors,
                  resources=asdict(plan) if plan else None,
                  timings_seconds={k: round(v, 3) for k, v in timings.items()})
    return record.summary()
