"""pipeline/host_memory.py: a process that allocates the same large buffers again and again stops faulting them in."""
from __future__ import annotations

import subprocess
import sys

ALLOCATE = """
import resource, sys
import numpy as np
sys.path.insert(0, {repo!r})
from pipeline.host_memory import keep_freed_memory
kept = keep_freed_memory() if {keep} else False
np.ones(40 * 2**20, np.uint8)  # the first time is faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(40 * 2**20, np.uint8)  # 40 MB: over glibc's largest mmap threshold (32 MB)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> tuple[bool, int]:
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", ALLOCATE.format(repo=repo, keep=keep)], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept, faults_kept = _faults(True)
    _, faults_default = _faults(False)
    assert kept  # glibc, as on every machine this project runs on
    # Each 40 MB block mapped, faulted in and unmapped anew: at least 20 faults a block even in 2 MB huge pages.
    assert faults_default >= 20 * 20, faults_default
    assert faults_kept < 20, faults_kept  # the same heap pages each time: not even one fault per block
