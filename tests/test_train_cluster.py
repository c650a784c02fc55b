"""Training across nodes (ray.cluster_utils.Cluster on this machine) and through `ray job submit`."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from models import load_checkpoint
from pipeline.synthetic import synthesize_voc
from tests.jobs_util import ROOT

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


# Two workers on two nodes, neither on the head (each node fits one 1.5-CPU worker plus 0.5 CPU of decoding): checked
# by tests/test_spot_drills.py's training drill, whose run is exactly that, before and after a node is reclaimed.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_train(ray_stopped, tmp_path):
    data = str(tmp_path / "syn")
    synthesize_voc(data, 12, size=(40, 32), seed=4, val_fraction=0.25)
    bin_dir = os.path.dirname(sys.executable)
    ray_cli = os.path.join(bin_dir, "ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")
    dash = _free_port()
    # --block keeps the head's processes in this process group, so the test stops exactly this head
    # (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={_free_port()}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        _wait_for_dashboard(dash, head)
        # The dashboard answers before the head's job agent has registered; until then Ray refuses a submission
        # ("No available agent to submit job, please try again later", seen once on a busy machine): try again.
        deadline = time.monotonic() + 120
        while True:
            submit = subprocess.run(
                [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", ROOT, "--",
                 "python", "jobs/train.py", "--data", data, "--storage", str(tmp_path / "runs"), "--name", "submitted",
                 "--num-classes", "6", "--width-mult", "0.0625", "--padding", "same", "--cpus-per-worker", "0.5",
                 "--epochs", "1", "--batch-size", "2", "--crop-size", "32"],
                capture_output=True, text=True, env=env, timeout=400)
            out = submit.stdout + submit.stderr
            if "No available agent to submit job" not in out or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0 and "succeeded" in out, out[-3000:]
        # The job's stdout is tailed back by `ray job submit`, possibly with a prefix on each line.
        line = [line for line in out.splitlines() if '"latest_checkpoint"' in line][-1]
        summary = json.loads(line[line.index("{"):])
        assert summary["epochs"] == 1
        assert load_checkpoint(summary["latest_checkpoint"]).config.arch == "fcn8s"
        # The job's own log (stdout and stderr together, as `ray job logs` shows it): short, one line per epoch,
        # no progress-bar cursor codes, and the JSON summary exactly as its last line.
        # What `ray job logs` prints, through the client it uses (the CLI costs a Ray import, seconds on 2 busy cores).
        from ray.job_submission import JobSubmissionClient

        job_id = re.search(r"Job '([^']+)' submitted successfully", out).group(1)
        logs = JobSubmissionClient(f"http://127.0.0.1:{dash}").get_job_logs(job_id)
        lines = logs.strip().splitlines()
        assert len(lines) <= 40, logs
        assert "\x1b[A" not in logs and sum("[train] epoch 1/1" in line for line in lines) == 1, logs
        assert json.loads(lines[-1]) == summary
    finally:
        _stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited early"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard on port {port} did not come up in {timeout}s")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(1)  # let the group's children exit too
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
