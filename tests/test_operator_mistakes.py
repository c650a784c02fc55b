"""Operator mistakes, met the way a user meets them: relative paths on every job's command line, a classes.txt with a
blank or repeated line, evaluate.py given a checkpoint of other classes or a split it must mostly drop."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.synthetic import synthesize_voc
from pipeline.testbed import random_checkpoint
from tests.images import palette_mask
from tests.jobs_util import one_error, run_failing_cli


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "voc")
    synthesize_voc(root, 16, size=(40, 32), seed=3, val_fraction=0.25)
    return root


# ------------------------------------------------------------------------------ 1: relative paths


# A relative --storage and --data as in the README (a training run, its resume, evaluate.py) is run by
# tests/test_train.py::test_stop_and_resume_continues_at_next_epoch.

def test_every_jobs_path_arguments_are_absolute_after_parsing(tmp_path, monkeypatch):
    """The class of defect: every path argument of every job is resolved once, when the driver parses it."""
    from tests.jobs_util import load_job

    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    label = vars(load_job("label").build_parser().parse_args(["--images", "im", "--checkpoint", "ck.pt", "--output", "o"]))
    assert (label["images"], label["checkpoint"], label["output"]) == (f"{here}/im", f"{here}/ck.pt", f"{here}/o")
    train = vars(load_job("train").build_parser().parse_args(
        ["--data", "d", "--storage", "s3://b/runs/", "--name", "n", "--init-from", "ck.pt", "--backbone-weights", "w.pth"]))
    assert (train["data"], train["storage"], train["init_from"], train["backbone_weights"]) == \
        (f"{here}/d", "s3://b/runs", f"{here}/ck.pt", f"{here}/w.pth")
    for keyword in ("none", "imagenet"):
        assert load_job("train").build_parser().parse_args(
            ["--data", "d", "--storage", "s", "--name", "n", "--backbone-weights", keyword]).backbone_weights == keyword
    evaluate = load_job("evaluate").build_parser().parse_args(["--data", "d", "--checkpoint", "c.pt", "--report", "r"])
    assert (evaluate.data, evaluate.checkpoint, evaluate.report) == (f"{here}/d", f"{here}/c.pt", f"{here}/r")
    imported = load_job("import_weights").build_parser().parse_args(
        ["--from", "w.pth", "--model", "fcn8s", "--classes", "names.txt", "--convention", "caffe", "--output", "o.pt"])
    assert (imported.source, imported.classes, imported.output) == (f"{here}/w.pth", f"{here}/names.txt", f"{here}/o.pt")
    assert load_job("import_weights").build_parser().parse_args(
        ["--from", "w", "--model", "fcn8s", "--classes", "voc", "--convention", "caffe", "--output", "o"]).classes == "voc"
    assert load_job("synthesize").build_parser().parse_args(["--output", "syn", "--count", "1"]).output == f"{here}/syn"


# ------------------------------------------------------------------------------ 2: classes.txt


@pytest.mark.parametrize("text,expect", [
    ("background\ndisc\n\nsquare\ntriangle\nring\nbar\n", "line 3 is blank"),
    ("background\ndisc\nsquare\ntriangle\ndisc\nbar\n", "line 5 repeats 'disc' of line 2"),
])
def test_classes_txt_with_a_blank_or_repeated_line_is_refused_by_every_job(small_voc, tiny_checkpoint, tmp_path,
                                                                            capsys, text, expect):
    data = tmp_path / "voc"
    shutil.copytree(small_voc, data)
    (data / "classes.txt").write_text(text)
    runs = ["--storage", str(tmp_path / "runs"), "--name", "x", "--width-mult", "0.0625"]
    for job, argv in (("train", ["--data", str(data), *runs]),
                      ("evaluate", ["--data", str(data), "--checkpoint", tiny_checkpoint[0]]),
                      ("import_weights", ["--from", str(tmp_path / "w.pth"), "--model", "fcn8s", "--classes",
                                          str(data / "classes.txt"), "--convention", "caffe", "--output",
                                          str(tmp_path / "o.pt")])):
        line = one_error(*run_failing_cli(job, argv, capsys))
        assert expect in line and "classes.txt" in line, (job, line)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ 3: evaluate and its classes


def test_evaluate_refuses_a_checkpoint_with_other_classes(small_voc, tmp_path, capsys):
    ck = tmp_path / "three.pt"
    random_checkpoint(str(ck), ["background", "disc", "square"], padding="same")
    line = one_error(*run_failing_cli("evaluate", ["--data", small_voc, "--checkpoint", str(ck)], capsys))
    assert "predicts 3 classes" in line and "6 classes" in line and "classes.txt" in line, line
    renamed = tmp_path / "renamed.pt"
    random_checkpoint(str(renamed), ["background", "disc", "square", "triangle", "ring", "stick"], padding="same")
    line = one_error(*run_failing_cli("evaluate", ["--data", small_voc, "--checkpoint", str(renamed)], capsys))
    assert "class 5" in line and "'stick'" in line and "'bar'" in line, line


def test_evaluate_that_drops_most_of_its_split_fails_and_a_few_drops_warn(ray_session, small_voc, tmp_path, capsys):
    import jobs.evaluate as job
    from pipeline.cli import run_job

    data = tmp_path / "voc"
    shutil.copytree(small_voc, data)
    ids = (data / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(ids) == 4
    ck = tmp_path / "six.pt"
    random_checkpoint(str(ck), (data / "classes.txt").read_text().split(), padding="same")

    def evaluate() -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            run_job(job.main, ["--data", str(data), "--checkpoint", str(ck)])
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    mask = data / "SegmentationClass" / f"{ids[0]}.png"
    mask.write_bytes(palette_mask(np.full((32, 40), 9, np.uint8)))    # class 9 of a 6-class dataset: dropped
    code, out, err = evaluate()
    assert code == 0, err[-3000:]
    assert "warning: 1 of 4 images of split 'val' dropped as bad samples" in err, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["images"] == 3
    for i in ids[1:3]:
        (data / "JPEGImages" / f"{i}.jpg").write_bytes(b"not a jpeg")
    code, out, err = evaluate()
    line = one_error(code, err)
    assert "3 of 4 images of split 'val' were dropped as bad samples" in line and "outside classes" in line, line
    assert not out.strip()  # no score for a quarter of the split


