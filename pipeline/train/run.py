"""Driver side of a training run: check everything that can be checked before any cluster work, build the
Ray Data inputs, run Ray Train's TorchTrainer, and summarise from what storage durably holds."""
from __future__ import annotations

import math
import sys
from dataclasses import replace
from datetime import datetime, timezone

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from models import TORCHVISION, VOC_CLASSES, CheckpointError, InputConvention, ModelConfig, read_checkpoint_payload

from .. import faults
from ..dataset_formats import classes_file, list_samples, read_class_names
from ..errors import JobError
from ..ray_setup import (
    cluster_capacity,
    configure_progress,
    default_wait_s,
    init_ray,
    wait_for_resources,
)
from ..run_guard import guarded_run
from ..storage import Location, StorageError, normalize
from ..telemetry import TrainMetrics
from .config import TrainConfig
from .inputs import segmentation_dataset, start_bad_sample_log
from .loop import InputStalled, train_loop_per_worker
from .run_state import ledger, run_location, scan_checkpoints, stored_config
from .transforms import TrainTransform

# What a resumed run must share with the run that wrote its checkpoints (the weights and the optimiser state).
RESUME_FIELDS = ("model", "num_classes", "width_mult", "padding", "optimizer")


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, Location, Location]:
    """Validate the options and resolve the run's storage, once, in the driver: (the config with its paths
    absolute, dataset, run directory). The driver, Ray's tasks and the training workers share these Locations."""
    cfg.validate()
    cfg = resolve_paths(cfg)
    return cfg, Location.of(cfg.data), run_location(cfg.storage, cfg.name)


