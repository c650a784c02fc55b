"""pipeline/host_memory.py: a process started with its settings allocates the same large buffers again and again
without faulting them in each time, in a thread other than the main one too (where Ray Data runs an actor's calls)."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline.host_memory import keep_freed_memory_env, keeps_freed_memory

ALLOCATE = """
import resource, threading
import numpy as np

def calls(out):
    np.ones(100 * 2**20, np.uint8)  # the first time is faulted in either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        np.ones(100 * 2**20, np.uint8)  # 100 MB: over glibc's mmap threshold and over a thread arena's heap
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

out = []
calls(out)
thread = threading.Thread(target=calls, args=(out,))
thread.start()
thread.join()
print(*out)
"""


def _faults(env: dict) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", ALLOCATE], capture_output=True, text=True, check=True, env=env)
    return [int(n) for n in proc.stdout.split()]


def test_freed_memory_is_reused_in_every_thread_instead_of_faulted_in_again():
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    kept = {**plain, **keep_freed_memory_env(plain)}
    assert keeps_freed_memory(kept) and not keeps_freed_memory(plain)
    # glibc's defaults: each 100 MB block mapped, faulted in and unmapped anew (>= 50 faults even in 2 MB pages).
    assert all(n >= 10 * 50 for n in _faults(plain)), _faults(plain)
    assert all(n < 10 for n in _faults(kept)), _faults(kept)  # the same heap pages, main thread and another


def test_tunables_already_set_are_kept_and_ours_replace_theirs():
    env = keep_freed_memory_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8:glibc.malloc.tcache_count=0"})
    assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.tcache_count=0", "glibc.malloc.arena_max=1",
                                                "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=2147483647"]
