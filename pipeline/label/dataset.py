"""The labeling pipeline as one streaming Ray Dataset: rows to label -> read -> decode and preprocess (CPU
tasks) -> model (actor pool) -> postprocess -> staged file sets (write tasks; one small row each for the driver)."""
from __future__ import annotations

import ray

from .. import faults
from ..storage import Location
from .actor import InferenceActor, actor_env
from .config import LabelConfig
from .crash_budget import bound_crashes, start_attempts
from .inference_settings import InferenceSettings
from .resources import ResourcePlan
from .stages import Postprocessor, decode_blocks, read_stage
from .writer import OutputSettings, stage_results


def build_dataset(todo: ray.data.Dataset, listed_by: Location | None, *, checkpoint_ref, plan: ResourcePlan,
                  settings: InferenceSettings, config: LabelConfig, output: OutputSettings) -> ray.data.Dataset:
    """The streaming Ray Dataset of staged file sets (writer.STAGED_SCHEMA rows) for the listing rows `todo`,
    listed under `listed_by` (None: a manifest's rows, each read through the filesystem its URI names), labeled
    by actors as `plan` places them with the run's `settings`."""
    ds = labeled_rows(todo, listed_by, checkpoint_ref=checkpoint_ref, plan=plan, settings=settings, config=config,
                      encoding=config.label_encoding)
    # Label maps go from here to staging, a block at a time (whole blocks: bundling rows up to a file's worth would
    # hold that many label maps in the object store); the driver receives one small row per block.
    return ds.map_batches(stage_results, batch_size=None, batch_format="pyarrow",
                          num_cpus=plan.task_cpus, runtime_env=faults.runtime_env(), fn_kwargs={"settings": output})


def labeled_rows(todo: ray.data.Dataset, listed_by: Location | None, *, checkpoint_ref, plan: ResourcePlan,
                 settings: InferenceSettings, config: LabelConfig, encoding: str) -> ray.data.Dataset:
    """The rows of `todo` read, decoded, labeled and postprocessed (tables.RESULT_SCHEMA rows, label maps in
    `encoding`): the labeling job's stages before its writer; the canary set takes this path too."""
    ds = todo.map_batches(read_stage, batch_size=config.rows_per_read_task, batch_format="pyarrow",
                          num_cpus=plan.task_cpus, fn_kwargs={"listed_by": listed_by, "max_bytes": config.read_limit})
    ds = ds.map_batches(decode_blocks, batch_size=None, batch_format="pyarrow", num_cpus=plan.task_cpus,
                        fn_kwargs={"max_pixels": config.max_pixels, "max_side": config.max_side,
                                   "canvas_multiple": settings.canvas_multiple, "tiling": settings.tiling})
    # Postprocess: with raw label maps it is a few array operations, done by the inference actor at the end of
    # each batch; PNG encoding is real CPU work, kept off the (GPU) inference actors in its own small,
    # long-lived actors (tasks would start a worker process, torch import included, per call on small nodes).
    separate = encoding != "raw"
    gpu = plan.actor_gpus > 0
    # On a GPU: calls of 16 forward passes' rows, so that grouping them by canvas size fills the fixed-shape
    # batches' slots (more rows per call, fewer empty slots: bench/RESULTS.md), and two calls running at once, so
    # one call's host work (unpacking, pinning, building the result table) overlaps the other's forward passes.
    # With --tile, a row may be a large image at its own size (a 100 MP one is 300 MB) whose tiles fill the slots by
    # themselves: calls of batch_size rows, so a call holds a few such images, not 16 x batch_size of them.
    per_call = 1 if settings.tiling is not None else 16 if gpu else 4
    rows_per_call = config.rows_per_actor_call or per_call * plan.batch_size
    # CUDA graphs (--compile reduce-overhead) are recorded and replayed per thread: one call at a time there.
    concurrent_calls = 2 if gpu and settings.compile != "reduce-overhead" else None
    ds = ds.map_batches(
        bound_crashes(InferenceActor), batch_size=rows_per_call, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.pool, max_concurrent_calls_per_actor=concurrent_calls,
                                           enable_true_multi_threading=concurrent_calls is not None),
        num_cpus=plan.actor_cpus, num_gpus=plan.actor_gpus,
        # A batch whose actor died (spot reclaim, a sticky CUDA error) is retried on a restarted actor: Ray Data's
        # actor pools restart actors and retry their calls without limit by default (a fixed max_task_retries
        # would also count lost nodes, ray#50640), and crash_budget ends the run when a batch has killed its
        # actor 3 times on nodes that stayed up (lost nodes cost nothing).
        runtime_env=faults.runtime_env(actor_env()),
        fn_constructor_kwargs={"checkpoint": [checkpoint_ref], "settings": settings, "threads": plan.threads,
                               "postprocess_encoding": None if separate else encoding,
                               "attempts": [start_attempts()]})
    if separate:
        ds = ds.map_batches(Postprocessor, batch_size=None, batch_format="pyarrow", num_cpus=plan.task_cpus,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, plan.pool)),
                            fn_constructor_kwargs={"encoding": encoding})
    return ds
