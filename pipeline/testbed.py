"""What the demo, the benchmarks and the tests run on instead of a cloud: moto's S3 server on loopback, real
photos that ship inside an installed wheel, and small checkpoints with random score layers.

moto and scikit-image are development dependencies (the `dev` extra); they are imported only when used.
"""
from __future__ import annotations

import os

# Credentials of the loopback server only; they open nothing else.
LOOPBACK_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
SAMPLE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png")


def start_loopback_s3():
    """Start moto's S3 server on a free loopback port; returns (server, endpoint URL). `server.stop()` ends it.

    Point processes at it with `loopback_s3_env(endpoint)`; Ray workers inherit the environment of the moment
    Ray starts, so set it before.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def loopback_s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that make s3fs, pyarrow and Ray Data use the loopback server."""
    return {**LOOPBACK_CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}


def sample_photo_paths(names: tuple[str, ...] = SAMPLE_PHOTOS) -> list[str]:
    """Paths of real photos shipped inside scikit-image's wheel (non-synthetic inputs, no download)."""
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]


def random_checkpoint(uri: str, class_names: list[str], *, width_mult: float = 1 / 16, score_std: float = 0.5,
                      seed: int = 0, padding: str = "reference") -> str:
    """Save an FCN-8s whose score layers are random (zero-initialised ones would label everything class 0),
    so label maps vary across an image. Returns the model id."""
    import torch

    from models import TORCHVISION, build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model("fcn8s", len(class_names), width_mult=width_mult, padding=padding)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, score_std)
    return save_checkpoint(uri, model, class_names=list(class_names), convention=TORCHVISION)
