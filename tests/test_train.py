"""Distributed training job: learning, DDP exactness, fault tolerance, resume, S3 checkpoints, evaluate.py.

Reduced-width FCN-8s on small synthetic images; every run uses the session's local Ray (2 CPUs): workers
take half a CPU each so Ray Data keeps a CPU for decoding.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from models import load_checkpoint
from models.layers import bilinear_kernel
from pipeline import faults, storage
from pipeline.lease import Lease
from pipeline.storage import Location
from pipeline.synthetic import synthesize_voc
from pipeline.testbed import random_checkpoint
from pipeline.train.run_state import ledger, run_location
from tests import storage_util
from tests.conftest import reset_s3
from tests.images import encode, palette_mask
from tests.jobs_util import load_job, run_in_process, run_subprocess

TINY = ["--num-classes", "6", "--width-mult", "0.0625", "--padding", "same", "--num-workers", "2",
        "--cpus-per-worker", "0.5", "--optimizer", "adam", "--lr", "0.005", "--min-scale", "0.75", "--max-scale", "1.5"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "syn")
    synthesize_voc(root, 600, size=(64, 48), seed=1)
    return root


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "small")
    synthesize_voc(root, 40, size=(48, 40), seed=2, val_fraction=0.25)
    return root


def _train(capsys, data, storage_uri, name, *extra):
    return run_in_process("train", ["--data", data, "--storage", storage_uri, "--name", name, *TINY, *extra], capsys)


def _job_summary(name: str, argv: list[str]) -> dict:
    """run_in_process for a module-scoped fixture, which cannot use capsys: the job's stdout is captured here."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert load_job(name).main(argv) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def learned(ray_module, s3_server, synthetic, tmp_path_factory) -> dict:
    """One 6-epoch, 2-worker run to S3 whose rank 0 is SIGKILLed right after reporting epoch 2 (once; the workers get
    the variable via runtime_env), then evaluate.py from its latest S3 checkpoint with --report. The tests below each
    check one facet of it. What they check is read here: the function-scoped `s3` fixture of a later test empties
    the server."""
    import s3fs

    from pipeline.train.run_log import read_metrics

    reset_s3(s3_server)
    s3fs.S3FileSystem().mkdir("test-bucket")
    tmp = tmp_path_factory.mktemp("learn")
    killed = tmp / "_fault_injected"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(faults.ENV, f"train.reported:epoch2=kill_once:{killed}")
        summary = _job_summary("train", ["--data", synthetic, "--storage", "s3://test-bucket/runs", "--name", "learn", *TINY,
                                         "--epochs", "6", "--batch-size", "4", "--crop-size", "48", "--max-failures", "1"])
    latest = load_checkpoint(summary["latest_checkpoint"])
    report = tmp / "report"
    evaluated = _job_summary("evaluate", ["--data", synthetic, "--checkpoint", summary["latest_checkpoint"],
                                          "--report", str(report)])
    run = Location.of("s3://test-bucket/runs/learn")
    events = run.fs.ls(run.child("tensorboard").path)
    return {"summary": summary, "killed": killed.exists(), "ledger": [r["epoch"] for r in ledger(run)], "latest": latest,
            "evaluated": evaluated, "report": report, "metrics": read_metrics(run),
            "events": {e: run.fs.size(e) for e in events}, "curves": run.child("curves.png").exists()}


def test_a_killed_worker_restarts_from_its_checkpoint_and_every_epoch_trains_once(learned):
    # The run restarts its workers from epoch 2's checkpoint and still trains every epoch exactly once.
    summary = learned["summary"]
    assert learned["killed"]  # the worker really died
    assert summary["epochs"] == 6 and summary["epochs_trained_now"] == [1, 2, 3, 4, 5, 6]
    assert learned["ledger"] == [1, 2, 3, 4, 5, 6]


def test_two_workers_learn_beyond_chance(learned):
    summary = learned["summary"]
    # Chance here: predicting background everywhere gives mean IU ~0.15 on this set (6 classes).
    assert summary["best_mean_iou"] > 0.24, summary["final_metrics"]  # measured 0.30-0.31 with this recipe
    assert summary["images_per_second"] > 0


