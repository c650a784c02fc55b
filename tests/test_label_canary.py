"""The canary set (issue 32.2): every run labels a small dataset with masks with its own checkpoint and settings,
scores it, and below its minimum mean IU is `degraded` (exit 3) with every label committed. One scenario, two
runs on one output (a checkpoint whose recorded validation mean IU the random weights cannot reach, then the tiny
checkpoint with --canary-min-iou 0), named tests over it; the refusals need no run."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.decode import decode_image, decode_mask
from pipeline.label.canary import DEGRADED_EXIT_STATUS
from pipeline.label.inference import predict_image
from pipeline.synthetic import synthesize_voc
from pipeline.testbed import random_checkpoint
from tests.images import broken_files
from tests.jobs_util import one_error
from tests.label_fixtures import BATCH, CLASS_NAMES, FAST_FLAGS, MAX_SIDE, good_image, run_label_cli, run_label_job, tables, write_files


def _canary(root: str, seed: int = 5) -> list[str]:
    """A VOC-layout canary of synthetic images (its val split), one of them truncated; returns the val ids."""
    synthesize_voc(root, 10, size=(48, 40), seed=seed, val_fraction=0.5)
    ids = open(os.path.join(root, "ImageSets", "Segmentation", "val.txt")).read().split()
    with open(os.path.join(root, "JPEGImages", f"{ids[0]}.jpg"), "wb") as f:
        f.write(broken_files()["truncated.jpg"])
    return ids


def _iou_by_numpy(preds: list[np.ndarray], masks: list[np.ndarray], classes: int) -> float:
    hist = np.zeros((classes, classes), np.int64)
    for p, m in zip(preds, masks, strict=True):
        keep = m < classes
        hist += np.bincount(m[keep].astype(np.int64) * classes + p[keep], minlength=classes * classes).reshape(classes, classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        iu = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist))
    return float(np.nanmean(iu))


@pytest.fixture(scope="module")
def canary_runs(ray_module, tiny_checkpoint, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("canary")
    root, images, output = str(tmp / "canary"), str(tmp / "photos"), str(tmp / "out")
    ids = _canary(root)
    write_files(images, {f"p{i}.png": good_image(i, 30 + i, 40) for i in range(4)})
    claims = str(tmp / "claims-0.9.pt")  # says its validation mean IU was 0.9: its random weights score far less
    random_checkpoint(claims, CLASS_NAMES, seed=3, metadata={"metrics": {"mean_iou": 0.9}})
    base = ["--images", images, "--output", output, "--canary", root, *FAST_FLAGS]
    degraded = run_label_job([*base, "--checkpoint", claims])
    passed = run_label_job([*base, "--checkpoint", tiny_checkpoint[0], "--canary-min-iou", "0"])
    return {"root": root, "ids": ids, "images": images, "output": output, "claims": claims, "degraded": degraded,
            "passed": passed, "tiny": tiny_checkpoint[0]}


def _summary(run: tuple[int, str, str]) -> dict:
    return json.loads(run[1].strip().splitlines()[-1])


def test_a_canary_below_its_minimum_degrades_the_run_with_one_line_and_exit_3(canary_runs):
    code, _, err = canary_runs["degraded"]
    assert code == DEGRADED_EXIT_STATUS == 3
    line = one_error(code, err, status=3)
    assert line.startswith(f"error: degraded run: canary {canary_runs['root']}: mean IU ") and "below its minimum 0.8500" in line
    assert "(the checkpoint's validation mean IU 0.9000 minus 0.05)" in line, line
    summary = _summary(canary_runs["degraded"])
    assert summary["status"] == "degraded" and summary["canary"]["passed"] is False
    assert summary["canary"]["min_iou"] == 0.85 and summary["canary"]["mean_iou"] < 0.85


def test_a_degraded_run_commits_everything_it_labeled(canary_runs):
    summary = _summary(canary_runs["degraded"])
    assert (summary["labelled"], summary["errors"]) == (4, 0)
    record = json.loads(open(os.path.join(canary_runs["output"], "runs", f"{summary['run_id']}.json")).read())
    assert record["status"] == "degraded" and record["canary"] == summary["canary"] and record["files"]
    labels = tables(canary_runs["output"])["labels"]
    assert sorted(r["image_uri"] for r in labels.to_pylist() if r["run_id"] == summary["run_id"]) == \
        [os.path.join(canary_runs["images"], f"p{i}.png") for i in range(4)]


def test_canary_rows_never_reach_the_tables(canary_runs):
    t = tables(canary_runs["output"])
    for name in ("labels", "class_stats", "errors"):
        assert not [u for u in t[name]["image_uri"].to_pylist() if u.startswith(canary_runs["root"])], name
    assert t["labels"].num_rows == 8  # 4 images, by two checkpoints


def test_the_canary_score_is_the_projects_metric_on_the_run_s_own_labels(canary_runs):
    """mean IU, recomputed with numpy from predict_image's labels with the run's settings, over the canary's
    decodable images; the truncated one is counted and named."""
    canary = _summary(canary_runs["passed"])["canary"]
    root, ids = canary_runs["root"], canary_runs["ids"]
    from models import load_checkpoint

    ck = load_checkpoint(canary_runs["tiny"])
    preds, masks = [], []
    for i in ids[1:]:
        image = decode_image(open(os.path.join(root, "JPEGImages", f"{i}.jpg"), "rb").read())
        preds.append(predict_image(ck, None, image, max_side=MAX_SIDE, batch_size=1).label.astype(np.int64))
        masks.append(decode_mask(open(os.path.join(root, "SegmentationClass", f"{i}.png"), "rb").read()))
    assert canary["mean_iou"] == pytest.approx(_iou_by_numpy(preds, masks, len(CLASS_NAMES)), abs=1e-12)
    assert (canary["images"], canary["scored"], canary["failed"]) == (len(ids), len(ids) - 1, 1)
    (failed,) = canary["failed_images"]
    assert failed["image"] == os.path.join(root, "JPEGImages", f"{ids[0]}.jpg") and failed["stage"] == "decode"
    assert 0 <= canary["pixel_accuracy"] <= 1 and len(canary["per_class_iou"]) == len(CLASS_NAMES)
    assert BATCH  # the run used FAST_FLAGS' batch of 1, as predict_image above


def test_a_canary_that_passes_says_which_threshold_applied(canary_runs):
    code, _, err = canary_runs["passed"]
    assert code == 0, err[-2000:]
    summary = _summary(canary_runs["passed"])
    assert summary["status"] == "succeeded" and summary["canary"]["passed"] is True
    assert (summary["canary"]["min_iou"], summary["canary"]["min_iou_source"]) == (0.0, "--canary-min-iou")
    assert "error:" not in err and "canary: 1 of 5 images could not be scored" in err


# ------------------------------------------------------------------------------ refused before any labeling


def _refused(argv: list[str], capsys, output: str) -> str:
    code, _, err = run_label_cli(argv, capsys)
    assert not os.path.exists(os.path.join(output, "labels")), "labeled before refusing"
    return one_error(code, err)


def test_a_canary_of_other_classes_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    root = str(tmp_path / "canary")
    _canary(root)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(["background", "cat", "dog", "car", "tree", "sky"]) + "\n")
    write_files(str(tmp_path / "photos"), {"a.png": good_image(1, 20, 20)})
    out = str(tmp_path / "out")
    line = _refused(["--images", str(tmp_path / "photos"), "--checkpoint", tiny_checkpoint[0], "--output", out,
                     "--canary", root, *FAST_FLAGS], capsys, out)
    assert "names class 1 'disc'" in line and "classes.txt line 2 names it 'cat'" in line, line


def test_a_canary_mask_with_a_class_the_model_lacks_is_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    from pipeline.synthetic import encode_mask

    root = str(tmp_path / "canary")
    ids = _canary(root)
    os.remove(os.path.join(root, "classes.txt"))  # without names, the masks' ids are what can be checked
    mask = os.path.join(root, "SegmentationClass", f"{ids[1]}.png")
    with open(mask, "wb") as f:
        f.write(encode_mask(np.full((40, 48), 9, np.uint8)))
    write_files(str(tmp_path / "photos"), {"a.png": good_image(1, 20, 20)})
    out = str(tmp_path / "out")
    line = _refused(["--images", str(tmp_path / "photos"), "--checkpoint", tiny_checkpoint[0], "--output", out,
                     "--canary", root, *FAST_FLAGS], capsys, out)
    assert f"canary mask {mask} holds class id 9" in line and "predicts 6 classes" in line, line


@pytest.mark.parametrize("value", ["1.5", "nan"])
def test_a_canary_minimum_outside_0_1_is_refused(tiny_checkpoint, tmp_path, capsys, value):
    out = str(tmp_path / "out")
    line = _refused(["--images", str(tmp_path), "--checkpoint", tiny_checkpoint[0], "--output", out,
                     "--canary", str(tmp_path), "--canary-min-iou", value], capsys, out)
    assert line.startswith("error: --canary-min-iou must be a finite number in [0, 1]"), line
