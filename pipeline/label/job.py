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
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import ray

from models import MAX_CLASSES, Checkpoint, CheckpointError, load_checkpoint_bytes, shippable

from ..errors import one_line
from ..lease import Lease
from ..ray_setup import configure_progress, init_ray
from ..run_guard import guarded_run
from ..storage import Location, redact
from ..telemetry import LabelMetrics
from .canary import CanarySet, canary_rows, load_canary, minimum_iou, score_canary, verdict
from .commit import recover
from .config import LabelConfig
from .crash_budget import batch_crash
from .dataset import build_dataset, labeled_rows
from .filesets import FilesetGrouper
from .inference_settings import InferenceSettings
from .layout import OutputLayout
from .listing import Listing, listing_dataset, plan_listing
from .previews import preview_sources, write_previews
from .quality import compute_quality
from .resources import ResourcePlan, plan_when_ready
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
    if ck.config.num_classes > MAX_CLASSES:
        raise CheckpointError(f"label maps are uint8: at most {MAX_CLASSES} classes, the checkpoint has "
                              f"{ck.config.num_classes}")
    return ck


@dataclass(frozen=True)
class LabelRun:
    """One labeling run as the driver settles it before any work (`label_images`): the flags, the checkpoint, where
    the images come from and the results go, the run's names and the output's lease. Made once, then handed down
    whole; what Ray decides later (the resource plan, and with it the InferenceSettings) travels beside it."""

    config: LabelConfig
    ck: Checkpoint
    checkpoint: Location       # where `ck` was read
    listing: Listing
    output: Location
    run_id: str
    run_date: str              # the partition value YYYY-MM-DD
    started: datetime
    lease: Lease
    canary: CanarySet | None = None   # --canary, read and checked against the checkpoint before the lease

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.output)

    @property
    def listed_by(self) -> Location | None:
        """Where the listed rows are read from (None: a manifest's rows, each through the filesystem its URI names)."""
        return None if self.listing.manifest_paths else self.listing.images

    def arguments(self) -> dict:
        """The run record's arguments: the flags, with the locations as this run resolved them."""
        return {**self.config.to_dict(), "images": self.listing.images.uri, "output": self.output.uri,
                "checkpoint": self.checkpoint.uri}

    def output_settings(self) -> OutputSettings:
        return OutputSettings(self.output, self.run_id, self.run_date, self.ck.model_id, tuple(self.ck.class_names),
                              self.config.bytes_per_file, self.config.rows_per_file)


def _start_ray(config: LabelConfig) -> None:
    # A job submitted to a cluster joins it ($RAY_ADDRESS); otherwise it starts its own local Ray, never a stray one.
    init_ray(config.ray_address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False,
             logging_level=logging.WARNING)
    configure_progress(config.progress)


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
    canary = load_canary(Location.of(config.canary), config.canary_split, ck, checkpoint.uri) if config.canary else None
    started = datetime.now(timezone.utc)
    run_id = config.run_id or new_run_id(started)
    run_date = config.run_date or started.strftime("%Y-%m-%d")
    with guarded_run(output, holder=f"labeling run {run_id}", what=f"output {output.uri}") as lease:
        return _label(LabelRun(config, ck, checkpoint, listing, output, run_id, run_date, started, lease, canary))


def _label(run: LabelRun) -> dict:
    config, output, ck = run.config, run.output, run.ck
    t0, t0_epoch = time.monotonic(), time.time()
    timings: dict[str, float] = {}
    recovered = recover(output)
    _start_ray(config)
    metrics = LabelMetrics(run.run_id, t0)  # Prometheus, through Ray's metrics agent (pipeline.telemetry)
    try:
        plan = plan_when_ready(config, _say)
        settings = config.inference_settings(batch_size=plan.batch_size, device=plan.device)  # the run's one
        if plan.decode_warning():
            _say(f"warning: {plan.decode_warning()}")
        timings["ray_start_and_resources"] = time.monotonic() - t0
        t = time.monotonic()
        upgrade_tables(output, run.run_id)  # older files get today's columns before this run adds any (once per output)
        ensure_index(output)
        todo, listed, to_label = list_todo(run.listing, output, ck.model_id, force=config.force,
                                           rows_per_file=max(config.rows_per_file, config.images_per_small_file),
                                           rows_per_read_task=config.rows_per_read_task)
        timings["list_and_skip"] = time.monotonic() - t
        metrics.listed(listed, listed - to_label)

        attempt = _attempt_name(output, run.run_id)
        record = RunRecord(run.layout.run_record(attempt), run.run_id, run.run_date, ck.model_id, output.uri,
                           run.arguments(), run.started, listed=listed, already_labeled=listed - to_label,
                           recovered=recovered)
        record.save()
        committer = Committer(output, run.run_id, run.run_date, ck.model_id, before_commit=run.lease.check)
        try:
            with metrics.watch(committer):
                if to_label:
                    timings.update(_label_todo(run, plan, settings, todo, to_label, committer))
                committer.finish()
                t = time.monotonic()
                previews = _write_previews(run, committer, run.layout.previews(run.run_date, attempt))
                timings["previews"] = time.monotonic() - t
                canary = None
                if run.canary:
                    t = time.monotonic()
                    canary = _score_canary(run, plan, settings)
                    timings["canary"] = time.monotonic() - t
                t = time.monotonic()
                quality = _quality_row(run, canary)
                timings["quality"] = time.monotonic() - t
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
    status = "degraded" if canary and verdict(canary) else "succeeded"
    record.finish(status, labeled=committer.labeled, errors=committer.errors, wall_seconds=time.monotonic() - t0,
                  files=committer.files, previews=previews, inference_actors=actors, resources=asdict(plan),
                  driver_bytes=committer.driver_bytes, timings_seconds={k: round(v, 3) for k, v in timings.items()},
                  inference=_inference_summary(settings, ck, actors), canary=canary, quality=quality,
                  class_names=list(ck.class_names))
    metrics.judged(canary, quality)
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