def test_frozen_upsampling_keeps_the_bilinear_kernel_bit_for_bit(learned):
    # Upsampling is frozen by default: the three upsamplers are still the bilinear kernel, bit for bit.
    summary, latest = learned["summary"], learned["latest"]
    assert summary["upsampling"] == "frozen"
    assert summary["train_settings"]["compile"] == "off" and summary["train_settings"]["optimizer_impl"] == "fused"
    assert latest.metadata["upsampling"] == "frozen" and latest.metadata["train_config"]["learn_upsampling"] is False
    state = latest.model.state_dict()
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        w = state[f"{name}.weight"]
        assert torch.equal(w, bilinear_kernel(6, w.shape[-1])), name  # bit for bit
    assert state["score_fr.weight"].abs().sum() > 0  # the rest trained (score layers start at zero)


def test_the_best_checkpoints_and_the_latest_are_kept_on_s3(learned):
    summary, latest = learned["summary"], learned["latest"]
    assert summary["best_checkpoint"].startswith("s3://test-bucket/runs/learn/epoch_")
    # Best K (3) by mean IU plus the latest are kept; the rest were deleted.
    assert len(summary["kept_checkpoints"]) <= 4 and summary["latest_checkpoint"] in summary["kept_checkpoints"]
    assert latest.metadata["epoch"] == 6 and latest.config.num_classes == 6


def test_evaluate_from_the_s3_checkpoint_reproduces_training_validation_exactly(learned):
    trained, evaluated = learned["latest"].metadata["metrics"], learned["evaluated"]
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-12), key
    assert evaluated["per_class_iou"] == pytest.approx(trained["per_class_iou"], abs=1e-12)
    assert evaluated["images"] == trained["val_images"] == 120


def test_evaluate_report_is_consistent_with_the_scores(learned):
    # --report: per-class CSV/JSON and a row-normalised confusion heatmap, consistent with the scores.
    import csv

    report, evaluated = learned["report"], learned["evaluated"]
    assert sorted(os.listdir(report)) == ["confusion.json", "confusion.png", "per_class.csv", "per_class.json"]
    rows = list(csv.DictReader(open(report / "per_class.csv")))
    assert [r["class_name"] for r in rows] == learned["latest"].class_names
    for row, iou in zip(rows, evaluated["per_class_iou"], strict=True):
        assert (float(row["iou"]) if row["iou"] else None) == pytest.approx(iou)
    matrix = np.array(json.loads((report / "confusion.json").read_text())["matrix"])
    assert matrix.sum() == sum(int(r["gt_pixels"]) for r in rows) > 0
    assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_run_metrics_and_tensorboard_events_reach_s3(learned):
    # TensorBoard writes locally and each epoch uploads its event file.
    assert [r["epoch"] for r in learned["metrics"]] == [1, 2, 3, 4, 5, 6]
    events = learned["events"]
    # One event file per rank-0 process: the one killed after epoch 2 and the one that trained epochs 3-6.
    assert len(events) == 2 and all("tfevents" in e and size > 0 for e, size in events.items())
    assert learned["curves"]


def _uniform_dataset(root, n_train=4):
    """Images whose masks have void pixels in different amounts per image (the exactness test needs them)."""
    rng = np.random.default_rng(0)
    ids = [f"u{i}" for i in range(n_train + 1)]
    for k, i in enumerate(ids):
        image = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
        mask = rng.integers(0, 3, size=(32, 32), dtype=np.uint8)
        mask[: 2 + 5 * k, :] = 255
        storage_util.write_bytes(storage.join(root, "JPEGImages", f"{i}.jpg"), encode(image, "JPEG", quality=95))
        storage_util.write_bytes(storage.join(root, "SegmentationClass", f"{i}.png"), palette_mask(mask))
    storage_util.write_text(storage.join(root, "ImageSets", "Segmentation", "train.txt"), "\n".join(ids[:n_train]))
    storage_util.write_text(storage.join(root, "ImageSets", "Segmentation", "val.txt"), ids[-1])


