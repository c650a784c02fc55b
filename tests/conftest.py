"""Shared test infrastructure: a real S3-protocol server (moto) on loopback and one local Ray per session."""
from __future__ import annotations

import os
import urllib.request

import pytest

# Credentials for the loopback S3 server only; set before anything (Ray workers included) starts so
# every process sees the same standard AWS configuration a user would set.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; AWS_ENDPOINT_URL_S3 points at it for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
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

    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).read()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3):
    """An empty bucket named 'test-bucket'; yields its s3:// URI."""
    s3.mkdir("test-bucket")
    return "s3://test-bucket"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole test session (never joins a stray cluster)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()