def _inference_summary(settings: InferenceSettings, ck: Checkpoint, actors: list[dict]) -> dict:
    """The kernel levers of the run (docs/labeling.md "Inference settings") and what they did with this checkpoint."""
    from models import is_bilinear, upsamplers

    summary = settings.levers()
    summary["upsampling"] = {name: ("dense (--no-grouped-upsampling)" if not settings.grouped_upsampling else
                                    "grouped" if is_bilinear(layer) else "dense (weights are not the bilinear kernel)")
                             for name, layer in upsamplers(ck.model).items()}
    summary["compile_seconds"] = round(sum(a.get("compile_seconds", 0) for a in actors), 1)
    summary["low_confidence"] = settings.low_confidence  # labels.low_confidence_fraction's threshold
    summary["tiling"] = _tiling_summary(settings, ck)
    return summary


def _tiling_summary(settings: InferenceSettings, ck: Checkpoint) -> dict | None:
    """--tile's settings (labels.tiles counts each image's tiles) and how the tiles' logits are sampled for blending
    (pipeline.label.blend); None without --tile."""
    from models import output_knots

    if settings.tiling is None:
        return None
    knots = output_knots(ck.model)
    cells = ("the model's own score cells (bilinear output, stride {}, phase {})".format(*knots) if knots else
             "cell centres (the last upsampler is not bilinear: labels may differ slightly from a whole-image pass)")
    return {**settings.tiling.to_dict(), "score_cells": cells}


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


def _label_todo(run: LabelRun, plan: ResourcePlan, settings: InferenceSettings, todo, to_label: int,
                committer: Committer) -> dict[str, float]:
    """Label `todo` on actors as `plan` places them with `settings`, committing file sets as the write tasks stage
    them. Returns its timings (seconds to the first staged block, and in all)."""
    ref = ray.put(shippable(run.ck))  # the object store holds the weights; every actor gets them from there
    t = time.monotonic()
    timings: dict[str, float] = {}
    output = run.output_settings()
    ds = build_dataset(todo, run.listed_by, checkpoint_ref=ref, plan=plan, settings=settings, config=run.config,
                       output=output)
    # Staged blocks of images_per_small_file images become one file set (filesets.py).
    grouper = FilesetGrouper(run.config.images_per_small_file, output, plan.task_cpus)
    with ProgressLog(committer, to_label, run.config.progress_interval_s):
        for staged in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            timings.setdefault("first_result", time.monotonic() - t)
            for group in grouper.add(staged):
                committer.commit(group)
        for group in grouper.flush():
            committer.commit(group)
    timings["pipeline"] = time.monotonic() - t
    return timings


def _quality_row(run: LabelRun, canary: dict | None) -> dict | None:
    """The run's quality/ row (pipeline.label.quality), from what it committed. Its labels are safe whatever
    happens here: a failure is one warning line saying how to compute the row later, and the run goes on."""
    try:
        row = compute_quality(run.output, run_id=run.run_id, run_date=run.run_date, model_id=run.ck.model_id,
                              class_names=list(run.ck.class_names), canary=canary)
    except Exception as e:  # noqa: BLE001 - everything is committed; the row can be recomputed
        _say(f"warning: no quality row ({one_line(e)}): compute it with python jobs/quality.py --output "
             f"{run.output.uri} --run-id {run.run_id}")
        return None
    return {k: row[k] for k in ("images_labeled", "images_failed", "mean_confidence", "low_confidence_image_share",
                                "window_runs", "js_distance", "mean_confidence_change", "low_confidence_share_ratio")}


def _score_canary(run: LabelRun, plan: ResourcePlan, settings: InferenceSettings) -> dict:
    """Label the canary set on actors like the run's (same checkpoint, settings and placement; raw label maps,
    which never leave this step) and score it against its masks."""
    min_iou, source = minimum_iou(run.config.canary_min_iou, run.ck)
    ref = ray.put(shippable(run.ck))
    labeled = labeled_rows(canary_rows(run.canary), None, checkpoint_ref=ref, plan=plan, settings=settings,
                           config=run.config, encoding="raw")
    canary = score_canary(run.canary, labeled, num_classes=run.ck.config.num_classes, min_iou=min_iou, source=source)
    if canary["failed"]:
        named = "; ".join(f"{f['image']} ({f['stage']}: {f['error']})" for f in canary["failed_images"][:3])
        _say(f"canary: {canary['failed']} of {canary['images']} images could not be scored: {named}"
             f"{' ...' if canary['failed'] > 3 else ''}")
    return canary


def _write_previews(run: LabelRun, committer: Committer, folder: Location) -> int:
    """--previews overlays of this run's labels into `folder`; returns how many were written."""
    config = run.config
    if not config.previews:
        return 0
    sources = preview_sources(run.output, committer.labels_files, config.previews)
    return write_previews(sources, listed_by=run.listed_by, class_names=list(run.ck.class_names), folder=folder,
                          max_pixels=config.max_pixels, max_bytes=config.read_limit)
