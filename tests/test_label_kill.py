"""kill -9 of the labeling job's driver in the middle of a run, then a rerun: every image exactly once, tiled
(--tile) or whole."""
from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

from pipeline import faults, storage
from pipeline.label.config import LabelConfig
from pipeline.label.job import label_images
from tests.label_fixtures import FAST_FLAGS, decode_row, duckdb_connection, good_image, tables, write_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_GOOD = 16
TILE = 64


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ...
            pids.append(int(stat.split("/")[2]))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the job's own session (its local Ray: raylet, GCS, workers)."""
    for _ in range(50):
        pids = [p for p in _session_pids(sid) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _count(con, root, table, key):
    return con.execute(f"SELECT {key}, count(*) AS n FROM read_parquet('{root}/{table}/**/*.parquet', "
                       "hive_partitioning = true) GROUP BY ALL").fetchall()


def test_driver_kill_9_mid_run_then_rerun_is_exactly_once(ray_session, tiny_checkpoint, tmp_path):
    ck_path, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    # Every other image is larger than --tile: labeled at its own size in tiles (issue 34), exactly once too.
    files = {f"p{i:02d}.png": good_image(i, 20 + i % 7, 24 + i % 5) if i % 2 else good_image(i, 70 + i, 90 + i % 5)
             for i in range(N_GOOD)}
    files.update({"p03x_bad.jpg": b"", "p11x_bad.png": b"not an image"})
    write_files(images, files)

    env = dict(os.environ, RAY_AUTH_MODE="disabled", **{faults.ENV: "label.commit:*=sleep:0.25"})
    env.pop("RAY_ADDRESS", None)
    # FAST_FLAGS: one inference actor, as in the rerun below (by default 2 CPUs got 2, each importing torch at start).
    cmd = [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--images", images, "--checkpoint", ck_path,
           "--output", output, "--rows-per-file", "2", "--tile", str(TILE), *FAST_FLAGS]
    child = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not glob.glob(f"{output}/labels/**/*.parquet", recursive=True):
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job never committed a file set"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.8))  # somewhere inside a later commit, most likely
        assert child.poll() is None, "the job finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)  # the driver only: what a crash or an OOM kill does
        child.wait(timeout=30)
    finally:
        _kill_session(child.pid)
        child.stdout.close()

    con = duckdb_connection(output)
    before = _count(con, output, "labels", "image_uri")
    assert before and all(n == 1 for _, n in before)  # readers never see a duplicate, even mid-commit
    assert len(before) < N_GOOD, "the kill came too late to interrupt the run"
    killed = [p for p in glob.glob(f"{output}/runs/*.json")]
    assert len(killed) == 1 and '"status": "running"' in open(killed[0]).read()

    summary = label_images(LabelConfig(images=images, checkpoint=ck_path, output=output, rows_per_file=2,
                                       batch_size=1, max_side=48, progress=False, actors=1, threads_per_actor=1,
                                       cpus_per_actor=1.0, tile=TILE))
    recovered = summary["recovered"]
    done_before = len(_count(con, output, "labels", "image_uri")) - summary["labelled"]
    assert summary["skipped"] == done_before >= len(before)
    assert summary["labelled"] == N_GOOD - done_before and summary["errors"] == 2
    # The driver commits one file set at a time: at most one marker to finish. Writers stage ahead of it, so
    # several staged sets may be discarded (their images were just labeled again above, once).
    assert recovered["rolled_forward"] <= 1

    labels = _count(con, output, "labels", "image_uri")
    assert sorted(u for u, _ in labels) == sorted(storage.join(images, n) for n in files if "bad" not in n)
    assert all(n == 1 for _, n in labels)
    stats = _count(con, output, "class_stats", "image_uri, class_id")
    assert stats and all(n == 1 for *_, n in stats)
    rows = tables(output)["labels"].to_pylist()
    pixel_sums = dict(con.execute(f"SELECT image_uri, sum(pixel_count) FROM read_parquet('{output}/class_stats/**/*.parquet') "
                                  "GROUP BY ALL").fetchall())
    for r in rows:
        assert pixel_sums[r["image_uri"]] == r["width"] * r["height"]
        assert (r["tiles"] > 0) == (max(r["width"], r["height"]) > TILE)
        assert sorted(np.unique(decode_row(r)).tolist()) == r["classes_present"]
    assert not glob.glob(f"{output}/_staging/*") and not glob.glob(f"{output}/_commits/*")
