"""Hostile inputs and faults, second round (issue 21), each met the way a user meets it: the jobs' command lines on
real files, a loopback S3 server, a real full filesystem, a bucket deleted under a running job, a lease written by
a host whose clock is a day ahead."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pipeline import faults, storage
from pipeline.lease import LEASE_FILE, Lease
from pipeline.storage import Location
from pipeline.synthetic import synthesize_voc
from pipeline.testbed import random_checkpoint
from tests import storage_util
from tests.images import palette_mask
from tests.jobs_util import ROOT
from tests.label_fixtures import FAST_FLAGS, duckdb_connection, good_image, label_summary, run_label_cli, tables, write_files

TINY = ["--num-classes", "6", "--width-mult", "0.0625", "--padding", "same", "--num-workers", "1",
        "--cpus-per-worker", "0.5", "--optimizer", "adam", "--lr", "0.005", "--batch-size", "4", "--crop-size", "32",
        "--no-progress"]


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "voc")
    synthesize_voc(root, 16, size=(40, 32), seed=3, val_fraction=0.25)
    return root


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _one_error(proc_or_code, stderr: str | None = None) -> str:
    """The single `error:` line of a failed job (exit status 2), and no traceback of the job's own. (Ray's account of
    the same failure from its workers stays in Ray's log files: test_training_bucket_deleted_mid_run_is_one_line.)"""
    code, err = (proc_or_code.returncode, proc_or_code.stderr) if stderr is None else (proc_or_code, stderr)
    lines = _errors(err)
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-3000:]
    return lines[0]


# Lines Ray prints on every run, a failed one or not (docs/operations.md, "What else a job's log shows").
RAY_EVERY_RUN = ("Started a local Ray instance", "has constructor arguments in the object store and max_restarts > 0")


def _job_lines(log: list[str]) -> list[str]:
    """A job's log without blank lines and the lines Ray prints on every run."""
    return [text for text in log if text.strip() and not any(known in text for known in RAY_EVERY_RUN)]


def _run_cli(job: str, argv: list[str], capsys) -> tuple[int, str]:
    """A job's command line in this process, as `python jobs/<job>.py` runs it: (exit status, stderr). For jobs that
    fail before any cluster work (a subprocess would import torch again for each)."""
    from pipeline.cli import run_job
    from tests.jobs_util import load_job

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_job(load_job(job).main, argv)
    return exc.value.code, capsys.readouterr().err



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


# ------------------------------------------------------------------------------ 2: a file name that is not UTF-8