def test_ddp_two_workers_equal_one_worker_double_batch(ray_session, tmp_path, capsys):
    data = str(tmp_path / "uniform")
    _uniform_dataset(data)
    common = ["--data", data, "--storage", str(tmp_path / "runs"), "--num-classes", "3", "--width-mult", "0.0625",
              "--padding", "same", "--cpus-per-worker", "0.5", "--epochs", "1", "--crop-size", "32",
              "--min-scale", "1", "--max-scale", "1", "--no-flip", "--dropout", "0", "--optimizer", "sgd",
              "--lr", "0.5", "--seed", "7"]
    two = run_in_process("train", [*common, "--name", "two", "--num-workers", "2", "--batch-size", "2"], capsys)
    one = run_in_process("train", [*common, "--name", "one", "--num-workers", "1", "--batch-size", "4"], capsys)
    # Two batches of 1 per worker, gradients accumulated (DDP no_sync) and all-reduced once in bf16.
    accum = run_in_process("train", [*common, "--name", "accum", "--num-workers", "2", "--batch-size", "1",
                                     "--grad-accum", "2", "--grad-compression", "bf16"], capsys)
    w2 = load_checkpoint(two["latest_checkpoint"]).model.state_dict()
    w1 = load_checkpoint(one["latest_checkpoint"]).model.state_dict()
    wa = load_checkpoint(accum["latest_checkpoint"]).model.state_dict()
    torch.manual_seed(7)
    from models import build_model
    w0 = build_model("fcn8s", 3, width_mult=0.0625, padding="same").state_dict()
    assert not torch.allclose(w1["score_fr.weight"], w0["score_fr.weight"])  # the step did change the weights
    for k in w1:
        assert torch.allclose(w2[k], w1[k], atol=1e-6, rtol=1e-5), k
        # bf16 keeps 8 bits of each gradient: one step of lr 0.5 moves a weight by at most ~1% more or less.
        step = (w1[k] - w0[k]).abs().max().item()
        assert (wa[k] - w1[k]).abs().max().item() <= 0.02 * step + 1e-6, k
    assert not all(torch.equal(wa[k], w1[k]) for k in w1)  # the compression did round
    assert two["final_metrics"]["loss"] == pytest.approx(one["final_metrics"]["loss"], rel=1e-5)
    assert accum["final_metrics"]["loss"] == pytest.approx(one["final_metrics"]["loss"], rel=1e-5)


def _as_if_saved_on_a_gpu(epoch_dir: str) -> None:
    """Rewrite train_state.pt with CUDA location tags, as a GPU worker saves it, and record it in state.json."""
    from torch import serialization

    state = torch.load(os.path.join(epoch_dir, "train_state.pt"), weights_only=True)
    tag_cuda = (0, lambda obj: "cuda:0", lambda obj, location: None)
    serialization._package_registry.append(tag_cuda)
    serialization._package_registry.sort(key=lambda entry: entry[0])
    try:
        torch.save(state, os.path.join(epoch_dir, "train_state.pt"))
    finally:
        serialization._package_registry.remove(tag_cuda)
    data = open(os.path.join(epoch_dir, "train_state.pt"), "rb").read()
    with pytest.raises(RuntimeError, match="CUDA"):  # what a load without map_location does on this machine
        torch.load(os.path.join(epoch_dir, "train_state.pt"), weights_only=True)
    meta = json.load(open(os.path.join(epoch_dir, "state.json")))
    meta.update(state_bytes=len(data), state_sha256=hashlib.sha256(data).hexdigest())
    json.dump(meta, open(os.path.join(epoch_dir, "state.json"), "w"))


