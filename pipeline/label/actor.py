"""The inference actor of the labeling pipeline: one model replica in a Ray Data actor pool (one per GPU, or
CPU actors), turning prepared canvases into label maps and per-class statistics (see `inference`).

The host side works on whole columns: canvases are views of Arrow's buffer, copied once into the (pinned)
batch; label maps come back as views of one host buffer and are copied once into the result column; nothing
goes through a Python object per pixel or per class (docs/labeling.md "Inference"; bench/RESULTS.md has the host microseconds per image).
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pyarrow as pa

from models import from_shippable

from .. import faults
from ..errors import one_line
from ..host_memory import keep_freed_memory_env, keeps_freed_memory
from .canvas import Prepared
from .columns import binary_column, binary_views, list_column
from .inference import DeviceFailure, Prediction, Predictor
from .inference_settings import InferenceSettings
from .stages import postprocess_stage
from .tables import UNCERTAINTY

_SIZES = ("width", "height", "resized_h", "resized_w", "canvas_h", "canvas_w")
_PER_CLASS_I32 = ("class_id", "x_min", "y_min", "x_max", "y_max")


def actor_env() -> dict[str, str]:
    """The environment variables an inference actor's process starts with, decided here alone: glibc's malloc keeps
    freed memory for the next call (pipeline/host_memory.py; read once, when the process starts), unless the job's
    workers keep it already (a Ray that pipeline.ray_setup.init_ray starts gives it to all of them, so the actors
    need no worker of their own there). cuDNN's heuristic mode is the Predictor's to set, before its first
    convolution (pipeline.label.inference)."""
    import ray

    job_env = ray.get_runtime_context().runtime_env.get("env_vars") or {}
    return {} if keeps_freed_memory(job_env) else keep_freed_memory_env()


class BatchLabeler:
    """Decoded rows (`stages.decode_stage`'s columns) -> result rows with raw label maps and statistics (or,
    with `postprocess_encoding`, rows already in RESULT_SCHEMA). The actor's work, without Ray."""

    def __init__(self, predictor: Predictor, info: dict, postprocess_encoding: str | None = None):
        self.predictor = predictor
        self.info = info
        self.postprocess_encoding = postprocess_encoding

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch["error"].to_pylist()
        stages = batch["stage"].to_pylist()
        sizes = {k: batch[k].to_numpy() for k in _SIZES}
        canvases = binary_views(batch["canvas"])
        todo = [i for i in range(n) if errors[i] is None]
        items = [Prepared(canvases[i].reshape(int(sizes["canvas_h"][i]), int(sizes["canvas_w"][i]), 3),
                          int(sizes["resized_h"][i]), int(sizes["resized_w"][i]), int(sizes["height"][i]),
                          int(sizes["width"][i])) for i in todo]
        preds = self.predictor.predict(items) if items else []
        done: list[Prediction | None] = [None] * n
        for i, pred in zip(todo, preds, strict=True):
            if isinstance(pred, Exception):
                stages[i], errors[i] = "inference", one_line(pred)
            else:
                done[i] = pred
        result = self._result(batch, done, stages, errors)
        if self.postprocess_encoding is not None:  # fused: see pipeline.label.dataset
            return postprocess_stage(result, encoding=self.postprocess_encoding)
        return result

    def _result(self, batch: pa.Table, done: list[Prediction | None], stages: list, errors: list) -> pa.Table:
        empty_i32, empty_i64, empty_f64 = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float64)
        per_class = {k: [empty_i32 if p is None else getattr(p, k) for p in done] for k in _PER_CLASS_I32}
        i32 = pa.list_(pa.int32())
        if self.predictor.compile_seconds:
            self.info["compile_seconds"] = round(self.predictor.compile_seconds, 1)
        return pa.table({
            "image_uri": batch["image_uri"], "image_version": batch["image_version"],
            "width": batch["width"], "height": batch["height"],
            "label_raw": binary_column([None if p is None else p.label for p in done]),
            "stat_class_id": list_column(per_class["class_id"], i32),
            "stat_pixel_count": list_column([empty_i64 if p is None else p.pixel_count for p in done],
                                            pa.list_(pa.int64())),
            "stat_confidence_sum": list_column([empty_f64 if p is None else p.confidence_sum for p in done],
                                               pa.list_(pa.float64())),
            "stat_x_min": list_column(per_class["x_min"], i32), "stat_y_min": list_column(per_class["y_min"], i32),
            "stat_x_max": list_column(per_class["x_max"], i32), "stat_y_max": list_column(per_class["y_max"], i32),
            **_uncertainty_columns(done),
            "tiles": pa.array([None if p is None else p.tiles for p in done], pa.int32()),
            "stage": pa.array(stages, pa.string()), "error": pa.array(errors, pa.string()),
            "actor": pa.array([json.dumps(self.info, sort_keys=True)] * len(done), pa.string()),
        })


def _uncertainty_columns(done: list[Prediction | None]) -> dict[str, pa.Array]:
    """labels/'s per-image figures (inference.Uncertainty), null for an image not labeled."""
    figures = [None if p is None else p.uncertainty for p in done]
    return {name: pa.array([None if u is None else getattr(u, name) for u in figures], pa.float64())
            for name in UNCERTAINTY}


class InferenceActor(BatchLabeler):
    """Loads the checkpoint from the object store once, then labels batches of decoded rows."""

    def __init__(self, checkpoint: list, settings: InferenceSettings, threads: int,
                 postprocess_encoding: str | None = None):
        import ray
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        ck = from_shippable(ray.get(checkpoint[0]))
        predictor = Predictor(ck.model, ck.convention, settings)
        ctx = ray.get_runtime_context()
        info = {"node_id": ctx.get_node_id(), "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "device": str(predictor.device), "threads": threads, "ready_at": round(time.time(), 3),
                "grouped_upsampling": predictor.applied["grouped_upsampling"],
                "cast_weights": predictor.applied["cast_weights"], "keep_freed_memory": keeps_freed_memory()}
        super().__init__(predictor, info, postprocess_encoding)

    def __call__(self, batch: pa.Table) -> pa.Table:
        faults.fire("label.inference")
        try:
            return super().__call__(batch)
        except DeviceFailure as e:
            # A sticky device error fails every later image too: end this process, so Ray restarts the actor
            # (on a fresh CUDA context) and retries this batch there; nothing lands in errors/ for it.
            print(f"[label] inference actor {json.dumps(self.info, sort_keys=True)}: {one_line(e)}; exiting so that "
                  "Ray restarts it", file=sys.stderr, flush=True)
            os._exit(70)
