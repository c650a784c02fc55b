"""The labeling pipeline as one streaming Ray Dataset: listed files -> read -> decode and preprocess (CPU
tasks) -> model (actor pool) -> postprocess -> result rows (`tables.RESULT_SCHEMA`)."""
from __future__ import annotations

import math

import ray

from .. import faults
from ..storage import FileInfo, Location
from .actor import InferenceActor
from .config import LabelConfig
from .inference import InferenceSettings
from .resources import ResourcePlan
from .stages import Postprocessor, decode_stage, read_stage


def build_dataset(files: list[FileInfo], images: Location, *, checkpoint_ref, plan: ResourcePlan,
                  config: LabelConfig) -> ray.data.Dataset:
    """The streaming Ray Dataset of result rows for `files`, listed under `images`."""
    items = [{"image_uri": f.uri, "image_version": f.version, "image_size": int(f.size)} for f in files]
    blocks = max(1, min(len(items), math.ceil(len(items) / config.rows_per_read_task)))
    settings = InferenceSettings(max_side=config.max_side, canvas_multiple=config.canvas_multiple,
                                 batch_size=plan.batch_size, device=plan.device, amp=config.amp)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(read_stage, batch_size=None, batch_format="pyarrow", num_cpus=plan.task_cpus,
                        fn_kwargs={"images": images, "max_bytes": config.read_limit})
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
        runtime_env=faults.runtime_env(),
        fn_constructor_kwargs={"checkpoint": [checkpoint_ref], "settings": settings, "threads": plan.threads,
                               "postprocess_encoding": None if separate else config.label_encoding})
    if separate:
        ds = ds.map_batches(Postprocessor, batch_size=None, batch_format="pyarrow", num_cpus=plan.task_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, plan.pool)),
                            fn_constructor_kwargs={"encoding": config.label_encoding})
    return ds
