"""Label maps leave Ray's object store once their block is staged: `jobs/label.py` as a user runs it (its own
local Ray), on photos whose label maps are large and whose canvases are small, holds a fraction of the run's
label maps at once, never all of them (issue 30: a run's every map stayed in the object store until its end,
120 GB for a commit group of 12 MP photos)."""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bench.memory import run_measuring_memory
from tests.images import encode, gradient_rgb
from tests.jobs_util import ROOT
from tests.label_fixtures import write_files

pytestmark = pytest.mark.ray_job

COUNT, HEIGHT, WIDTH = 96, 900, 1200  # 96 label maps of 1.08 MB (raw: a byte a pixel); --max-side 64: 12 KB canvases


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """One labeling run through the CLI, its process tree sampled: (exit code, summary, peaks)."""
    tmp = tmp_path_factory.mktemp("memory")
    images = str(tmp / "photos")
    # 7 gradients made once and rolled, encoded in 2 threads (Pillow's encoder releases the GIL): the same 96 files, in
    # ~1/10 of the time (a gradient per photo was most of the fixture's set-up).
    bases = [gradient_rgb(HEIGHT, WIDTH, seed) for seed in range(7)]
    with ThreadPoolExecutor(2) as pool:
        photos = list(pool.map(lambda i: encode(np.roll(bases[i % 7], 40 * i, axis=1), "JPEG"), range(COUNT)))
    write_files(images, {f"{i:03d}.jpg": data for i, data in enumerate(photos)})
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "label.py"), "--images", images, "--checkpoint",
           tiny_checkpoint[0], "--output", str(tmp / "out"), "--max-side", "64", "--batch-size", "2", "--no-progress"]
    code, stdout, peak = run_measuring_memory(cmd, env=env, cwd=ROOT, every=0.1, timeout=600)
    return code, json.loads(stdout.decode().strip().splitlines()[-1]), peak


def test_every_photo_is_labeled(run):
    code, summary, _ = run
    assert code == 0 and (summary["labelled"], summary["errors"]) == (COUNT, 0), summary


def test_the_object_store_never_holds_most_of_the_runs_label_maps(run):
    """Before, the write tasks gathered --rows-per-file (1,000) rows, so all 96 maps (104 MB) sat in the object store
    at once; now an inference call's block (8 maps: --batch-size 2) at a time, and a block leaves when staged."""
    _, _, peak = run
    maps_mb = COUNT * HEIGHT * WIDTH / 1e6
    assert peak["shm_kb"] * 1024 / 1e6 < 0.5 * maps_mb, (peak, maps_mb)
