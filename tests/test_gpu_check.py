"""bench/gpu_check.sh --dry-run: the prepared GPU check runs every step on CPU at tiny sizes, so a GPU minute is
never spent debugging it (see bench/gpu_check.py)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.ray_job  # starts jobs with their own Ray (make test-fast leaves it out)
@pytest.mark.slow  # a minute: the GPU check's five steps on a Ray of its own (make test-slow)
def test_dry_run_runs_every_step_and_ends_with_the_summary(tmp_path):
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["failed"] == []
    label, train = summary["label"], summary["train"]
    for padding in ("reference", "same"):
        assert label[padding]["labelled"] == summary["data"]["label_images"] and label[padding]["errors"] == 0
        assert label[padding]["images_per_second_pipeline"] > 0
    assert set(label["forward_ceiling_images_per_second_by_batch"]) == {"1", "4", "8", "16", str(label["batch_size"])}
    assert label["reference"]["inference"]["upsampling"] == {"upscore2": "grouped", "upscore_pool4": "grouped",
                                                             "upscore8": "grouped"}
    assert label["reference_pipeline_vs_ceiling"] > 0
    assert label["syncs"] is None  # CUDA only
    assert label["precision"]["pixels_differing_share"] == 0.0  # no autocast on CPU: the same arithmetic
    assert label["comparison_weights"] == "trained"
    repro = label["reproducibility"]
    assert repro["fast_stable_within_process"] and repro["reproducible_stable_within_process"]
    assert 0 <= repro["pixels_differing_share"] < 0.01 and repro["fast_levers"]["grouped_upsampling"]
    assert summary["skipped"] == [] and summary["result_name"].endswith("-cpu-dry-run.json")
    assert [e["epoch"] for e in train["epochs"]] == [1, 2] and 0 < train["val_share"] < 1
    assert summary["train_probe"]["flops_per_train_image"] > 0 and train["mfu"] is None
    assert summary["evaluate"]["equal"] is True
    assert_tiled_figures(label["tiled"])
    logs = {p.name for p in out.iterdir()}
    assert {"gpu_check.log", "train.log", "evaluate.log", "label_reference.log", "label_same.log",
            "label_tiled.log"} <= logs
    assert not any(name.endswith(".traceback.txt") for name in logs)


def test_bad_usage_is_one_line(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown option --fast (usage: bench/gpu_check.sh [--dry-run] [OUTDIR] [-- GPU_CHECK_ARGS...])"]
    if not os.path.exists(os.path.join(REPO, ".gpukit", "install.sh")):  # a checkout without the kit (CI's)
        proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                              text=True)
        assert proc.returncode == 2 and "no .gpukit/ here" in proc.stderr


def test_steps_and_deadline_always_return_figures(tmp_path):
    """A step selector pulls in what a step needs; past the deadline steps are skipped, not failed, and the
    summary still comes back."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from gpu_check import selected_steps

    assert selected_steps("evaluate") == ["data", "train_probe", "train", "evaluate"]
    assert selected_steps("fwd_matrix,syncs") == ["fwd_matrix", "data", "prepare_images", "syncs"]
    assert selected_steps("label_tiled") == ["data", "label_tiled"]
    assert selected_steps(None)[-1] == "label_tiled"  # last: a short call's deadline skips it first
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out), "--", "--steps", "forward_ceiling",
                           "--deadline-s", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["failed"] == []
    assert summary["steps"] == ["data", "prepare_images", "forward_ceiling"]
    assert set(summary["skipped"]) >= {"prepare_images", "forward_ceiling"} and "forward_ceiling" not in summary["ran"]
    assert "label_reference.log" not in {p.name for p in out.iterdir()}


