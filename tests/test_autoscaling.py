"""Both jobs start on an autoscaling cluster with no worker up (cluster.yaml's shape: a head with 0 CPUs, a worker
type with min_workers 0): they ask for what they need, wait for it, and give up with one line when it never comes.
Ray's fake multi-node provider (`ray.cluster_utils.AutoscalingCluster`) on this machine."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from pipeline.synthetic import synthesize_voc
from pipeline.testbed import autoscaling_cluster
from tests.jobs_util import run_subprocess
from tests.label_fixtures import good_image, write_files

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module")
def autoscaling_address():
    """A cluster with a 0-CPU head and up to one 2-CPU worker node (idle nodes end after 6 s); this process is
    connected to it to watch its size."""
    import ray

    from tests.conftest import _shutdown_ray

    _shutdown_ray()  # the session's local Ray: one Ray per machine while Train runs (its PG cleaner)
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # `ray start`
    cluster = autoscaling_cluster({"cpu_worker": {"resources": {"CPU": 2, "object_store_memory": 256 * 1024**2},
                                                  "node_config": {}, "min_workers": 0, "max_workers": 1}},
                                  head_resources={"CPU": 0, "object_store_memory": 128 * 1024**2},
                                  idle_timeout_minutes=0.1)
    cluster.start(override_env={"RAY_AUTH_MODE": "disabled"})
    try:
        ray.init(address="auto", log_to_driver=False)
        yield "auto"  # `ray start --head` records its address where ray.init("auto") finds it
    finally:
        _shutdown_ray()
        cluster.shutdown()


@pytest.fixture
def empty_autoscaling_cluster(autoscaling_address):
    """The cluster once no worker node is up (a previous test's node has been scaled down)."""
    import ray

    deadline = time.monotonic() + 120
    while ray.cluster_resources().get("CPU", 0) > 0:
        assert time.monotonic() < deadline, "the idle worker node was never scaled down"
        time.sleep(0.5)
    return autoscaling_address


def _env(address: str) -> dict:
    return {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}


def test_resources_that_never_come_end_in_one_line(empty_autoscaling_cluster, tiny_checkpoint, tmp_path):
    """Asked for GPUs no node type has: the cluster never grows, the job gives up with one line."""
    images = str(tmp_path / "imgs")
    write_files(images, {"0.png": good_image(0, 16, 16)})
    done = run_subprocess("label", ["--images", images, "--checkpoint", tiny_checkpoint[0], "--output",
                                    str(tmp_path / "out"), "--num-gpus", "2", "--wait-for-resources", "3"],
                          env=_env(empty_autoscaling_cluster), timeout=120)
    assert done.returncode == 2
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: gave up after 3 s (--wait-for-resources): --num-gpus 2 but the Ray cluster has 0 GPU(s)")


def test_label_starts_from_zero_workers(empty_autoscaling_cluster, tiny_checkpoint, tmp_path):
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"{i}.png": good_image(i, 16, 16) for i in range(3)})
    done = run_subprocess("label", ["--images", images, "--checkpoint", tiny_checkpoint[0], "--output", output,
                                    "--max-side", "64", "--wait-for-resources", "120"],
                          env=_env(empty_autoscaling_cluster), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "waiting up to 120 s (--wait-for-resources) for the cluster to grow: the Ray cluster has 0 CPUs" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["labelled"], summary["errors"]) == (3, 0)


def test_train_starts_from_zero_workers(empty_autoscaling_cluster, tmp_path):
    data = str(tmp_path / "syn")
    synthesize_voc(data, 8, size=(40, 32), seed=3, val_fraction=0.25)
    done = run_subprocess("train", [
        "--data", data, "--storage", str(tmp_path / "runs"), "--name", "zero", "--num-classes", "6",
        "--width-mult", "0.0625", "--padding", "same", "--num-workers", "1", "--cpus-per-worker", "1",
        "--data-cpus", "0.5", "--epochs", "1", "--batch-size", "2", "--crop-size", "32", "--max-failures", "0",
        "--wait-for-resources", "120"], env=_env(empty_autoscaling_cluster), timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "waiting up to 120 s (--wait-for-resources)" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["epochs"] == 1