def test_stop_and_resume_continues_at_next_epoch(ray_session, small_synthetic, tmp_path, capsys, http_server,
                                                monkeypatch):
    runs = str(tmp_path / "runs")
    args = ["--batch-size", "4", "--crop-size", "32"]
    # The first two runs name --data and --storage relative to the user's folder, as the README does: Ray Train's
    # workers run in another working directory, so before (issue 21), metrics.jsonl and ledger/ went there and a
    # rerun with more epochs trained nothing new.
    shutil.copytree(small_synthetic, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    # Initialised from a presigned URL: its signature and token must not reach the checkpoints or the summary.
    www, base = http_server
    random_checkpoint(str(www / "stage1.pt"), [f"c{i}" for i in range(6)], padding="same")
    presigned = f"{base}/stage1.pt?X-Amz-Signature=5ec7e75191a7b0a7&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE"
    first = _train(capsys, "data", "runs", "resume", "--epochs", "1", *args, "--init-from", presigned)
    run_dir = tmp_path / "runs" / "resume"
    assert first["run"] == str(run_dir) and first["epochs_trained_now"] == [1] and first["ledger_epochs"] == [1]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    assert len(list((run_dir / "ledger").glob("epoch_0001-*.json"))) == 1
    epoch_1 = storage.join(runs, "resume", "epoch_0001")
    stored = load_checkpoint(storage.join(epoch_1, "model.pt")).metadata["train_config"]["init_from"]
    assert stored.startswith(f"{base}/stage1.pt?") and "Signature=***" in stored
    for name in ("model.pt", "state.json"):
        data = open(storage.join(epoch_1, name), "rb").read()
        assert b"5ec7e75191a7b0a7" not in data and b"FwoGZXIvYXdzEXAMPLE" not in data, name
    # A rerun must keep the architecture and the optimiser: refused before any cluster work, naming the fields.
    base = ["--data", small_synthetic, "--storage", runs, "--name", "resume", "--epochs", "2", *TINY, *args]
    _fails_fast([*base, "--width-mult", "0.125"], "--width-mult 0.0625 (this run: 0.125)")
    _fails_fast([*base, "--optimizer", "sgd", "--padding", "reference"], "--padding same (this run: reference); --optimizer adam")
    _as_if_saved_on_a_gpu(storage.join(runs, "resume", "epoch_0001"))  # a CPU-only resume must still load it
    second = _train(capsys, "data", "runs", "resume", "--epochs", "2", *args, "--weight-decay", "0.001")
    assert second["epochs_trained_now"] == [2] and second["epochs"] == 2 and second["ledger_epochs"] == [1, 2]
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [r["epoch"] for r in ledger(Location.of(storage.join(runs, "resume")))] == [1, 2]
    state = torch.load(storage.join(runs, "resume", "epoch_0002", "train_state.pt"), weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [1, 2]  # history carried over from epoch 1
    # The saved optimiser state brings its buffers; this run's --weight-decay applies from the resumed epoch on.
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.001}
    again = _train(capsys, small_synthetic, runs, "resume", "--epochs", "2", *args)
    assert again["epochs_trained_now"] == [] and again["epochs"] == 2
    # epoch_0002/model.pt altered in place (same size, as a second writer would leave it): its hash no longer
    # matches state.json, so the next resume starts after epoch 1 instead of loading it.
    model = storage.join(runs, "resume", "epoch_0002", "model.pt")
    data = bytearray(open(model, "rb").read())
    data[-100] ^= 0xFF
    open(model, "wb").write(bytes(data))
    third = _train(capsys, small_synthetic, runs, "resume", "--epochs", "3", *args)
    assert third["epochs"] == 3
    assert [r["epoch"] for r in ledger(Location.of(storage.join(runs, "resume")))] == [1, 2, 2, 3]  # epoch 2 again
    # metrics.jsonl: one line per epoch across the resumes (epoch 2 trained again replaced its line), with the
    # learning rate, wall time and images/s; curves.png and TensorBoard events beside it.
    from pipeline.train.run_log import read_metrics

    run = Location.of(storage.join(runs, "resume"))
    lines = read_metrics(run)
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all({"loss", "mean_iou", "per_class_iou", "lr", "epoch_seconds", "images_per_second", "time"} <= set(r)
               for r in lines)
    assert lines[2]["mean_iou"] == third["best_mean_iou"] or lines[2]["mean_iou"] <= third["best_mean_iou"]
    assert open(storage.join(runs, "resume", "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = set()
    for name in os.listdir(storage.join(runs, "resume", "tensorboard")):
        events = EventAccumulator(storage.join(runs, "resume", "tensorboard", name))
        events.Reload()
        steps |= {e.step for e in events.Scalars("val/mean_iou")}
    assert steps == {1, 2, 3}
    # evaluate.py with relative --data, --checkpoint and --report: resolved in the driver as well.
    evaluated = run_in_process("evaluate", ["--data", "data", "--checkpoint", "runs/resume/epoch_0003/model.pt",
                                            "--report", "report"], capsys)
    assert evaluated["checkpoint"] == str(run_dir / "epoch_0003" / "model.pt")
    assert (tmp_path / "report" / "per_class.csv").exists()


def _fails_fast(argv, expect, subprocess: bool = False):
    """The job fails before any cluster work: exit 2, one `error:` line naming `expect`. In this process by default,
    as jobs/train.py runs it (run_job), with Ray's start as a tripwire: each subprocess imported torch again (~4 s)."""
    if subprocess:
        proc = run_subprocess("train", argv, timeout=120)
        code, err = proc.returncode, proc.stderr
        assert "Started a local Ray instance" not in proc.stderr + proc.stdout  # failed before any cluster work
    else:
        import contextlib
        import io

        from pipeline.cli import run_job

        def cluster_work(*args, **kwargs):
            raise AssertionError("the job started Ray before failing")

        buffer = io.StringIO()
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(buffer), pytest.raises(SystemExit) as exc:
            patch.setattr("pipeline.train.run.init_ray", cluster_work)
            run_job(load_job("train").main, argv)
        code, err = exc.value.code, buffer.getvalue()
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], err[-2000:]


def test_a_run_folder_in_use_is_refused_with_its_holder(small_synthetic, tmp_path):
    runs = str(tmp_path / "runs")
    argv = ["--data", small_synthetic, "--storage", runs, "--name", "busy", *TINY]
    with Lease.acquire(run_location(runs, "busy"), holder="the nightly run 7", what="run"):
        _fails_fast(argv, "is in use by the nightly run 7")
    assert not os.path.exists(storage.join(runs, "busy", "_lease.json"))  # released: the next run may start


def test_a_stopped_run_does_not_block_the_next_one(small_synthetic, tmp_path):
    """`ray job stop` sends SIGTERM, then SIGKILL a few seconds later. Either way the next run must not wait ten
    minutes for the lease to go stale: SIGTERM releases it when Python gets to run the handler, and a holder
    whose process is gone from this host (where `ray job submit` runs drivers) is taken over at once."""
    import signal
    import subprocess
    import sys
    import time

    from tests.jobs_util import ROOT

    lease = tmp_path / "runs" / "term" / "_lease.json"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "train.py"), "--data", small_synthetic,
                             "--storage", str(tmp_path / "runs"), "--name", "term", *TINY],
                            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not lease.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never took its lease"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()  # what ray job stop does next
            proc.wait(timeout=60)
    finally:
        proc.kill()
    started = time.monotonic()
    with Lease.acquire(run_location(str(tmp_path / "runs"), "term"), holder="next run", what="run"):
        pass
    assert time.monotonic() - started < 5


