"""What the demo, the benchmarks and the tests run on instead of a cloud: moto's S3 server on loopback, real
photos that ship inside an installed wheel, and small checkpoints with random score layers.

moto and scikit-image are development dependencies (the `dev` extra); they are imported only when used.
"""
from __future__ import annotations

import os
import threading

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

    _atomic_object_writes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _atomic_object_writes() -> None:
    """S3 applies a PUT's If-None-Match / If-Match and a DELETE's If-Match atomically; moto's threaded server checks
    the condition, then writes, so two racing conditional PUTs could both succeed (the lease's takeover race test
    saw two winners once in a full suite). One lock around moto's object PUTs and DELETEs gives the loopback server
    S3's guarantee, which the lease and the commits rely on."""
    import functools

    from moto.s3.responses import S3Response

    if getattr(S3Response, "_writes_serialised", False):
        return
    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        original = getattr(S3Response, name)

        @functools.wraps(original)
        def serialised(self, *args, _original=original, **kwargs):
            with lock:
                return _original(self, *args, **kwargs)

        setattr(S3Response, name, serialised)
    S3Response._writes_serialised = True


def loopback_s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that make s3fs, pyarrow and Ray Data use the loopback server."""
    return {**LOOPBACK_CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}


def sample_photo_paths(names: tuple[str, ...] = SAMPLE_PHOTOS) -> list[str]:
    """Paths of real photos shipped inside scikit-image's wheel (non-synthetic inputs, no download)."""
    import skimage

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]


def random_checkpoint(uri: str, class_names: list[str], *, width_mult: float = 1 / 16, score_std: float = 0.5,
                      seed: int = 0, padding: str = "reference", metadata: dict | None = None) -> str:
    """Save an FCN-8s whose score layers are random (zero-initialised ones would label everything class 0),
    so label maps vary across an image. `metadata` is recorded as training records its own (e.g. its validation
    "metrics"). Returns the model id."""
    import torch

    from models import TORCHVISION, build_model, save_checkpoint

    torch.manual_seed(seed)
    model = build_model("fcn8s", len(class_names), width_mult=width_mult, padding=padding)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, score_std)
    return save_checkpoint(uri, model, class_names=list(class_names), convention=TORCHVISION, metadata=metadata)


def autoscaling_cluster(worker_node_types: dict, head_resources: dict | None = None, idle_timeout_minutes: float = 1.0):
    """Ray's fake multi-node autoscaling cluster on this machine (`ray.cluster_utils.AutoscalingCluster`):
    nodes of `worker_node_types` start when tasks, actors, placement groups or `request_resources` ask for them.
    Not started yet: call `.start()` (needs the `ray` command on PATH) and `.shutdown()`.

    The wheel lacks the example config that AutoscalingCluster builds on, so the cluster config is given here.
    """
    import copy

    from ray.cluster_utils import AutoscalingCluster

    base = {
        "cluster_name": "fake-autoscaling", "max_workers": 8, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes, "docker": {}, "file_mounts": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }

    class _Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = copy.deepcopy(base)
            config["available_node_types"] = {
                **copy.deepcopy(worker_node_types),
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0},
            }
            config.update(config_kwargs)
            return config

    return _Cluster(head_resources=head_resources or {"CPU": 0}, worker_node_types=worker_node_types)


def fitted_checkpoint(uri: str, *, steps: int = 300, side: int = 64, batch: int = 8, images: int = 256, seed: int = 0,
                      width_mult: float = 1 / 16, lr: float = 3e-3) -> str:
    """Save a narrow FCN-8s ("same" padding) fitted in-process to the synthetic set (`pipeline.synthetic`): `steps`
    Adam steps on batches drawn from `images` side x side samples, bilinear upsampling frozen as training freezes
    it. Seconds on a CPU (width 1/16, 300 steps: about 15 s, mean IU about 0.55 on 96x96 samples), and sure of its
    labels where a random head is not: what tiling's seam and agreement checks need. Returns the model id."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from models import TORCHVISION, build_model, save_checkpoint, upsamplers

    from .synthetic import SYNTHETIC_CLASSES, render_sample

    torch.manual_seed(seed)
    model = build_model("fcn8s", len(SYNTHETIC_CLASSES), width_mult=width_mult, padding="same")
    for layer in upsamplers(model).values():
        layer.weight.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    mean = torch.tensor(TORCHVISION.mean).view(1, 3, 1, 1)
    std = torch.tensor(TORCHVISION.std).view(1, 3, 1, 1)
    pairs = [render_sample(seed, i, (side, side)) for i in range(images)]  # rendering costs more than a step
    images_x = (torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    masks = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, images, (batch,), generator=order)
        loss = F.cross_entropy(model(images_x[pick]), masks[pick], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(uri, model.eval(), class_names=list(SYNTHETIC_CLASSES), convention=TORCHVISION,
                           metadata={"fitted": {"steps": steps, "side": side, "batch": batch, "seed": seed,
                                                "images": images, "lr": lr, "last_loss": round(float(loss.detach()), 4)}})
