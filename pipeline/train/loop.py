"""The per-worker training function run by Ray Train's TorchTrainer (DDP over gloo or NCCL).

Flat and explicit, like torchvision's segmentation reference: build, resume, train an epoch, validate the
whole validation split (sharded; confusion matrices summed exactly across workers), checkpoint, report.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models import InputConvention, build_model, checkpoint_bytes, init_backbone, init_from_checkpoint, load_checkpoint

from .. import faults
from ..batching import to_input
from ..metrics import ConfusionMatrix
from ..storage import Location
from ..storage_errors import redact_strings
from .config import TrainConfig
from .evaluation import evaluate_rows
from .run_log import RunLog
from .run_state import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    epoch_dir_name,
    ledger,
    new_attempt_id,
    scan_checkpoints,
    verify_checkpoint,
    write_ledger,
)
from .step import (
    TrainStep,
    compile_for_training,
    describe_state_change,
    load_optimizer_state,
    make_optimizer,
    optimizer_impl,
    param_names,
    set_upsampling,
    step_settings,
)


def _say(line: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the job's log. Not print(): Ray Train patches it
    in workers to also log through the root logger, and every line reached the job's log twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class InputStalled(RuntimeError):
    """No training batch arrived for `stall_timeout` seconds: the input pipeline gets no CPU (or hangs)."""


class EpochInput:
    """One epoch of the training shard's batches, started ahead of time, with a stall watchdog.

    Each epoch of a Ray Data shard is a new execution: new decode tasks, and often fresh worker processes
    (Ray reaps idle workers after ~1 s), which costs seconds before the first batch. Starting the next epoch
    on a background thread just before validation and the checkpoint report hides that start-up behind them.
    The thread pulls batches one ahead of the training loop; when none comes for `stall_timeout` seconds the
    loop raises InputStalled instead of waiting forever.
    """

    _END = object()

    def __init__(self, shard, *, stall_timeout: float | None = None, **iter_kwargs) -> None:
        self._it = iter(shard.iter_torch_batches(**iter_kwargs))
        self.stall_timeout = stall_timeout
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._pull, name="epoch-input", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            for batch in self._it:
                self._queue.put(batch)
            self._queue.put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._queue.put(e)

    def __iter__(self):
        while True:
            try:
                item = self._queue.get(timeout=self.stall_timeout)
            except queue.Empty:
                raise InputStalled(f"no training batch for {self.stall_timeout:g} s: the input pipeline is stalled "
                                   "(its decode tasks get no CPU, or a read hangs); give Ray Data CPUs (lower "
                                   "--cpus-per-worker or --data-cpus, or add nodes) or raise --stall-timeout") from None
            if item is self._END:
                return
            if isinstance(item, BaseException):
                if isinstance(item, Exception):  # the tracebacks stay in the worker logs: its cause in the job's log
                    _say(f"[train] the training input pipeline failed: {root_cause(item)}")
                raise item
            yield item


def root_cause(e: BaseException, limit: int = 300) -> str:
    """`Type: message` of the error at the bottom of `e`: a Ray task's error carries the remote tracebacks in its text
    (its causes do not survive the trip), where the first error that is not Ray's own wrapper is the original one."""
    chain, seen = [], set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = getattr(e, "cause", None) or e.__cause__
    for x in chain:
        for line in str(x).splitlines():
            line = line.strip()
            if _ERROR_LINE.match(line) and not line.startswith("ray."):
                return line if len(line) <= limit else line[:limit - 3] + "..."
    bottom = chain[-1]
    text = f"{type(bottom).__name__}: {str(bottom).strip().splitlines()[0] if str(bottom).strip() else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Fault)\b[^:]*: ")


def _poly_lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    return cfg.lr * max(0.0, 1.0 - step / max(1, total_steps)) ** cfg.poly_power