def preflight(cfg: TrainConfig, data: Location, run: Location) -> tuple[TrainConfig, list, list, list[str],
                                                                      InputConvention]:
    """Check the dataset, initialisation source and storage of a resolved config (`resolve`); raise one clear
    error otherwise. Returns the config the run trains with (num_classes from the dataset when it was left out),
    the train and val samples, the class names and the input convention."""
    train = list_samples(data, cfg.train_split)
    val = list_samples(data, cfg.val_split)

    class_names = read_class_names(data)
    if cfg.num_classes is None:
        cfg = replace(cfg, num_classes=len(class_names) if class_names is not None else len(VOC_CLASSES))
    ModelConfig(cfg.model, cfg.num_classes, cfg.width_mult, cfg.padding)  # raises ValueError on bad choices
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise JobError(f"--num-classes {cfg.num_classes} does not match the {len(class_names)} classes in "
                       f"{classes_file(data).uri} ({', '.join(class_names[:6])}...)")
    if class_names is None:
        class_names = list(VOC_CLASSES) if cfg.num_classes == len(VOC_CLASSES) else [f"class_{i}" for i in range(cfg.num_classes)]

    convention = TORCHVISION
    if cfg.init_from:
        payload, _ = read_checkpoint_payload(cfg.init_from)
        src = ModelConfig(**payload["config"])
        if src.num_classes != cfg.num_classes:
            raise CheckpointError(f"checkpoint {cfg.init_from} predicts {src.num_classes} classes, but --num-classes is {cfg.num_classes}")
        if (src.width_mult, src.padding) != (cfg.width_mult, cfg.padding):
            raise CheckpointError(f"checkpoint {cfg.init_from} has width_mult={src.width_mult}, padding={src.padding}; "
                                  f"the run asks for width_mult={cfg.width_mult}, padding={cfg.padding}")
        convention = InputConvention.from_dict(payload["input"])
    elif cfg.backbone_weights not in ("none", "imagenet"):
        Location.of(cfg.backbone_weights).check_exists("VGG16 weights file")
        if cfg.width_mult != 1.0:
            raise JobError("--backbone-weights needs --width-mult 1.0 (pretrained VGG16 has full width)")
    run.check_writable()
    check_resumable(cfg, scan_checkpoints(run))
    return cfg, train, val, class_names, convention


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with every path absolute, here in the driver: Ray Train's workers run in another working directory
    (a relative --storage put metrics.jsonl and ledger/ there). jobs/train.py resolves them when it parses them."""
    keyword = cfg.backbone_weights in ("none", "imagenet")
    return replace(cfg, data=normalize(cfg.data), storage=normalize(cfg.storage),
                   init_from=normalize(cfg.init_from) if cfg.init_from else cfg.init_from,
                   backbone_weights=cfg.backbone_weights if keyword else normalize(cfg.backbone_weights))


def check_resumable(cfg: TrainConfig, checkpoints: list[dict]) -> None:
    """A rerun of an existing run must keep its architecture and optimiser; name every field that differs."""
    if not checkpoints:
        return
    stored = stored_config(checkpoints[-1]) or {}
    differ = [f"--{k.replace('_', '-')} {stored[k]} (this run: {getattr(cfg, k)})"
              for k in RESUME_FIELDS if k in stored and stored[k] != getattr(cfg, k)]
    if differ:
        raise JobError(f"run {checkpoints[-1]['uri'].rsplit('/', 1)[0]} was trained with {'; '.join(differ)}: resume "
                       "it with the same values, or start a new run with another --name")


def accelerator_resource(cfg: TrainConfig) -> str | None:
    """The Ray resource of --accelerator-type (Ray advertises `accelerator_type:<type>` on GPU nodes)."""
    return f"accelerator_type:{cfg.accelerator_type}" if cfg.use_gpu and cfg.accelerator_type else None


def check_cluster_fits(cfg: TrainConfig) -> None:
    """The workers and at least one decode task of the input pipeline fit the cluster; otherwise the input
    pipeline would wait for a CPU forever. A cluster that is too small now is asked to grow and waited for,
    up to --wait-for-resources (by default on a cluster the job joins: it may autoscale from zero)."""
    def problem(resources: dict) -> str | None:
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        need = cfg.num_workers * cfg.cpus_per_worker + cfg.data_cpus
        if cpus < need:
            return (f"{cfg.num_workers} worker(s) x {cfg.cpus_per_worker:g} CPU (--cpus-per-worker) + {cfg.data_cpus:g} "
                    f"CPU for the input pipeline (--data-cpus) need {need:g} CPUs, but the Ray cluster has {cpus:g}: "
                    "lower --num-workers, --cpus-per-worker or --data-cpus, or add nodes")
        if cfg.use_gpu and gpus < cfg.num_workers:
            return (f"--use-gpu with {cfg.num_workers} worker(s) needs {cfg.num_workers} GPUs, but the Ray cluster "
                    f"has {gpus:g}: lower --num-workers or add GPU nodes")
        accel = accelerator_resource(cfg)
        if accel and resources.get(accel, 0.0) <= 0:
            return (f"--accelerator-type {cfg.accelerator_type}: the Ray cluster has no node with that GPU "
                    f"(resource {accel!r}): start one, or pick another type")
        return None

    wait_s = default_wait_s(None, cfg.wait_for_resources)
    capacity, known = cluster_capacity()
    if wait_s > 0 or known:
        worker = {"CPU": float(cfg.cpus_per_worker), **({"GPU": 1.0} if cfg.use_gpu else {})}
        if accelerator_resource(cfg):  # what Ray Train asks for each worker (ScalingConfig.accelerator_type)
            worker[accelerator_resource(cfg)] = 0.001
        wait_for_resources(problem, [worker] * cfg.num_workers + [{"CPU": float(cfg.data_cpus)}], wait_s,
                           lambda message: print(f"[train] {message}", flush=True))
        return
    found = problem(capacity)
    if found and known:
        raise JobError(found)
    if found:  # an autoscaler may still add nodes; a stall ends the run after --stall-timeout
        print(f"[train] warning: {found.replace('the Ray cluster has', 'the Ray cluster has now')}", flush=True)


def build_trainer(cfg: TrainConfig, run: Location, train: list, val: list, class_names: list[str],
                  convention: InputConvention, bad_log) -> TorchTrainer:
    transform = TrainTransform(cfg.crop_size, cfg.min_scale, cfg.max_scale, cfg.flip)
    datasets = {"train": segmentation_dataset(train, num_classes=cfg.num_classes, transform=transform,
                                              max_pixels=cfg.max_pixels, bad_log=bad_log, num_cpus=cfg.data_cpus)}
    # Validation: one fixed, disjoint shard per worker so that every image is evaluated exactly once
    # (streaming_split(equal=True) may drop rows, which would bias the metrics).
    val_shards = min(cfg.num_workers, len(val))
    for r in range(val_shards):
        datasets[f"val_{r}"] = segmentation_dataset(val[r::cfg.num_workers], num_classes=cfg.num_classes,
                                                    max_pixels=cfg.max_pixels, bad_log=bad_log, num_cpus=cfg.data_cpus)
    steps_per_epoch = max(1, math.ceil(len(train) / cfg.num_workers / cfg.batch_size))
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run": run, "class_names": class_names, "convention": convention.to_dict(),
                           "steps_per_epoch": steps_per_epoch, "val_shards": val_shards},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     accelerator_type=cfg.accelerator_type if cfg.use_gpu else None),
        run_config=RunConfig(
            storage_path=run.parent.uri,
            name=cfg.name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_best, checkpoint_score_attribute="mean_iou",
                                               checkpoint_score_order="max"),
            # A worker group that cannot be placed is retried forever by default: bound it.
            failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=max(3, cfg.max_failures)),
            worker_runtime_env=faults.runtime_env(),
            # Ray Train's INFO lines (worker group start, DDP wrapping) stay in its log files, off the job's log.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            callbacks=[TrainMetrics(cfg.name)],  # Prometheus metrics from the controller (pipeline.telemetry)
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_ingest_options()),
    )


def _ingest_options() -> ray.data.ExecutionOptions:
    """Ray Train's default ingest options (DataConfig.default_ingest_options: the driver's DataContext), without
    the deprecated exclude_resources that the default passes on (a RayDeprecationWarning in every run's log)."""
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                                     verbose_progress=current.verbose_progress)