def test_workers_leaving_no_cpu_for_the_input_pipeline_fail_at_start(ray_session, small_synthetic, tmp_path, capsys):
    """A 2-worker run whose workers take every CPU: before, Ray Data waited for a CPU forever, without a word. In this
    process, on the session's Ray (its own Ray in a subprocess cost ~12 s more: Ray's start and torch's import)."""
    from pipeline.cli import run_job

    cpus = str(int(ray_session.cluster_resources()["CPU"]))
    with pytest.raises(SystemExit) as exc:
        run_job(load_job("train").main, ["--data", small_synthetic, "--storage", str(tmp_path / "runs"), "--name", "x",
                                         "--num-classes", "6", "--width-mult", "0.0625", "--num-workers", "2",
                                         "--cpus-per-worker", cpus])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(errors) == 1, err[-2000:]
    assert f"need {2 * int(cpus) + 1} CPUs" in errors[0] and "--data-cpus" in errors[0], errors


def test_a_stalled_input_pipeline_ends_the_run_with_one_line(ray_session, small_synthetic, tmp_path, capsys):
    """The cluster has the CPUs on paper, but another job holds one: the decode tasks never run."""
    import jobs.train as job
    from pipeline.cli import run_job

    @ray_session.remote(num_cpus=1)
    class Hog:
        def ready(self):
            return True

    hog = Hog.remote()
    ray_session.get(hog.ready.remote())
    try:
        with pytest.raises(SystemExit) as exc:
            run_job(job.main, ["--data", small_synthetic, "--storage", str(tmp_path / "runs"), "--name", "stall", *TINY,
                               "--epochs", "1", "--batch-size", "4", "--crop-size", "32", "--stall-timeout", "5",
                               "--max-failures", "0"])
    finally:
        ray_session.kill(hog)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(lines) == 1 and "no training batch for 5 s" in lines[0], err[-3000:]


