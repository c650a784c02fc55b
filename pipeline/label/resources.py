"""How many inference actors the labeling job starts and what each asks Ray for, from the flags and the cluster."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..errors import JobError, UsageError
from ..ray_setup import default_wait_s, wait_for_resources
from .config import LabelConfig
from .stages import TASK_CPUS

# CPU seconds to read, decode and canvas one 500x375 JPEG (1.2-1.6 ms measured on one core, EXIF and canvas
# included), plus the raw label map's share of the write (0.17 ms): what the decode tasks need per image.
CPU_SECONDS_PER_IMAGE = 1.6e-3
# Images/s one GPU actor should be fed: the H100 target of the labeling job (docs/operations.md "Scaling").
GPU_TARGET_IMAGES_PER_SECOND = 1500


class InsufficientResources(JobError, ValueError):
    """The cluster, as it is now, is too small for the flags (an autoscaling cluster may still grow)."""


@dataclass(frozen=True)
class ResourcePlan:
    pool: int              # inference actors
    actor_gpus: float
    actor_cpus: float      # Ray CPU request per actor
    threads: int           # torch threads per actor
    batch_size: int
    device: str
    task_cpus: float = TASK_CPUS
    decode_cpus: float = 0.0  # the cluster's CPUs left to read/decode/postprocess/write tasks

    @property
    def decode_images_per_second(self) -> float:
        """What the CPUs left to the tasks can read and decode, at CPU_SECONDS_PER_IMAGE."""
        return self.decode_cpus / CPU_SECONDS_PER_IMAGE

    def decode_warning(self) -> str | None:
        """A line for the log when the CPUs cannot feed the GPU actors at the target rate (or None)."""
        if not self.device.startswith("cuda") or self.decode_images_per_second >= GPU_TARGET_IMAGES_PER_SECOND * self.pool:
            return None
        need = math.ceil(GPU_TARGET_IMAGES_PER_SECOND * CPU_SECONDS_PER_IMAGE + self.actor_cpus) + 1  # + reads, writes
        return (f"{self.decode_cpus:g} CPUs are left to decode for {self.pool} GPU actor(s): about "
                f"{self.decode_images_per_second:,.0f} images/s of 500x375 JPEGs, below the "
                f"{GPU_TARGET_IMAGES_PER_SECOND:,} per GPU a fast GPU labels; give each GPU at least {need} vCPUs "
                "(docs/operations.md, \"Scaling\")")


def plan_resources(config: LabelConfig, cluster: dict) -> ResourcePlan:
    """Actor pool size and per-actor requests from the flags and the cluster's resources.

    GPUs: one actor per GPU (num_gpus=1), pool size --num-gpus (default: all). CPU: --actors x
    --threads-per-actor torch threads, by default one actor per 8 cores; each actor asks Ray for half a CPU
    less than its threads, which leaves room for the small decode/postprocess tasks that feed it.
    """
    cpus = float(cluster.get("CPU", 0))
    gpus = int(cluster.get("GPU", 0))
    use_gpus = config.num_gpus if config.num_gpus is not None else gpus
    if use_gpus > gpus:
        raise InsufficientResources(f"--num-gpus {use_gpus} but the Ray cluster has {gpus} GPU(s)")
    if cpus < TASK_CPUS:
        raise InsufficientResources(f"the Ray cluster has {cpus:g} CPUs; reading and decoding need at least {TASK_CPUS}")
    if use_gpus > 0:
        if config.actors is not None and config.actors != use_gpus:
            raise UsageError("--actors is for CPU inference; with GPUs the pool has one actor per GPU (--num-gpus)")
        threads = config.threads_per_actor or 2
        actor_cpus = config.cpus_per_actor or max(0.05, min(1.0, math.floor(20 * cpus / (2 * use_gpus)) / 20))
        device = "cuda" if config.device == "auto" else config.device
        # 4: the fastest forward pass of a measured H100 run (bench/RESULTS.md: batch 1 445, 4 622, 8 359, 16 616
        # images/s on 512x384-ish canvases, reference padding, bf16).
        return ResourcePlan(use_gpus, 1.0, actor_cpus, threads, config.batch_size or 4, device,
                            decode_cpus=cpus - use_gpus * actor_cpus)
    threads = config.threads_per_actor or max(1, min(8, int(cpus)))
    actors = config.actors or max(1, int(cpus) // threads)
    actor_cpus = config.cpus_per_actor or max(0.5, threads - 0.5)
    if actors * actor_cpus > cpus - TASK_CPUS + 1e-9:
        raise InsufficientResources(f"{actors} actor(s) x {actor_cpus:g} CPUs leave no CPU for decoding on a cluster of "
                         f"{cpus:g} CPUs; lower --actors, --threads-per-actor or --cpus-per-actor")
    device = "cpu" if config.device == "auto" else config.device
    return ResourcePlan(actors, 0.0, actor_cpus, threads, config.batch_size or 4, device,
                        decode_cpus=cpus - actors * actor_cpus)


def resource_request(config: LabelConfig) -> list[dict]:
    """What to ask an autoscaler for before planning, from the flags alone: a GPU and a CPU per --num-gpus
    actor; else one bundle per --actors actor (its --cpus-per-actor, or its threads less half a CPU) and the
    decode tasks' share. The plan is then made on the grown cluster."""
    if config.num_gpus:
        return [{"GPU": 1.0, "CPU": 1.0}] * config.num_gpus
    threads = config.threads_per_actor or 1
    each = config.cpus_per_actor or max(0.5, threads - 0.5)
    return [{"CPU": float(each)}] * (config.actors or 1) + [{"CPU": TASK_CPUS}]


def plan_when_ready(config: LabelConfig, say: Callable[[str], None]) -> ResourcePlan:
    """The resource plan on the cluster as it is, or as the autoscaler grows it within --wait-for-resources (`say`
    tells the log what is waited for)."""
    def problem(resources: dict) -> str | None:
        try:
            plan_resources(config, resources)
        except InsufficientResources as e:
            return str(e)
        return None

    wait_s = default_wait_s(config.ray_address, config.wait_for_resources)
    resources = wait_for_resources(problem, resource_request(config), wait_s, say)
    return plan_resources(config, resources)
