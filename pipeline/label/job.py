"""The nightly labeling job on Ray Data: list images (Ray tasks, or a manifest) -> drop those already labeled
(an anti-join against the index) -> read bytes -> decode and preprocess (CPU tasks) -> model (actor pool: one
actor per GPU, or CPU actors) -> postprocess (in the inference actor for raw maps, in small CPU actors for PNG)
-> stage file sets (write tasks) -> commit (the driver: markers and moves only; pipeline.label.commit).

The driver holds no per-image state: listing, skip and label maps stay in Ray's workers and object store.
One job at a time writes an output root: it holds the root's lease (pipeline.lease) from before recovery to
the end. Every stage handles rows one by one: a file that cannot be read, decoded or labeled becomes an error
row (stage and reason) and travels on to `errors/`; every other row of the same block is labeled.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone

from models import Checkpoint, CheckpointError, load_checkpoint_bytes

from ..errors import one_line
from ..lease import Lease
from ..ray_setup import configure_progress, default_wait_s, init_ray, wait_for_resources
from ..run_guard import guarded_run
from ..storage import Location, redact
from ..telemetry import LabelMetrics
from .commit import recover
from .config import LabelConfig
from .crash_budget import batch_crash
from .dataset import build_dataset
from .filesets import FilesetGrouper
from .inference import shippable
from .layout import OutputLayout
from .listing import Listing, listing_dataset, plan_listing
from .previews import preview_sources, write_previews
from .resources import InsufficientResources, plan_resources, resource_request
from .run_record import RunRecord
from .skip import drop_labeled, ensure_index
from .upgrade import upgrade_tables
from .writer import Committer, OutputSettings

MAX_TODO_BLOCKS = 2_000  # blocks of rows to label: enough to spread reads, few enough references for the driver


def _say(message: str) -> None:
    print(f"[label] {message}", file=sys.stderr, flush=True)


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
        raise CheckpointError(f"label maps are uint8: at most 256 classes, the checkpoint has {ck.config.num_classes}")
    return ck


def _start_ray(config: LabelConfig):
    import ray

    # A job submitted to a cluster joins it ($RAY_ADDRESS); otherwise it starts its own local Ray, never a stray one.
    init_ray(config.ray_address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False,
             logging_level=logging.WARNING)
    configure_progress(config.progress)
    return ray


def _plan_when_ready(config: LabelConfig):
    """The resource plan on the cluster as it is, or as the autoscaler grows it within --wait-for-resources."""
    def problem(resources: dict) -> str | None:
        try:
            plan_resources(config, resources)
        except InsufficientResources as e:
            return str(e)
        return None

    wait_s = default_wait_s(config.ray_address, config.wait_for_resources)
    resources = wait_for_resources(problem, resource_request(config), wait_s, _say)
    return plan_resources(config, resources)


def list_todo(listing: Listing, output: Location, model_id: str, *, force: bool, rows_per_file: int,
              rows_per_read_task: int = LabelConfig.rows_per_read_task):
    """(the rows to label as a materialized Ray Dataset, rows listed, rows to label): the listing minus what the
    index says this model labeled. Both sides live in the object store; the driver holds block references."""
    own = OutputLayout(output).own_prefixes()  # never label our own previews
    rows = listing_dataset(listing, exclude=own).materialize()
    listed = rows.count()
    todo = rows if force or not listed else drop_labeled(rows, output, model_id, listed,
                                                         rows_per_index_file=rows_per_file).materialize()
    to_label = todo.count()
    # Listing and skip leave few, large blocks, and a read task takes whole blocks: split them so reads (and so
    # the inference actors they feed) spread over the cluster. At most MAX_TODO_BLOCKS references in the driver.
    blocks = min(MAX_TODO_BLOCKS, -(-to_label // rows_per_read_task))
    if blocks > todo.num_blocks():
        todo = todo.repartition(blocks).materialize()
    return todo, listed, to_label


def _attempt_name(output: Location, run_id: str) -> str:
    """The run id; a retry with the same run id gets `<run_id>.attempt-<random>`, so its run record and previews
    are written beside the first attempt's, never over them."""
    if not OutputLayout(output).run_record(run_id).exists():
        return run_id
    return f"{run_id}.attempt-{uuid.uuid4().hex[:6]}"