def test_clear_errors_before_cluster_work(small_synthetic, tmp_path):
    base = ["--storage", str(tmp_path / "runs"), "--name", "x", "--width-mult", "0.0625"]
    _fails_fast(["--data", str(tmp_path / "missing"), *base, "--num-classes", "6"], "dataset not found", subprocess=True)
    empty = tmp_path / "empty"
    (empty / "ImageSets" / "Segmentation").mkdir(parents=True)
    (empty / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    _fails_fast(["--data", str(empty), *base, "--num-classes", "6"], "has no samples")
    _fails_fast(["--data", small_synthetic, *base, "--num-classes", "21"], "does not match the 6 classes")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    _fails_fast(["--data", small_synthetic, *base, "--num-classes", "6", "--init-from", str(bad)], "truncated or corrupt")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails_fast(["--data", small_synthetic, "--storage", str(blocker), "--name", "x", "--num-classes", "6"], "cannot write")
    _fails_fast(["--data", small_synthetic, *base, "--num-classes", "6", "--epochs", "0"], "--epochs must be >= 1")


def test_num_classes_defaults_to_the_datasets_classes(small_synthetic, tmp_path):
    """--num-classes left out: the dataset's classes.txt decides (6 here), else the 21 VOC classes."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.run import preflight, resolve

    cfg, _, _, class_names, _ = preflight(*resolve(TrainConfig(data=small_synthetic, storage=str(tmp_path / "runs"),
                                                               name="n")))
    assert cfg.num_classes == len(class_names) == 6 and class_names[0] == "background"
    plain = str(tmp_path / "plain")
    shutil.copytree(small_synthetic, plain)
    os.remove(os.path.join(plain, "classes.txt"))
    cfg, *_ = preflight(*resolve(TrainConfig(data=plain, storage=str(tmp_path / "runs"), name="n")))
    assert cfg.num_classes == 21


def test_help_documents_every_option():
    proc = run_subprocess("train", ["--help"])
    assert proc.returncode == 0
    for option in ["--data", "--model", "--num-classes", "--storage", "--name", "--num-workers", "--use-gpu",
                   "--cpus-per-worker", "--padding", "--width-mult", "--backbone-weights", "--init-from", "--epochs",
                   "--batch-size", "--crop-size", "--amp", "--max-failures", "--keep-best", "--learn-upsampling",
                   "--compile", "--no-cudnn-benchmark", "--no-fused-optimizer"]:
        assert option in proc.stdout
    assert "(default: 50)" in proc.stdout  # defaults are shown
    flip = proc.stdout[proc.stdout.index("  --no-flip"):].split("\n  --")[0]
    assert "on by default" in flip and "(default: True)" not in flip  # a negative flag says what it turns off
    for negative in ("--no-cudnn-benchmark", "--no-fused-optimizer"):
        text = " ".join(proc.stdout[proc.stdout.index(f"  {negative}"):].split("\n  --")[0].split())
        assert "on by default" in text and "(default: True)" not in text, negative