def test_a_file_name_that_is_not_utf8_costs_only_itself(ray_session, tiny_checkpoint, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    images = tmp_path / "imgs"
    write_files(str(images), {f"g{i}.png": good_image(i, 20, 22) for i in range(4)})
    raw = os.fsencode(str(images))
    with open(raw + b"/caf\xe9.png", "wb") as f:       # latin-1 bytes: not a UTF-8 name
        f.write(good_image(7, 20, 22))
    os.mkdir(raw + b"/d\xe9j\xe0")                      # a folder whose name is not UTF-8, with an image inside
    with open(raw + b"/d\xe9j\xe0/x.png", "wb") as f:
        f.write(good_image(8, 20, 22))
    summary = label_summary(capsys, images, ck_path, tmp_path / "out")
    assert (summary["listed"], summary["labelled"], summary["errors"]) == (6, 4, 2)
    t = tables(str(tmp_path / "out"))
    assert sorted(os.path.basename(u) for u in t["labels"]["image_uri"].to_pylist()) == [f"g{i}.png" for i in range(4)]
    errors = {r["image_uri"]: r for r in t["errors"].to_pylist()}
    # The URI as best representable: each byte that is not UTF-8 percent-encoded (docs/operations.md "When a run fails").
    assert set(errors) == {f"{images}/caf%E9.png", f"{images}/d%E9j%E0/x.png"}
    assert all(r["stage"] == "list" and "not valid UTF-8" in r["error"] for r in errors.values())
    again = label_summary(capsys, images, ck_path, tmp_path / "out")
    assert (again["skipped"], again["labelled"], again["errors"]) == (4, 0, 2)


# ------------------------------------------------------------------------------ 3: S3 keys with an empty segment


def test_s3_keys_with_an_empty_segment_are_listed_once(ray_session, tiny_checkpoint, bucket, s3, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    keys = ["dbl/a.png", "dbl/sub/b.png", "dbl//c.png", "dbl//d/e.png", "dbl/sub//f.png"]
    for i, key in enumerate(keys):
        s3.call_s3("put_object", Bucket="test-bucket", Key=key, Body=good_image(i, 20 + i, 22))
    summary = label_summary(capsys, f"{bucket}/dbl", ck_path, tmp_path / "out")
    assert (summary["listed"], summary["labelled"]) == (len(keys), len(keys))
    uris = tables(str(tmp_path / "out"))["labels"]["image_uri"].to_pylist()
    assert sorted(uris) == sorted(f"{bucket}/{k}" for k in keys)
    again = label_summary(capsys, f"{bucket}/dbl", ck_path, tmp_path / "out")
    assert (again["listed"], again["skipped"], again["labelled"]) == (len(keys), len(keys), 0)


# ------------------------------------------------------------------------------ 4: brackets in paths


@pytest.mark.parametrize("where", ["s3", "local"])
def test_glob_characters_in_output_and_image_paths_are_literal(ray_session, tiny_checkpoint, bucket, tmp_path,
                                                               capsys, where):
    ck_path, _ = tiny_checkpoint
    base = f"{bucket}/x" if where == "s3" else str(tmp_path)
    images, output = f"{base}/im[1]", f"{base}/seg[v2]"
    write_files(images, {"a.png": good_image(1, 20, 22), "b*.png": good_image(2, 21, 23)})
    write_files(f"{base}/im1", {"decoy.png": good_image(3, 22, 24)})   # what `im[1]` matches as a glob: never listed
    first = label_summary(capsys, images, ck_path, output, "--rows-per-file", "1", "--previews", "1")
    assert (first["listed"], first["labelled"], first["previews"]) == (2, 2, 1)
    again = label_summary(capsys, images, ck_path, output)
    assert (again["skipped"], again["labelled"]) == (2, 0)
    labels = tables(output)["labels"]["image_uri"].to_pylist()
    assert sorted(labels) == [f"{images}/a.png", f"{images}/b*.png"]
    fs, root = storage_util.filesystem(output)
    left = [p for p in fs.find(root) if "/_staging/" in p or "/_commits/" in p or p.endswith(LEASE_FILE)]
    assert left == []


# ------------------------------------------------------------------------------ 5: the output's disk fills mid-run


_DISK_FULL_SCRIPT = r"""
set -u
mount -t tmpfs -o size=1m tmpfs "$DISK" || exit 97
dd if=/dev/zero of="$DISK/filler" bs=1k count=940 2>/dev/null
"$PY" "$ROOT/jobs/label.py" $ARGS > "$OUT/run1.out" 2> "$OUT/run1.err"
echo $? > "$OUT/run1.rc"
rm "$DISK/filler"
"$PY" "$ROOT/jobs/label.py" $ARGS > "$OUT/run2.out" 2> "$OUT/run2.err"
echo $? > "$OUT/run2.rc"
cp -a "$DISK/out" "$OUT/out"
"""


def _mount_namespace() -> list[str] | None:
    """A command prefix that runs a shell in a mount namespace where a tmpfs may be mounted, or None."""
    for prefix in (["unshare", "-m"] if os.geteuid() == 0 else [], ["unshare", "-rm"]):
        if prefix and shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.mark.ray_job  # starts jobs with their own Ray (make test-fast leaves it out)
def test_a_full_disk_mid_run_is_one_line_and_the_rerun_is_exactly_once(tiny_checkpoint, tmp_path):
    """A real full filesystem (a 1 MB tmpfs in a private mount namespace), not an injected error: with 84 KB free the
    run starts (lease, run record, index marker) and fills the disk while it stages its results."""
    prefix = _mount_namespace()
    if prefix is None:
        pytest.skip("needs unshare (a mount namespace) to make a small filesystem")
    ck_path, _ = tiny_checkpoint
    images = tmp_path / "imgs"
    write_files(str(images), {f"p{i:02d}.png": good_image(i, 160, 200) for i in range(16)})
    disk, out = tmp_path / "disk", tmp_path / "result"
    disk.mkdir()
    out.mkdir()
    args = ["--images", str(images), "--checkpoint", ck_path, "--output", str(disk / "out"), "--rows-per-file", "2", *FAST_FLAGS]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local", "DISK": str(disk), "OUT": str(out),
           "PY": sys.executable, "ROOT": ROOT, "ARGS": " ".join(args)}
    proc = subprocess.run([*prefix, "sh", "-c", _DISK_FULL_SCRIPT], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 97, f"could not mount a tmpfs: {proc.stderr}"
    first = (out / "run1.err").read_text()
    line = _one_error(int((out / "run1.rc").read_text()), first)
    assert "no space left" in line and str(disk / "out") in line, line
    assert (out / "run2.rc").read_text().strip() == "0", (out / "run2.err").read_text()[-3000:]
    summary = json.loads((out / "run2.out").read_text().strip().splitlines()[-1])
    done_before = summary["skipped"]
    assert done_before < 16, "the disk never filled"
    assert summary["labelled"] == 16 - done_before
    con = duckdb_connection(str(out / "out"))
    counts = con.execute(f"SELECT image_uri, count(*) FROM read_parquet('{out}/out/labels/**/*.parquet') "
                         "GROUP BY ALL").fetchall()
    assert sorted(u for u, _ in counts) == sorted(f"{images}/p{i:02d}.png" for i in range(16))
    assert all(n == 1 for _, n in counts)
    assert not glob.glob(f"{out}/out/_staging/*") and not glob.glob(f"{out}/out/_commits/*")


def test_disk_full_and_quota_errors_name_the_path():
    import errno

    for code, words in ((errno.ENOSPC, "no space left"), (errno.EDQUOT, "disk quota exceeded")):
        e = storage.storage_error("/data/out/labels/x.parquet", OSError(code, os.strerror(code)))
        assert words in str(e) and "/data/out/labels/x.parquet" in str(e), str(e)


# ------------------------------------------------------------------------------ 6: the storage bucket deleted


def _delete_bucket(s3, name: str) -> None:
    """Every object, then the bucket itself (what `aws s3 rb --force` does)."""
    for _ in range(5):
        listed = s3.call_s3("list_objects_v2", Bucket=name).get("Contents", [])
        for obj in listed:
            s3.call_s3("delete_object", Bucket=name, Key=obj["Key"])
        try:
            s3.call_s3("delete_bucket", Bucket=name)
            break
        except OSError:  # written to meanwhile
            continue
    s3.invalidate_cache()
    assert not s3.exists(name)


@pytest.mark.ray_job  # starts jobs with their own Ray (make test-fast leaves it out)
def test_training_bucket_deleted_mid_run_is_one_line(small_voc, bucket, s3, tmp_path):
    go = tmp_path / "go"
    argv = ["--data", small_voc, "--storage", f"{bucket}/runs", "--name", "gone", *TINY, "--epochs", "3",
            "--max-failures", "0"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local",
           faults.ENV: f"train.reported:epoch1=wait_for:{go}"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "train.py"), *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not s3.exists("test-bucket/runs/gone/epoch_0001/state.json"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
            s3.invalidate_cache()
        _delete_bucket(s3, "test-bucket")
        go.touch()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        go.touch()
        proc.kill()
    line = _one_error(proc.returncode, stderr)
    assert "s3://test-bucket" in line and "does not exist" in line, line
    # The job's log is that line and a few of context, the line last: Ray's tracebacks of the same failure (the
    # worker's, the controller's, the placement-group cleaner's) stay in Ray's log files (issue 30, case 4: 108 lines).
    log = (stdout + stderr).splitlines()
    assert not [text for text in log if "Traceback" in text], stdout + stderr
    assert stderr.strip().splitlines()[-1] == line, stderr[-3000:]
    assert len(_job_lines(log)) <= 15, stdout + stderr


def test_a_lease_whose_bucket_was_deleted_says_so(bucket, s3):
    """The heartbeat finds the lease gone with its bucket: the holder is told the storage vanished, not that another
    run took its lease over."""
    told = threading.Event()
    lease = Lease.acquire(Location.of(f"{bucket}/runs/x"), holder="run A", what="run x", ttl_s=0.8, on_lost=told.set)
    try:
        _delete_bucket(s3, "test-bucket")
        assert told.wait(10)
        assert "bucket does not exist: s3://test-bucket" in lease.lost and "took it over" not in lease.lost, lease.lost
    finally:
        lease.release()


# ------------------------------------------------------------------------------ 7: classes.txt


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
        line = _one_error(*_run_cli(job, argv, capsys))
        assert expect in line and "classes.txt" in line, (job, line)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ 8: evaluate and its classes


def test_evaluate_refuses_a_checkpoint_with_other_classes(small_voc, tmp_path, capsys):
    ck = tmp_path / "three.pt"
    random_checkpoint(str(ck), ["background", "disc", "square"], padding="same")
    line = _one_error(*_run_cli("evaluate", ["--data", small_voc, "--checkpoint", str(ck)], capsys))
    assert "predicts 3 classes" in line and "6 classes" in line and "classes.txt" in line, line
    renamed = tmp_path / "renamed.pt"
    random_checkpoint(str(renamed), ["background", "disc", "square", "triangle", "ring", "stick"], padding="same")
    line = _one_error(*_run_cli("evaluate", ["--data", small_voc, "--checkpoint", str(renamed)], capsys))
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
    line = _one_error(code, err)
    assert "3 of 4 images of split 'val' were dropped as bad samples" in line and "outside classes" in line, line
    assert not out.strip()  # no score for a quarter of the split


# ------------------------------------------------------------------------------ 9: a lease from the future


def _future_lease(output, *, ttl_s: float, ahead_s: float = 86400.0) -> str:
    path = os.path.join(output, LEASE_FILE)
    os.makedirs(output, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"holder": "labeling run on a fast clock", "id": "fast", "host": "elsewhere", "pid": 1,
                   "acquired_at": "2026-11-27T01:00:00+00:00", "ttl_s": ttl_s}, f)
    stamp = time.time() + ahead_s
    os.utime(path, (stamp, stamp))
    return path


def test_a_dead_holders_lease_from_the_future_blocks_for_at_most_its_ttl(ray_session, tiny_checkpoint, tmp_path,
                                                                         capsys, caplog):
    ck_path, _ = tiny_checkpoint
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 20, 22)})
    _future_lease(str(tmp_path / "out"), ttl_s=3.0)
    started = time.monotonic()
    code, stdout, stderr = run_label_cli(["--images", str(tmp_path / "imgs"), "--checkpoint", ck_path, "--output",
                                          str(tmp_path / "out"), *FAST_FLAGS], capsys)
    assert code == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["labelled"] == 1
    taken = [r.getMessage() for r in caplog.records if "taking over the lease" in r.getMessage()]
    assert len(taken) == 1 and "clock skew" in taken[0] and re.search(r"(23 h 59|24 h 0) min ahead", taken[0]), taken
    assert time.monotonic() - started < 120


def test_a_live_holder_with_a_clock_a_day_ahead_is_respected_and_the_error_names_the_skew(tiny_checkpoint, tmp_path,
                                                                                         capsys):
    ck_path, _ = tiny_checkpoint
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 20, 22)})
    path = _future_lease(str(tmp_path / "out"), ttl_s=2.0)
    stop = threading.Event()

    def heartbeat():  # what a live holder whose clock is a day ahead does: fresh future times, every ttl / 4
        while not stop.wait(0.5):
            stamp = time.time() + 86400
            os.utime(path, (stamp, stamp))

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        code, _, stderr = run_label_cli(["--images", str(tmp_path / "imgs"), "--checkpoint", ck_path, "--output",
                                         str(tmp_path / "out"), *FAST_FLAGS], capsys)
    finally:
        stop.set()
        beating.join()
    line = _one_error(code, stderr)
    assert "in use by labeling run on a fast clock" in line and "clock skew" in line and "ahead" in line, line
    assert json.load(open(path))["id"] == "fast"  # the live holder keeps its lease