def label_images(config: LabelConfig) -> dict:
    """Run the labeling job; returns the summary (the run record `runs/<run_id>.json` holds the same numbers).

    Fails fast, before any work, on bad arguments, an unusable checkpoint, an unreachable or missing images or
    output location, or another run holding the output (CheckpointError / StorageError / ValueError / JobError,
    one line each).
    """
    config.validate()
    checkpoint = Location.of(config.checkpoint)
    ck = load_checkpoint_at(checkpoint)
    images, output = Location.of(config.images), Location.of(config.output)
    output.check_writable()
    listing = plan_listing(images, config.manifest)  # a missing prefix or a wrong manifest fails here
    started = datetime.now(timezone.utc)
    run_id = config.run_id or new_run_id(started)
    with guarded_run(output, holder=f"labeling run {run_id}", what=f"output {output.uri}") as lease:
        return _label(config, ck, checkpoint, listing, output, run_id, started, lease)


def _label(config: LabelConfig, ck: Checkpoint, checkpoint: Location, listing: Listing, output: Location,
           run_id: str, started: datetime, lease: Lease) -> dict:
    t0, t0_epoch = time.monotonic(), time.time()
    timings: dict[str, float] = {}
    run_date = config.run_date or started.strftime("%Y-%m-%d")
    recovered = recover(output)
    ray = _start_ray(config)
    metrics = LabelMetrics(run_id, t0)  # Prometheus, through Ray's metrics agent (pipeline.telemetry)
    try:
        plan = _plan_when_ready(config)
        if plan.decode_warning():
            _say(f"warning: {plan.decode_warning()}")
        timings["ray_start_and_resources"] = time.monotonic() - t0
        t = time.monotonic()
        upgrade_tables(output, run_id)  # older files get today's columns before this run adds any (once per output)
        ensure_index(output)
        todo, listed, to_label = list_todo(listing, output, ck.model_id, force=config.force,
                                           rows_per_file=max(config.rows_per_file, config.images_per_small_file),
                                           rows_per_read_task=config.rows_per_read_task)
        timings["list_and_skip"] = time.monotonic() - t
        metrics.listed(listed, listed - to_label)

        images = listing.images
        arguments = {**config.to_dict(), "images": images.uri, "output": output.uri, "checkpoint": checkpoint.uri}
        attempt = _attempt_name(output, run_id)
        record = RunRecord(OutputLayout(output).run_record(attempt), run_id, run_date, ck.model_id, output.uri,
                           arguments, started, listed=listed, already_labeled=listed - to_label, recovered=recovered)
        record.save()
        committer = Committer(output, run_id, run_date, ck.model_id, before_commit=lease.check)
        try:
            with metrics.watch(committer):
                previews = _run_pipeline(ray, config, ck, todo, to_label, None if listing.manifest_paths else images,
                                         output, run_id, run_date, plan, committer, timings,
                                         previews_folder=OutputLayout(output).previews(run_date, attempt))
        except BaseException as e:
            crashed = batch_crash(e)  # a batch that keeps killing its actor: its one line, not Ray's traceback
            try:
                record.finish("failed", labeled=committer.labeled, errors=committer.errors,
                              wall_seconds=time.monotonic() - t0,
                              error=redact(one_line(crashed or e)) if str(e) else type(e).__name__)
            except Exception:  # noqa: BLE001 - keep the original error
                pass
            if crashed is not None:
                raise crashed from None
            raise
    finally:
        metrics.finished()
    actors = _actors(committer.actors)
    if actors:  # job start -> first model loaded and ready: the fixed cost of a run
        timings["inference_ready"] = min(a["ready_at"] for a in actors) - t0_epoch
    record.finish("succeeded", labeled=committer.labeled, errors=committer.errors, wall_seconds=time.monotonic() - t0,
                  files=committer.files, previews=previews, inference_actors=actors, resources=asdict(plan),
                  driver_bytes=committer.driver_bytes, timings_seconds={k: round(v, 3) for k, v in timings.items()},
                  inference=_inference_summary(config, plan, ck, actors))
    metrics.finished(record.summary())
    return record.summary()


