"""Shared test infrastructure: a real S3-protocol server (moto) on loopback and one local Ray per session.

Fixtures of the labeling tests (a tiny checkpoint) come from tests/label_fixtures.py through pytest_plugins.
"""
from __future__ import annotations

import contextlib
import http.server
import os
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from pipeline.testbed import loopback_s3_env, start_loopback_s3

pytest_plugins = ["tests.label_fixtures"]

# Ray Train's controller polls its workers every 2 s, so each training run ended up to 2 s after its workers did
# (~3 s a run, measured). Every Ray the tests start, and every job they start, inherits this; the product keeps
# Ray's default, where 2 s a run does not matter.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; AWS_ENDPOINT_URL_S3 points at it for the session.

    Set before anything (Ray workers included) starts, so every process sees the same standard AWS
    configuration a user would set.
    """
    server, endpoint = start_loopback_s3()
    env = loopback_s3_env(endpoint)
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3(s3_server):
    """A fresh S3 state per test: the server is reset and s3fs's cached listings are dropped."""
    import s3fs

    reset_s3(s3_server)
    fs = s3fs.S3FileSystem()
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def serving(root) -> Iterator[str]:
    """A real HTTP server on loopback serving the folder `root` (it ignores query strings, as S3 checks them);
    yields its base URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture
def http_server(tmp_path):
    """`serving` tmp_path/www for one test: yields (the folder, its base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    with serving(root) as base:
        yield root, base


def reset_s3(endpoint: str) -> None:
    """Empty the loopback S3 server and drop s3fs's cached listings."""
    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3):
    """An empty bucket named 'test-bucket'; yields its s3:// URI."""
    s3.mkdir("test-bucket")
    return "s3://test-bucket"


_RAY = {"mode": None}  # "local" while the session's local Ray is up, "cluster" while a test cluster is


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _RAY["mode"] = None


def _local_ray():
    """The one local Ray instance of the test session (started on first use; never joins a stray cluster).

    2 logical CPUs, as on CI's machine. Tests that start a multi-node cluster run last (see
    pytest_collection_modifyitems), so this instance starts at most twice per session.
    """
    import ray

    from pipeline.ray_setup import MIN_IDLE_WORKERS, own_address_hook

    if _RAY["mode"] != "local":
        _shutdown_ray()
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Idle workers kept as in a Ray the jobs start (pipeline/ray_setup.py): with Ray's default, the input
        # pipeline's workers were reaped between epochs and runs and started again (~10 % of a training test).
        # Its workers are told its address, as in a Ray the jobs start (own_address_hook): Ray Train's placement-group
        # cleaner otherwise asks whichever Ray it finds on the machine, and with another one running removed a live
        # run's placement group (seen once: "Destroying worker since its placement group was removed").
        ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False, _system_config={"num_workers_soft_limit": MIN_IDLE_WORKERS},
                 runtime_env={"worker_process_setup_hook": own_address_hook()})
        _RAY["mode"] = "local"
    return ray


@pytest.fixture
def ray_session(s3_server):
    """The session's local Ray (`_local_ray`) for one test."""
    return _local_ray()


@pytest.fixture(scope="module")
def ray_module(s3_server):
    """The session's local Ray (`_local_ray`) for a module-scoped scenario fixture: one run that several named
    tests check."""
    return _local_ray()


@pytest.fixture
def multinode_cluster(s3_server):
    """A head with no worker resources plus `add_node`-able nodes, on this machine (ray.cluster_utils).

    Replaces the local Ray for the rest of the session; mark tests using it with @pytest.mark.multinode.
    The driver is connected to the head; the test adds nodes (cluster.add_node(num_cpus=1, num_gpus=1),
    logical GPUs test scheduling, not CUDA) and calls cluster.wait_for_nodes().
    """
    import ray
    from ray.cluster_utils import Cluster

    _shutdown_ray()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from tests.scrape import free_port

    # A free port for the dashboard: a head on Ray's fixed 8265 fails to start while another Ray holds it.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "dashboard_port": free_port(),
                                                             "object_store_memory": 256 * 1024**2})
    _RAY["mode"] = "cluster"
    ray.init(address=cluster.address)
    yield cluster
    _shutdown_ray()
    cluster.shutdown()


@pytest.fixture
def ray_stopped(s3_server):
    """No Ray instance in this process (for tests that start a separate Ray head, e.g. `ray start`).

    Mark such tests @pytest.mark.multinode so they run after the tests sharing the local Ray.
    """
    _shutdown_ray()
    yield


# Fixtures that give a test a Ray instance: such a test runs Ray jobs and is left out of `make test-fast`.
RAY_FIXTURES = {"ray_session", "ray_module", "multinode_cluster", "ray_stopped"}


def pytest_collection_modifyitems(config, items):
    """Multi-node tests last: each tears down the shared local Ray, which is then not needed again. Tests that
    use a Ray fixture or a cluster of their own (multinode) are marked ray_job; tests that start jobs with their
    own Ray carry the marker themselves."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("multinode"):
            item.add_marker(pytest.mark.ray_job)
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)


def pytest_sessionfinish(session, exitstatus):
    _shutdown_ray()
