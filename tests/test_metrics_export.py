"""Both jobs' Prometheus metrics (pipeline.telemetry), read from a real local Ray's metrics export port during
and after a real run, and checked against the run's own summary, output tables and metrics.jsonl."""
from __future__ import annotations

import os
import re
import threading
import time

import pytest

from pipeline import faults
from pipeline.label.config import LabelConfig
from pipeline.label.job import label_images
from pipeline.synthetic import synthesize_voc
from pipeline.telemetry import LABEL_METRICS, PREFIX, STAGES, TRAIN_METRICS
from pipeline.train.config import TrainConfig
from pipeline.train.run import run_training
from pipeline.train.run_log import read_metrics
from pipeline.train.run_state import run_location
from tests.images import broken_files
from tests.label_fixtures import good_image, tables, write_files
from tests.scrape import free_port, total, wait_for

# It starts a Ray of its own (with a metrics port and a short report interval): it runs with the multinode tests.
pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module")
def metrics_port(tmp_path_factory):
    """A local Ray whose metrics agent exports on a known port; processes report every 0.5 s (default 10 s)."""
    import ray

    from tests.conftest import _shutdown_ray

    _shutdown_ray()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    port = free_port()
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500})
    yield port
    _shutdown_ray()


def _m(name: str) -> str:
    return PREFIX + name


def _label_config(images, ck, output, **kw) -> LabelConfig:
    # images_per_small_file=1: every staged block (an inference call's 2 rows) is committed on its own as a file set.
    return LabelConfig(images=images, checkpoint=ck, output=output, actors=1, threads_per_actor=1, batch_size=2,
                       rows_per_read_task=2, rows_per_file=3, rows_per_actor_call=2, images_per_small_file=1,
                       max_side=32, progress=False, **kw)


def _filesets(output: str, run_id: str) -> set[str]:
    """The file sets a run published: each puts its name in the file of every table it wrote (labels files add -NNNN)."""
    names = set()
    pattern = rf"part-({re.escape(run_id)}-g[0-9a-f]{{11}})(-[0-9]{{4}})?\.parquet$"
    for _, _, files in os.walk(output):
        names |= {m.group(1) for f in files if (m := re.search(pattern, f))}
    return names


def test_labeling_metrics_during_and_after_a_run(metrics_port, s3_server, tiny_checkpoint, tmp_path, monkeypatch):
    ck, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"old{i}.png": good_image(i, 18, 20) for i in range(3)})
    # Two nights, a day apart, so that the second has drift figures; every pixel is below --low-confidence 1.0, so
    # both nights have a low-confidence share (1.0) and the second a ratio to the first's (1.0).
    first = label_images(_label_config(images, ck, output, run_id="night-1", run_date="2026-12-01", low_confidence=1.0))
    assert first["labelled"] == 3
    bad = broken_files()
    write_files(images, {**{f"new{i:02d}.png": good_image(10 + i, 18, 22) for i in range(7)},
                         "new_truncated.jpg": bad["truncated.jpg"], "new_zero.jpg": bad["zero.jpg"],
                         "new_notes.jpg": bad["notes.jpg"]})

    # The second night holds at its first commit until `go` exists: a run that has not committed for a while.
    go = tmp_path / "go"
    monkeypatch.setenv(faults.ENV, f"label.commit:committed=wait_for:{go}")
    result: dict = {}
    canary = str(tmp_path / "canary")  # the second night also scores a canary set: its gauges
    synthesize_voc(canary, 4, size=(24, 20), seed=6, val_fraction=0.5)
    run = threading.Thread(target=lambda: result.update(label_images(_label_config(
        images, ck, output, run_id="night-2", run_date="2026-12-02", low_confidence=1.0, canary=canary,
        canary_min_iou=0.0))))
    run.start()
    try:
        tags = {"run_id": "night-2"}
        during = wait_for([metrics_port], lambda s: (total(s, _m("fcn_label_images_to_label"), **tags) is not None
                                                     and (total(s, _m("fcn_label_seconds_since_last_commit"), **tags) or 0) >= 2))
        assert total(during, _m("fcn_label_running"), **tags) == 1
        assert total(during, _m("fcn_label_images_listed"), **tags) == 13
        assert total(during, _m("fcn_label_images_skipped"), **tags) == 3
        assert total(during, _m("fcn_label_images_to_label"), **tags) == 10
        assert total(during, _m("fcn_label_commits_total"), **tags) is None
        assert total(during, _m("fcn_label_images_labeled_total"), **tags) is None  # a counter appears at its first inc
        assert total(during, _m("fcn_label_images_committed"), **tags) == 0
        # No commit yet: the last-commit time is the start of the run, and the age keeps growing.
        assert total(during, _m("fcn_label_last_commit_timestamp_seconds"), **tags) == \
            total(during, _m("fcn_label_run_started_timestamp_seconds"), **tags)
        age = total(during, _m("fcn_label_seconds_since_last_commit"), **tags)
        later = wait_for([metrics_port], lambda s: total(s, _m("fcn_label_seconds_since_last_commit"), **tags) > age + 1)
        assert total(later, _m("fcn_label_commits_total"), **tags) is None
    finally:
        go.touch()
        run.join(timeout=300)
    monkeypatch.delenv(faults.ENV)
    summary = result
    assert summary["status"] == "succeeded" and (summary["labelled"], summary["errors"]) == (7, 3)

    after = wait_for([metrics_port], lambda s: total(s, _m("fcn_label_running"), **tags) == 0)
    assert total(after, _m("fcn_label_images_labeled_total"), **tags) == summary["labelled"]
    assert total(after, _m("fcn_label_images_listed"), **tags) == summary["listed"]
    assert total(after, _m("fcn_label_images_skipped"), **tags) == summary["skipped"]
    assert total(after, _m("fcn_label_images_per_second"), **tags) == pytest.approx(summary["images_per_second"])
    # Errors by stage: exactly the rows of errors/ this run wrote, stage by stage (no series for a stage without).
    errors = tables(output)["errors"].to_pylist()
    by_stage = {stage: sum(1 for r in errors if r["stage"] == stage and r["run_id"] == "night-2") for stage in STAGES}
    assert sum(by_stage.values()) == summary["errors"]
    assert {st: total(after, _m("fcn_label_image_errors_total"), stage=st, **tags) or 0 for st in STAGES} == by_stage
    assert total(after, _m("fcn_label_images_committed"), **tags) == summary["labelled"] + summary["errors"]
    # One commit per file set here (10 images, 2 per inference call and set); a commit may publish several sets at once.
    assert 4 <= total(after, _m("fcn_label_commits_total"), **tags) <= len(_filesets(output, "night-2"))
    assert total(after, _m("fcn_label_last_commit_timestamp_seconds"), **tags) > \
        total(after, _m("fcn_label_run_started_timestamp_seconds"), **tags)
    # The canary's score and minimum, as the summary has them.
    assert total(after, _m("fcn_label_canary_mean_iou"), **tags) == pytest.approx(summary["canary"]["mean_iou"])
    assert total(after, _m("fcn_label_canary_min_iou"), **tags) == 0.0
    # The quality row's figures, as the summary has them (pipeline.telemetry.QUALITY_GAUGES).
    from pipeline.telemetry import QUALITY_GAUGES

    for key, gauge in QUALITY_GAUGES.items():
        assert total(after, _m(gauge), **tags) == pytest.approx(summary["quality"][key]), key
    # The first night's series are its own.
    assert total(after, _m("fcn_label_images_labeled_total"), run_id="night-1") == first["labelled"]
    # Every metric the dashboard and alert rules name is exported.
    exported = {n.removesuffix("_total") for n, _, _ in after}
    assert {_m(n).removesuffix("_total") for n in LABEL_METRICS} <= exported