def _actors(seen: set[str]) -> list[dict]:
    """One entry per inference actor process (its info grows a compile_seconds as it compiles shapes: the
    latest, i.e. largest, is kept)."""
    latest: dict[tuple, dict] = {}
    for a in map(json.loads, seen):
        key = (a["node_id"], a["pid"])
        if a.get("compile_seconds", 0) >= latest.get(key, {}).get("compile_seconds", 0):
            latest[key] = a
    return [latest[k] for k in sorted(latest)]


def _inference_summary(config: LabelConfig, plan, ck: Checkpoint, actors: list[dict]) -> dict:
    """The kernel levers of the run (README "Inference settings") and what they did with this checkpoint."""
    from models import is_bilinear, upsamplers

    summary = config.inference_settings(batch_size=plan.batch_size, device=plan.device).levers()
    summary["upsampling"] = {name: ("dense (--no-grouped-upsampling)" if not config.grouped_upsampling else
                                    "grouped" if is_bilinear(layer) else "dense (weights are not the bilinear kernel)")
                             for name, layer in upsamplers(ck.model).items()}
    summary["compile_seconds"] = round(sum(a.get("compile_seconds", 0) for a in actors), 1)
    return summary


class ProgressLog:
    """One line every `interval` seconds while the pipeline runs: committed counts, images/s, errors so far.
    From a thread, so a run whose first commit takes minutes (actors starting, autoscaling) still says so."""

    def __init__(self, committer: Committer, to_label: int, interval: float):
        self.committer, self.to_label, self.interval = committer, to_label, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="label-progress", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> "ProgressLog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            done = self.committer.labeled + self.committer.errors
            seconds = time.monotonic() - self._started
            _say(f"progress: {done:,} of {self.to_label:,} images committed ({100 * done / max(1, self.to_label):.0f}%), "
                 f"{self.committer.errors:,} errors, {done / seconds:.1f} images/s over {seconds:.0f} s")


def _run_pipeline(ray, config: LabelConfig, ck: Checkpoint, todo, to_label: int, listed_by: Location | None,
                  output: Location, run_id: str, run_date: str, plan, committer: Committer, timings: dict, *,
                  previews_folder: Location) -> int:
    """Label `todo`, committing file sets as the write tasks stage them; then previews. Returns previews written."""
    if to_label:
        ref = ray.put(shippable(ck))  # the object store holds the weights; every actor gets them from there
        t = time.monotonic()
        settings = OutputSettings(output, run_id, run_date, ck.model_id, tuple(ck.class_names), config.bytes_per_file,
                                  config.rows_per_file)
        ds = build_dataset(todo, listed_by, checkpoint_ref=ref, plan=plan, config=config, output=settings)
        # Staged blocks of images_per_small_file images become one file set (filesets.py).
        grouper = FilesetGrouper(config.images_per_small_file, settings, plan.task_cpus)
        with ProgressLog(committer, to_label, config.progress_interval_s):
            for staged in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                timings.setdefault("first_result", time.monotonic() - t)
                for group in grouper.add(staged):
                    committer.commit(group)
            for group in grouper.flush():
                committer.commit(group)
        timings["pipeline"] = time.monotonic() - t
    committer.finish()
    t = time.monotonic()
    previews = 0
    if config.previews:
        sources = preview_sources(output, committer.labels_files, config.previews)
        previews = write_previews(sources, listed_by=listed_by, class_names=list(ck.class_names),
                                  folder=previews_folder,
                                  max_pixels=config.max_pixels, max_bytes=config.read_limit)
    timings["previews"] = time.monotonic() - t
    return previews
