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
    logs = {p.name for p in out.iterdir()}
    assert {"gpu_check.log", "train.log", "evaluate.log", "label_reference.log", "label_same.log"} <= logs
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
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(out), "--", "--steps", "forward_ceiling",
                           "--deadline-s", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and summary["failed"] == []
    assert summary["steps"] == ["data", "prepare_images", "forward_ceiling"]
    assert set(summary["skipped"]) >= {"prepare_images", "forward_ceiling"} and "forward_ceiling" not in summary["ran"]
    assert "label_reference.log" not in {p.name for p in out.iterdir()}