def test_training_metrics_during_and_after_a_run(metrics_port, s3_server, tmp_path, monkeypatch):
    data = str(tmp_path / "syn")
    synthesize_voc(data, 16, size=(40, 32), seed=5, val_fraction=0.25)
    cfg = TrainConfig(data=data, storage=str(tmp_path / "runs"), name="metered", num_classes=6, width_mult=0.0625,
                      padding="same", num_workers=1, cpus_per_worker=1, data_cpus=0.5, epochs=2, batch_size=2,
                      crop_size=32, optimizer="adam", lr=0.005, amp="off", max_failures=0)
    go = tmp_path / "go"
    monkeypatch.setenv(faults.ENV, f"train.reported:epoch1=wait_for:{go}")  # rank 0 holds after epoch 1
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(run_training(cfg)))
    run.start()
    tags = {"run": "metered"}
    try:
        during = wait_for([metrics_port], lambda s: total(s, _m("fcn_train_epoch"), **tags) == 1, timeout=240)
        (epoch1,) = read_metrics(run_location(cfg.storage, cfg.name))  # written by rank 0 before it holds
        assert total(during, _m("fcn_train_loss"), **tags) == pytest.approx(epoch1["loss"])
        assert total(during, _m("fcn_train_mean_iou"), **tags) == pytest.approx(epoch1["mean_iou"])
        assert total(during, _m("fcn_train_images_per_second"), **tags) == pytest.approx(epoch1["images_per_second"])
        assert total(during, _m("fcn_train_validation_seconds"), **tags) == pytest.approx(epoch1["val_seconds"])
        assert 0 < time.time() - total(during, _m("fcn_train_last_epoch_timestamp_seconds"), **tags) < 240
    finally:
        go.touch()
        run.join(timeout=300)
    monkeypatch.delenv(faults.ENV)
    summary = result
    assert summary["epochs"] == 2

    after = wait_for([metrics_port], lambda s: total(s, _m("fcn_train_epoch"), **tags) == 2)
    epoch2 = read_metrics(run_location(cfg.storage, cfg.name))[-1]
    assert total(after, _m("fcn_train_loss"), **tags) == pytest.approx(summary["final_metrics"]["loss"])
    assert total(after, _m("fcn_train_mean_iou"), **tags) == pytest.approx(summary["final_metrics"]["mean_iou"])
    assert total(after, _m("fcn_train_images_per_second"), **tags) == pytest.approx(epoch2["images_per_second"])
    assert total(after, _m("fcn_train_validation_seconds"), **tags) == pytest.approx(epoch2["val_seconds"])
    # No worker failed: both restart series exist, at zero.
    assert total(after, _m("fcn_train_restarts"), preempted="false", **tags) == 0
    assert total(after, _m("fcn_train_restarts"), preempted="true", **tags) == 0
    exported = {n.removesuffix("_total") for n, _, _ in after}
    assert {_m(n).removesuffix("_total") for n in TRAIN_METRICS} <= exported