def _resume_point(run: Location, rank: int) -> dict | None:
    """Rank 0 decides where to resume (Ray's checkpoint, or a later complete one the race hid; the newest whose
    files hash to what its state.json recorded); all ranks agree."""
    decision = [None]
    if rank == 0:
        found = scan_checkpoints(run)
        while found and not verify_checkpoint(run, found[-1]):
            _say(f"[train] {found[-1]['uri']} does not match the hashes in its state.json: skipped")
            found.pop()
        latest = found[-1] if found else None
        ray_ck = ray.train.get_checkpoint()
        if latest is not None and ray_ck is not None:
            ray_name = os.path.basename(ray_ck.path.rstrip("/"))
            if ray_name != os.path.basename(latest["uri"]):
                _say(f"[train] Ray's latest checkpoint is {ray_name}, storage holds a complete "
                     f"{os.path.basename(latest['uri'])} (reported just before a failure): resuming after it")
        decision[0] = latest
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def _save_checkpoint_dir(directory: str, model: nn.Module, cfg: TrainConfig, class_names: list[str],
                         convention: InputConvention, optimizer, step: int, epoch: int, history: list,
                         metrics: dict) -> None:
    model_data = checkpoint_bytes(model, class_names=class_names, convention=convention,
                                  metadata={"epoch": epoch, "metrics": metrics, "run": cfg.name,
                                            "upsampling": metrics.get("upsampling"),
                                            "train_config": redact_strings(cfg.to_dict())})
    buf = io.BytesIO()
    # param_names: a resume maps the optimizer state by name (the trainable parameters may differ between runs).
    torch.save({"optimizer": optimizer.state_dict(), "param_names": param_names(optimizer, model), "step": step,
                "epoch": epoch, "history": history}, buf)
    state_data = buf.getvalue()
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
        f.write(model_data)
    with open(os.path.join(directory, STATE_FILE), "wb") as f:
        f.write(state_data)
    meta = {"epoch": epoch, "metrics": metrics, "model_bytes": len(model_data), "state_bytes": len(state_data),
            "model_sha256": hashlib.sha256(model_data).hexdigest(), "state_sha256": hashlib.sha256(state_data).hexdigest(),
            "train_config": redact_strings(cfg.to_dict())}
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f)


def _quiet_per_epoch_info() -> None:
    """Per-epoch INFO lines this job causes in every worker, kept out of the job's log (Ray's own log files
    still have them; warnings and errors still show): Ray Train's report line (per worker and epoch, with
    the whole metrics dict) and its checkpoint line, and Ray Data's start/plan/finish lines of each epoch's
    validation pass."""
    try:
        from ray.train.v2._internal.execution import context as train_context
        from ray.train.v2._internal.execution import storage as train_storage

        train_context.logger.setLevel(logging.WARNING)
        train_storage.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: its own logging stands
        pass
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":  # the console; the ray-data.log file keeps everything
            handler.setLevel(logging.WARNING)


@dataclass
class Worker:
    """What one training worker holds for the whole run: made by `_setup`, then used epoch by epoch."""

    cfg: TrainConfig
    run: Location
    class_names: list[str]
    convention: InputConvention
    rank: int
    world: int
    device: torch.device
    nodes: list
    attempt: str
    core: nn.Module            # the plain module: validation (eager) and the checkpoint (plain state-dict keys)
    model: nn.Module           # what the training step calls (compiled with --compile, DDP-wrapped on >1 worker)
    optimizer: torch.optim.Optimizer
    train_step: TrainStep
    upsampling: str
    settings: dict
    start_epoch: int
    history: list
    step: int                  # optimizer steps done (the poly schedule goes by it)
    total_steps: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def lr(self) -> float:
        return _poly_lr(self.cfg, self.step, self.total_steps)


def train_loop_per_worker(config: dict) -> None:
    """Set up (build, resume), then per epoch: train, validate the worker's shard, report (and, rank 0: the
    checkpoint, the ledger and the run log)."""
    w = _setup(config)
    shard = ray.train.get_dataset_shard("train")
    # On a GPU: pinned batches copy asynchronously, and two prefetched keep the copy ahead of the step (on CPU
    # workers Ray's default, one, as before: a second prefetch thread only competes for the worker's cores).
    batches_for = dict(batch_size=w.cfg.batch_size, local_shuffle_buffer_size=w.cfg.batch_size * 8,
                       stall_timeout=w.cfg.stall_timeout, pin_memory=w.cuda, prefetch_batches=2 if w.cuda else 1)
    next_input = EpochInput(shard, **batches_for) if w.start_epoch <= w.cfg.epochs else None
    run_log = RunLog(w.run, w.class_names) if w.rank == 0 else None
    for epoch in range(w.start_epoch, w.cfg.epochs + 1):
        t0 = time.perf_counter()
        trained = _train_epoch(w, next_input)
        # Start the next epoch's input now, so its start-up overlaps validation and the checkpoint.
        next_input = EpochInput(shard, **batches_for) if epoch < w.cfg.epochs else None
        cm, n_val, val_seconds = _validate(w, config["val_shards"])
        _report(w, epoch, trained, cm, n_val, val_seconds, run_log, t0)