def assert_tiled_figures(tiled: dict) -> None:
    """The label_tiled step's figures on the dry run's 6 JPEGs of 200x150 at --tile 64 (12 tiles each)."""
    from pipeline.label.tiling import Tiling

    assert tiled["labelled"] == tiled["label_rows"] == 6 and tiled["errors"] == 0
    assert (tiled["tile"], tiled["image_size"]) == (64, "200x150")
    assert tiled["tiles"] == 6 * Tiling(64).count(150, 200) == 72 and tiled["tiles_per_image"] == 12
    assert tiled["megapixels"] == 6 * 200 * 150 / 1e6
    for kind in ("end_to_end", "pipeline", "after_model_ready"):
        assert tiled[f"megapixels_per_second_{kind}"] > 0 and tiled[f"tiles_per_second_{kind}"] > 0
        assert tiled[f"{kind}_vs_ceiling"] > 0
    assert tiled["seconds"]["end_to_end"] >= tiled["seconds"]["pipeline"] > 0
    assert tiled["forward_ceiling_tiles_per_second"] > 0
    assert tiled["forward_ceiling_megapixels_per_second"] == pytest.approx(
        tiled["forward_ceiling_tiles_per_second"] * 64 * 64 / 1e6, rel=1e-2)
    # The ratio is the job's tiles/s over the bare forward's (both printed), not some other pair of figures.
    assert tiled["pipeline_vs_ceiling"] == pytest.approx(
        tiled["tiles_per_second_pipeline"] / tiled["forward_ceiling_tiles_per_second"], rel=1e-2)


@pytest.mark.ray_job  # one labeling job on the check's Ray (make test-fast leaves it out)
@pytest.mark.slow  # half a minute on 2 cores, most of it Ray's start and the job's process (make test-slow)
def test_dry_run_tiled_step_reports_megapixels_tiles_and_the_ceiling(tmp_path):
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out), "--", "--steps", "label_tiled"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == [] and summary["skipped"] == []
    assert summary["steps"] == summary["ran"] == ["data", "label_tiled"]
    assert_tiled_figures(summary["label"]["tiled"])
    assert "label_tiled.log" in {p.name for p in out.iterdir()}


def test_tiled_step_parts_without_a_job(tmp_path):
    """What label_tiled builds its figures from, without Ray (make test): the large JPEGs (distinct names, a few
    distinct images, reused), labels/'s pixels and tiles, and the bare forward at the tile shape."""
    import sys

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from gpu_check import DRY, forward_ceiling, labels_pixels_and_tiles, make_tiled_images, tile_canvases

    from pipeline.label.tiling import Tiling
    from pipeline.testbed import random_checkpoint

    made = make_tiled_images(str(tmp_path), DRY, 6)
    names = sorted(os.listdir(made["images"]))
    assert len(names) == 6 and made["distinct"] == 2
    assert {Image.open(os.path.join(made["images"], n)).size for n in names} == {(200, 150)}
    assert len({os.stat(os.path.join(made["images"], n)).st_ino for n in names}) == 2  # hard links
    assert make_tiled_images(str(tmp_path), DRY, 6) == {"images": made["images"], "count": 6, "reused": True}

    part = tmp_path / "out" / "labels" / "run_date=2026-12-07"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"width": pa.array([4000, 200, 500], pa.int32()), "height": pa.array([3000, 150, 375], pa.int32()),
                             "tiles": pa.array([88, 12, None], pa.int32())}), part / "part-a.parquet")
    pq.write_table(pa.table({"width": pa.array([10], pa.int32()), "height": pa.array([10], pa.int32()),
                             "tiles": pa.array([0], pa.int32())}), part / "part-b.parquet")
    assert labels_pixels_and_tiles(str(tmp_path / "out")) == (4, 12_000_000 + 30_000 + 187_500 + 100, 100)

    items = tile_canvases(made["images"], Tiling(64), 8)
    assert len(items) == 8 and {p.canvas.shape for p in items} == {(64, 64, 3)}
    rgb = np.asarray(Image.open(os.path.join(made["images"], names[0])).convert("RGB"))
    assert (items[1].canvas == rgb[0:64, 48:112]).all()  # the grid's second tile: one step (48 px) along
    ck = str(tmp_path / "fcn8s.pt")
    random_checkpoint(ck, ["background", "a", "b"], width_mult=DRY.width_mult)
    assert forward_ceiling(ck, DRY, items, (4,), [])["4"] > 0
