"""The inference actor of the labeling pipeline: one model replica in a Ray Data actor pool (one per GPU, or
CPU actors), turning prepared canvases into label maps and per-class statistics (see `inference`)."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pyarrow as pa

from .. import faults
from ..errors import one_line
from .canvas import Prepared
from .inference import DeviceFailure, InferenceSettings, Predictor, from_shippable
from .stages import list_column, postprocess_stage


class InferenceActor:
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
        self.predictor = Predictor(ck.model, ck.convention, settings)
        ctx = ray.get_runtime_context()
        self.info = json.dumps({"node_id": ctx.get_node_id(), "pid": os.getpid(),
                                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                                "device": str(self.predictor.device), "threads": threads,
                                "ready_at": round(time.time(), 3)}, sort_keys=True)
        self.postprocess_encoding = postprocess_encoding

    def __call__(self, batch: pa.Table) -> pa.Table:
        faults.fire("label.inference")
        n = batch.num_rows
        errors = batch["error"].to_pylist()
        stages = batch["stage"].to_pylist()
        cols = {k: batch[k].to_pylist() for k in ("width", "height", "resized_h", "resized_w", "canvas_h", "canvas_w")}
        canvases = batch["canvas"].to_pylist()
        todo, items = [], []
        for i in range(n):
            if errors[i] is None:
                canvas = np.frombuffer(canvases[i], np.uint8).reshape(cols["canvas_h"][i], cols["canvas_w"][i], 3)
                items.append(Prepared(canvas, cols["resized_h"][i], cols["resized_w"][i], cols["height"][i],
                                      cols["width"][i]))
                todo.append(i)
        try:
            preds = self.predictor.predict(items) if items else []
        except DeviceFailure as e:
            # A sticky device error fails every later image too: end this process, so Ray restarts the actor
            # (on a fresh CUDA context) and retries this batch there; nothing lands in errors/ for it.
            print(f"[label] inference actor {self.info}: {one_line(e)}; exiting so that Ray restarts it",
                  file=sys.stderr, flush=True)
            os._exit(70)
        empty_i32 = np.zeros(0, np.int32)
        labels: list[bytes | None] = [None] * n
        per_class = {k: [empty_i32] * n for k in ("class_id", "x_min", "y_min", "x_max", "y_max")}
        counts = [np.zeros(0, np.int64)] * n
        conf = [np.zeros(0, np.float64)] * n
        for i, pred in zip(todo, preds):
            if isinstance(pred, Exception):
                stages[i], errors[i] = "inference", one_line(pred)
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
        if self.postprocess_encoding is not None:  # fused: see pipeline.label.dataset
            return postprocess_stage(result, encoding=self.postprocess_encoding)
        return result
