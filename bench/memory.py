"""Peak memory of a whole process tree: run a command as its own session and sample every process in it.

PSS (proportional set size) splits shared pages (libraries, the object store) between the processes that map
them, so the sum over the session is the tree's real footprint; the RSS sum double-counts shared pages.
"""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import threading
import time


def session_pids(sid: int) -> list[int]:
    """Every process whose session id is `sid` (fields after "(comm)" in /proc/PID/stat: state ppid pgrp session)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    pids.append(int(stat.split("/")[2]))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in kB of one process."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def run_measuring_memory(cmd: list[str], *, env: dict, cwd: str, every: float = 0.2,
                         timeout: float = 1800) -> tuple[int, bytes, dict]:
    """Run `cmd` in a new session, sampling its processes every `every` s. Returns (exit code, stdout,
    {"pss_kb", "rss_kb", "processes", "shm_kb"} peaks, and "by_process": each process's peak RSS and PSS and the
    titles it had: Ray renames a worker for each task).
    shm_kb: the most /dev/shm pages one process of the tree
    has resident, i.e. the object store of a local Ray the command started (its store is one file there, mapped
    whole by the raylet); other Rays on the machine do not count. Whatever the command leaves running in its session
    is killed."""
    child = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    peak = {"pss_kb": 0, "rss_kb": 0, "processes": 0, "shm_kb": 0, "by_process": {}}
    done = threading.Event()
    by_process = peak["by_process"]

    def sample():
        while not done.is_set():
            pids = session_pids(child.pid)
            mem = [memory_kb(p) for p in pids]
            for pid, (pss, rss) in zip(pids, mem, strict=True):
                seen = by_process.setdefault(pid, {"rss_kb": 0, "pss_kb": 0, "titles": []})
                seen["rss_kb"], seen["pss_kb"] = max(seen["rss_kb"], rss), max(seen["pss_kb"], pss)
                title = process_title(pid)
                if title not in seen["titles"]:
                    seen["titles"].append(title)
            peak["pss_kb"] = max(peak["pss_kb"], sum(m[0] for m in mem))
            peak["rss_kb"] = max(peak["rss_kb"], sum(m[1] for m in mem))
            peak["processes"] = max(peak["processes"], len(pids))
            peak["shm_kb"] = max([peak["shm_kb"], *(shm_resident_kb(p) for p in pids)])
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate(timeout=timeout)
    done.set()
    sampler.join()
    for pid in session_pids(child.pid):  # e.g. a local Ray the command started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return child.returncode, stdout, peak



def process_title(pid: int) -> str:
    """A process's title, cut at 80 characters: Ray names its workers by what they run (ray::MapWorker(...))."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80] or str(pid)
    except OSError:
        return str(pid)


def shm_resident_kb(pid: int) -> int:
    """kB of /dev/shm files resident in one process's mappings (/proc/PID/smaps)."""
    total, in_shm = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line: range perms offset dev inode path
                    fields = line.split()
                    in_shm = len(fields) >= 6 and fields[5].startswith("/dev/shm/")
                elif in_shm and first == "Rss:":
                    total += int(line.split()[1])
    except OSError:
        pass
    return total
