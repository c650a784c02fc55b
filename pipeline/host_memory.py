"""Host memory of a long-lived compute process: keep what is freed for reuse instead of faulting it in again.

glibc's malloc serves every block over its mmap threshold (at most 32 MB; in a thread's own arena, every block over
its 64 MB heap) with a fresh mmap and unmaps it on free, and trims the heap's free top; the kernel then zeroes and
faults in the same pages on the next call. A process that allocates the same large buffers call after call pays
that every time (a forward pass's activations on a CPU, an inference call's input batch and results): on a CPU
actor, most of its system time (bench/actor_host_bench.py; the figures are in bench/RESULTS.md).

glibc reads these settings once, when the process starts (`GLIBC_TUNABLES`), so they go into the runtime_env of
the processes that need them: one arena for every thread (Ray Data runs an actor's calls in a thread of its
own), no mmap for large blocks, no trimming. The cost is that such a process keeps its peak heap; an inference
actor's working set is the same every call.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

KEEP_FREED = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=2147483647")


def keep_freed_memory_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment variable that starts a process keeping its freed memory; tunables already set are kept, ours
    replace theirs of the same name. (Other C libraries ignore it.)"""
    ours = {t.split("=", 1)[0] for t in KEEP_FREED}
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=", 1)[0] not in ours]
    return {"GLIBC_TUNABLES": ":".join([*kept, *KEEP_FREED])}


def keeps_freed_memory(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with the settings (what the run record states per actor)."""
    return set(KEEP_FREED) <= set(env.get("GLIBC_TUNABLES", "").split(":"))


def restart_keeping_freed_memory() -> None:
    """Re-execute this program with the settings unless it already runs with them: for benchmarks that must measure
    as the inference actors run."""
    if not keeps_freed_memory():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **keep_freed_memory_env()})
