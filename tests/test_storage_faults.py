"""Storage that fails under a running job, met the way a user meets it: the jobs' command lines on a real full
filesystem (a tmpfs in a private mount namespace), a loopback S3 bucket deleted mid-run, a lease written by a host
whose clock is a day ahead."""
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

import pytest

from pipeline import faults, storage
from pipeline.lease import LEASE_FILE, Lease
from pipeline.storage import Location
from pipeline.synthetic import synthesize_voc
from tests.jobs_util import ROOT, one_error
from tests.label_fixtures import FAST_FLAGS, duckdb_connection, good_image, run_label_cli, write_files

TINY = ["--num-classes", "6", "--width-mult", "0.0625", "--padding", "same", "--num-workers", "1",
        "--cpus-per-worker", "0.5", "--optimizer", "adam", "--lr", "0.005", "--batch-size", "4", "--crop-size", "32",
        "--no-progress"]


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data") / "voc")
    synthesize_voc(root, 16, size=(40, 32), seed=3, val_fraction=0.25)
    return root


# Lines Ray prints on every run, a failed one or not (docs/operations.md, "What else a job's log shows").
RAY_EVERY_RUN = ("Started a local Ray instance", "has constructor arguments in the object store and max_restarts > 0")


def _job_lines(log: list[str]) -> list[str]:
    """A job's log without blank lines and the lines Ray prints on every run."""
    return [text for text in log if text.strip() and not any(known in text for known in RAY_EVERY_RUN)]


# ------------------------------------------------------------------------------ 1: the output's disk fills mid-run


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
@pytest.mark.slow  # ~50 s: two runs, each on a Ray of its own inside the mount namespace (make test-slow)
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
    line = one_error(int((out / "run1.rc").read_text()), first)
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


# ------------------------------------------------------------------------------ 2: the storage bucket deleted


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
@pytest.mark.slow  # ~35 s: the job's whole log as a user reads it, on a Ray of its own (make test-slow)
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
    line = one_error(proc.returncode, stderr)
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


# ------------------------------------------------------------------------------ 3: a lease from the future


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
    line = one_error(code, stderr)
    assert "in use by labeling run on a fast clock" in line and "clock skew" in line and "ahead" in line, line
    assert json.load(open(path))["id"] == "fast"  # the live holder keeps its lease