def _setup(config: dict) -> Worker:
    """The worker's model (built, resumed or initialised, upsamplers frozen or not, compiled, DDP-wrapped), its
    optimizer (with the resumed state) and its training step."""
    cfg = TrainConfig(**config["cfg"])
    _quiet_per_epoch_info()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    run: Location = config["run"]  # resolved once, by the driver
    nodes = [ray.get_runtime_context().get_node_id()]
    if dist.is_initialized():
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.num_classes, width_mult=cfg.width_mult, padding=cfg.padding, dropout=cfg.dropout)
    # Same initial weights on every rank (DDP broadcasts rank 0's anyway), but each rank its own dropout masks:
    # with one seed, every worker would drop the same channels of its batch.
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    resume = _resume_point(run, rank)
    train_state = None
    if resume is not None:
        model.load_state_dict(load_checkpoint(resume["model_uri"]).model.state_dict())
        # Onto the CPU: tensors saved on a GPU must load on any rank's device, and on a CPU-only node.
        train_state = torch.load(io.BytesIO(run.child(epoch_dir_name(resume["epoch"]), STATE_FILE).read_bytes()),
                                 weights_only=True, map_location="cpu")
        if rank == 0 and not any(r["epoch"] == resume["epoch"] for r in ledger(run)):
            write_ledger(run, resume["epoch"], "recovered", resume["metrics"])
    elif cfg.init_from:
        init_from_checkpoint(model, cfg.init_from)
    elif cfg.backbone_weights != "none":
        init_backbone(model, cfg.backbone_weights)
    # Before DDP wraps the model: DDP registers gradient hooks for the parameters that require gradients only.
    upsampling = set_upsampling(model, cfg.learn_upsampling,
                                loaded_from=resume["model_uri"] if resume is not None else cfg.init_from)

    use_cuda = device.type == "cuda"
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    core = model
    model = ray.train.torch.prepare_model(compile_for_training(core, cfg.compile))
    ddp = isinstance(model, DistributedDataParallel)
    if ddp and cfg.grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        # Gradients all-reduced in bf16: half the bytes on the wire (docs/operations.md "Scaling").
        model.register_comm_hook(dist.group.WORLD, default_hooks.bf16_compress_hook)
    optimizer = make_optimizer(cfg, core, device)
    scaler = torch.amp.GradScaler("cuda") if use_cuda and cfg.amp == "fp16" else None
    start_epoch, history = 1, []
    if train_state is not None:
        # The saved state brings its buffers (momentum, Adam moments); this run's flags set the hyperparameters
        # (--lr through the schedule below, --momentum, --weight-decay) and the implementation from the resumed
        # epoch on. Mapped by name: the saved state may hold other parameters (older runs trained the upsamplers).
        own = {"weight_decay": cfg.weight_decay, **optimizer_impl(cfg, device),
               **({"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {})}
        dropped, fresh = load_optimizer_state(optimizer, core, train_state["optimizer"], train_state.get("param_names"),
                                              **own)
        if rank == 0 and (dropped or fresh):
            _say(f"[train] epoch {train_state['epoch']}'s optimizer state: {describe_state_change(dropped, fresh)}")
        start_epoch, history = train_state["epoch"] + 1, list(train_state["history"])
    settings = step_settings(cfg, device, world)
    if rank == 0 and start_epoch <= cfg.epochs:
        _say(f"[train] upsampling {upsampling}; " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    train_step = TrainStep(model, optimizer, device=device, amp=cfg.amp, world=world, ddp=ddp, scaler=scaler,
                           benchmark=settings["cudnn_benchmark"])
    steps_per_epoch = -(-config["steps_per_epoch"] // cfg.grad_accum)  # optimizer steps
    # The poly schedule goes by epochs done: a resume with another --grad-accum or --batch-size stays on it.
    return Worker(cfg, run, config["class_names"], InputConvention.from_dict(config["convention"]), rank, world,
                  device, nodes, new_attempt_id(), core, model, optimizer, train_step, upsampling, settings,
                  start_epoch, history, step=(start_epoch - 1) * steps_per_epoch,
                  total_steps=cfg.epochs * steps_per_epoch)


def _train_epoch(w: Worker, epoch_input: EpochInput) -> dict:
    """One epoch of the worker's shard, --grad-accum batches per optimizer step; its loss sum, windows, images
    and seconds. streaming_split(equal=True) gives every worker the same number of rows, hence of steps."""
    w.model.train()
    t0 = time.perf_counter()
    normalize = w.convention.normalizer(w.device)
    windows = images = 0
    window = []
    for batch in epoch_input:
        window.append((to_input(batch["image"], normalize, w.device, channels_last=w.cuda),
                       batch["mask"].to(w.device, non_blocking=True).long()))
        images += len(window[-1][0])
        if len(window) == w.cfg.grad_accum:
            w.train_step(window, w.lr)
            windows, window, w.step = windows + 1, [], w.step + 1
    if window:  # the epoch's last, shorter window
        w.train_step(window, w.lr)
        windows, w.step = windows + 1, w.step + 1
    return {"loss_sum": w.train_step.take_loss(), "windows": windows, "images": images,
            "seconds": time.perf_counter() - t0}


def _validate(w: Worker, val_shards: int) -> tuple[ConfusionMatrix, int, float]:
    """The worker's validation shard (if it has one), whole images: its confusion matrix, images and seconds."""
    cm, n_val = ConfusionMatrix(w.cfg.num_classes), 0
    t = time.perf_counter()
    if w.rank < val_shards:
        val_rows = ray.train.get_dataset_shard(f"val_{w.rank}").iter_rows()
        cm, n_val = evaluate_rows(w.core, w.convention, val_rows, w.cfg.num_classes, w.device, w.cfg.amp)
    return cm, n_val, time.perf_counter() - t


def _report(w: Worker, epoch: int, trained: dict, cm: ConfusionMatrix, n_val: int, val_seconds: float,
            run_log: RunLog | None, t0: float) -> None:
    """Sum every worker's figures (confusion matrices exactly), report to Ray Train; rank 0 also commits the
    checkpoint, the ledger line and the run log, and prints the epoch's line."""
    totals = torch.tensor([trained["loss_sum"], trained["windows"] / w.world, trained["images"], n_val,
                           trained["seconds"], val_seconds], dtype=torch.float64)
    matrix = torch.from_numpy(cm.matrix).to(w.device)
    if dist.is_initialized():
        totals = totals.to(w.device)
        dist.all_reduce(matrix)  # exact int64 sum of every worker's confusion matrix
        seconds = totals[4:6].clone()
        dist.all_reduce(totals)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest worker sets the pace
        totals[4:6] = seconds
        totals = totals.cpu()
    scores = ConfusionMatrix.from_matrix(matrix.cpu().numpy()).scores()
    metrics = {
        "epoch": epoch,
        "loss": float(totals[0] / max(1.0, float(totals[1]))),
        **scores,
        "train_images": int(totals[2]),
        "val_images": int(totals[3]),
        "images_per_second": float(totals[2] / max(1e-9, float(totals[4]))),
        "train_seconds": float(totals[4]),
        "val_seconds": float(totals[5]),
        "lr": w.lr,
        "worker_nodes": w.nodes,
        "upsampling": w.upsampling,
        "train_settings": w.settings,
    }
    if w.cuda:  # this worker's peak (rank 0 reports; the ranks hold equal shapes)
        metrics["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated(w.device) / 1e9
    w.history.append({k: v for k, v in metrics.items() if k != "per_class_iou"})
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=epoch_dir_name(epoch))
        return
    with tempfile.TemporaryDirectory() as tmp:
        _save_checkpoint_dir(tmp, w.core, w.cfg, w.class_names, w.convention, w.optimizer, w.step, epoch, w.history,
                             metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=epoch_dir_name(epoch))
    write_ledger(w.run, epoch, w.attempt, {k: v for k, v in metrics.items() if k != "per_class_iou"})
    try:
        run_log.record(metrics, epoch_seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - the checkpoint is committed; metrics files are a view of it
        _say(f"[train] warning: could not write metrics.jsonl/curves.png/tensorboard for epoch {epoch}: "
             f"{type(e).__name__}: {e}")
    _say(f"[train] epoch {epoch}/{w.cfg.epochs} loss {metrics['loss']:.4f} mean_iou {metrics['mean_iou']:.4f} "
         f"pixel_acc {metrics['pixel_accuracy']:.4f} images/s {metrics['images_per_second']:.1f} "
         f"(train {metrics['train_images']}, val {metrics['val_images']})")
    faults.fire(f"train.reported:epoch{epoch}")