def warn_dropped(bad_rows: list[dict], splits: dict[str, list], cfg: TrainConfig) -> None:
    """One warning line per split that lost samples, with the counts (most of a split dropped usually means masks
    with other class ids than --num-classes)."""
    bad = {row["uri"] for row in bad_rows}
    for kind, samples in splits.items():
        dropped = sum(s["image"] in bad for s in samples)
        if dropped:
            name = cfg.train_split if kind == "train" else cfg.val_split
            most = " (most of it: are the masks' class ids those of --num-classes?)" if 2 * dropped > len(samples) else ""
            print(f"warning: {dropped} of {len(samples)} images of split {name!r} dropped as bad samples{most}",
                  file=sys.stderr, flush=True)


def summarise(run: Location, bad_rows: list[dict], trained_epochs: list[dict]) -> dict:
    found = scan_checkpoints(run)
    if not found:
        raise JobError(f"training finished without a checkpoint under {run.uri}")
    best = max(found, key=lambda c: (c["metrics"].get("mean_iou") or -1.0, c["epoch"]))
    latest = found[-1]
    records = ledger(run)
    ips = [r["metrics"]["images_per_second"] for r in trained_epochs]
    return {
        "run": run.uri,
        "best_mean_iou": best["metrics"].get("mean_iou"),
        "best_epoch": best["epoch"],
        "best_checkpoint": best["model_uri"],
        "latest_checkpoint": latest["model_uri"],
        "epochs": latest["epoch"],
        "epochs_trained_now": [r["epoch"] for r in trained_epochs],
        "worker_nodes": latest["metrics"].get("worker_nodes"),
        # What the latest epoch trained with (None: written before these were recorded; see pipeline/train/step.py).
        "upsampling": latest["metrics"].get("upsampling"),
        "train_settings": latest["metrics"].get("train_settings"),
        "final_metrics": {k: latest["metrics"].get(k) for k in
                          ("loss", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "per_class_iou")},
        "images_per_second": sum(ips) / len(ips) if ips else None,
        "kept_checkpoints": [c["model_uri"] for c in found],
        "bad_samples": bad_rows,
        "ledger_epochs": [r["epoch"] for r in records],
    }


def run_training(cfg: TrainConfig) -> dict:
    """Train (or resume) a run; returns the summary dict printed by jobs/train.py."""
    cfg, data, run = resolve(cfg)  # once: the driver, the workers and the summary share them
    cfg, train, val, class_names, convention = preflight(cfg, data, run)
    started = datetime.now(timezone.utc)
    with guarded_run(run, holder=f"the training started {started:%Y-%m-%d %H:%M:%S} UTC", what=f"run {run.uri}"):
        done_before = {r["epoch"] for r in ledger(run)}
        init_ray()
        configure_progress(cfg.progress)
        check_cluster_fits(cfg)
        return _fit(cfg, run, train, val, class_names, convention, done_before)


def _fit(cfg: TrainConfig, run, train: list, val: list, class_names: list[str], convention: InputConvention,
         done_before: set) -> dict:
    latest = scan_checkpoints(run)
    bad_rows: list[dict] = []
    if latest and latest[-1]["epoch"] >= cfg.epochs:
        # No trainer and no BadSampleLog actor (a process to start, ~2 s on 2 cores): nothing is read, nothing dropped.
        print(f"[train] {run.uri} already completed epoch {latest[-1]['epoch']} of {cfg.epochs}: nothing to train", flush=True)
    else:
        bad_log = start_bad_sample_log()
        trainer = build_trainer(cfg, run, train, val, class_names, convention, bad_log)
        try:
            result = trainer.fit()
            if result.error is not None:
                raise result.error
        except Exception as e:
            _, stalled, message = str(e).rpartition(f"{InputStalled.__name__}: ")  # the last one, after tracebacks
            if stalled:  # raised in a worker: one line, not the workers' tracebacks
                raise JobError(message.splitlines()[0]) from None
            try:  # storage that vanished under the run (a deleted bucket): one line naming it
                run.check_writable()
            except StorageError as gone:
                raise StorageError(f"the run's storage failed during training: {gone}") from None
            raise
        bad_rows = ray.get(bad_log.rows.remote())
    for row in bad_rows:
        print(f"[train] skipped bad sample {row['uri']}: {row['reason']}", flush=True)
    warn_dropped(bad_rows, {"train": train, "val": val}, cfg)
    trained_now = [r for r in ledger(run) if r["epoch"] not in done_before and r["attempt"] != "recovered"]
    return summarise(run, bad_rows, trained_now)
