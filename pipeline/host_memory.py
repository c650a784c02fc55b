"""Host memory of a long-lived compute process: keep what is freed for reuse instead of faulting it in again.

glibc's malloc serves every block over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free,
and trims the heap's free top; the kernel then zeroes and faults in the same pages on the next call. A process
that allocates the same large buffers call after call pays that every time (a forward pass's activations on a CPU,
an inference call's input batch and results). Measured with bench/actor_host_bench.py on the 2-core CI machine,
2026-12-06: 15-20 s of its 37-42 s were the kernel's; with freed memory kept, 1 s of 21 s, the CPU's device work
30 -> 16 ms and the actor's host work 435-1,642 -> 262-280 µs per image.

The cost is that the process keeps its peak heap (an inference actor's working set is the same every call).
Threads other than the main one still get large blocks by mmap: glibc falls back to it when an arena cannot grow.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and keep freed memory (no trim); True if it took.

    A no-op (False) where the C library is not glibc (macOS, musl accepts and ignores mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
