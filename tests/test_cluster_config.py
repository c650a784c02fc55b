"""cluster.yaml: Ray's own offline validation plus the properties this project relies on.

No network and no AWS credentials: `prepare_config` only merges ray/autoscaler/aws/defaults.yaml (a file
in the ray package) and checks the docker section; the calls that reach AWS (`bootstrap_aws`: IAM, key
pair, subnets, security groups, AMI; the instance-type lookup that auto-fills `resources`) happen only
in `ray up` and the running autoscaler. The fixture below blocks sockets to keep it that way.
"""
from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "cluster.yaml"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
GPU_FAMILY = re.compile(r"^g(5|6|6e)\.")  # NVIDIA A10G (g5), L4 (g6), L40S (g6e)

# vCPUs and memory (GiB) of the instance types this config may use; add a row when changing types.
INSTANCE_SPECS = {
    "m6i.xlarge": (4, 16), "m6i.2xlarge": (8, 32), "m6i.4xlarge": (16, 64),
    "c6i.2xlarge": (8, 16), "c6i.4xlarge": (16, 32), "c6i.8xlarge": (32, 64),
    "g5.xlarge": (4, 16), "g5.2xlarge": (8, 32), "g5.4xlarge": (16, 64),
    "g6.xlarge": (4, 16), "g6.2xlarge": (8, 32), "g6.4xlarge": (16, 64),
    "g6e.xlarge": (4, 32), "g6e.2xlarge": (8, 64), "g6e.12xlarge": (48, 384),
}
OBJECT_STORE_FRACTION = 0.3  # Ray's default object store size: 30% of the node's memory


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No sockets, no AWS credentials: a validation that tried to reach AWS fails here."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster config validation tried to use the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture
def cfg(raw) -> dict:
    """The config as `ray up` sees it after merging Ray's AWS defaults."""
    return prepare_config(copy.deepcopy(raw))


def node_types(cfg: dict) -> dict:
    return cfg["available_node_types"]


def head(cfg: dict) -> dict:
    return node_types(cfg)[cfg["head_node_type"]]


def workers(cfg: dict) -> dict:
    return {k: v for k, v in node_types(cfg).items() if k != cfg["head_node_type"]}


def gpu_workers(cfg: dict) -> dict:
    return {k: v for k, v in workers(cfg).items() if v["resources"].get("GPU", 0) >= 1}


def cpu_workers(cfg: dict) -> dict:
    return {k: v for k, v in workers(cfg).items() if v["resources"].get("GPU", 0) == 0}


def is_spot(node: dict) -> bool:
    return node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def specs(node: dict) -> tuple[int, int]:
    itype = node["node_config"]["InstanceType"]
    assert itype in INSTANCE_SPECS, f"{itype}: add its vCPUs and memory to INSTANCE_SPECS"
    return INSTANCE_SPECS[itype]


def gib(size: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmg]?)", size.strip().strip("'\"").lower())
    assert m, f"unreadable --shm-size {size!r}"
    return float(m.group(1)) * {"": 2**-30, "b": 2**-30, "k": 2**-20, "m": 2**-10, "g": 1}[m.group(2)]


# --- Ray's own validation -------------------------------------------------------------------------


def test_ray_validates_prepared_config(cfg):
    validate_config(cfg)  # raises jsonschema.ValidationError / ValueError / RuntimeError


@pytest.mark.parametrize(
    "break_it, error",
    [
        (lambda c: node_types(c)["ray.worker.gpu"].pop("resources"), jsonschema.ValidationError),
        (lambda c: node_types(c)["ray.worker.gpu"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
        (lambda c: c["docker"].update(shm_size="16g"), jsonschema.ValidationError),
        (lambda c: c.update(head_node_type="ray.head.missing"), ValueError),
        (lambda c: c.update(max_workers=0) or head(c).update(min_workers=1), ValueError),
    ],
    ids=["missing-resources", "fractional-resource", "unknown-docker-key", "bad-head-type", "min-over-max"],
)
def test_ray_validation_rejects_broken_configs(cfg, break_it, error):
    """The validator used above does reject bad configs, so its passing means something."""
    broken = copy.deepcopy(cfg)
    break_it(broken)
    with pytest.raises(error):
        validate_config(broken)


def test_defaults_do_not_replace_our_commands(raw, cfg):
    """prepare_config merges Ray's defaults.yaml shallowly: an omitted command list is taken from it
    (a Ray nightly wheel in setup_commands, `pip install boto3` on the head)."""
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert key in raw, f"cluster.yaml must set {key} (even to []) or Ray's default is used"
    assert cfg["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert cfg["worker_setup_commands"] == raw["setup_commands"] + raw["worker_setup_commands"]
    assert not any("ray-wheels" in c for c in cfg["head_setup_commands"] + cfg["worker_setup_commands"])


# --- what this project needs ------------------------------------------------------------------------


def test_docker_image_and_run_options(cfg):
    docker = cfg["docker"]
    assert docker["image"] == IMAGE
    assert "head_image" not in docker and "worker_image" not in docker, "one image for all nodes"
    opts = " ".join(docker["run_options"])
    assert "--shm-size" in opts
    assert re.search(r"--ulimit[ =]nofile=65536:65536", opts)


def test_shm_holds_the_object_store(cfg):
    """/dev/shm in the container backs the object store: it must be at least the default 30% of RAM."""
    opts = " ".join(cfg["docker"]["run_options"])
    m = re.search(r"--shm-size[ =](\S+)", opts)
    assert m, "--shm-size needs a value"
    shm = gib(m.group(1))
    for name, node in node_types(cfg).items():
        mem = specs(node)[1]
        assert shm >= OBJECT_STORE_FRACTION * mem, f"{name}: --shm-size {shm} GiB < object store of {mem} GiB RAM"


def test_head_schedules_no_work(cfg):
    h = head(cfg)
    assert h["resources"].get("CPU") == 0, "the head must advertise CPU: 0"
    assert h["resources"].get("GPU", 0) == 0
    assert GPU_FAMILY.match(h["node_config"]["InstanceType"]) is None, "no GPU instance for an idle head"
    assert h["max_workers"] == 0
    assert not is_spot(h), "the head must be on-demand: losing it loses the cluster"


def test_gpu_worker_type(cfg):
    gpus = gpu_workers(cfg)
    assert gpus, "no worker type advertises a GPU"
    for name, node in gpus.items():
        assert GPU_FAMILY.match(node["node_config"]["InstanceType"]), f"{name}: not a g5/g6 instance"
        vcpus, _ = specs(node)
        assert 1 <= node["resources"]["CPU"] <= vcpus, f"{name}: CPU must match the instance's vCPUs"
        assert node["resources"]["GPU"] >= 1
        assert node["min_workers"] == 0, f"{name}: GPUs must scale to zero"
        assert 1 <= node["max_workers"] <= cfg["max_workers"]
        assert is_spot(node), f"{name}: spot expected (training resumes from checkpoints)"


def test_training_uses_one_multi_gpu_node_type_and_labeling_single_gpu_nodes(cfg):
    """DDP's all-reduce stays inside a node on the training type; --accelerator-type selects it."""
    gpus = gpu_workers(cfg)
    multi = {k: v for k, v in gpus.items() if v["resources"]["GPU"] >= 4}
    single = {k: v for k, v in gpus.items() if v["resources"]["GPU"] == 1}
    assert multi and single
    accel = lambda node: {k for k in node["resources"] if k.startswith("accelerator_type:")}  # noqa: E731
    train_types = set().union(*(accel(v) for v in multi.values()))
    assert train_types and not train_types & set().union(*(accel(v) for v in single.values())), \
        "the training nodes' accelerator type must be theirs alone, or --accelerator-type cannot pick them"


def test_cpu_worker_type(cfg):
    cpus = cpu_workers(cfg)
    assert cpus, "no CPU-only worker type for decoding"
    for name, node in cpus.items():
        assert GPU_FAMILY.match(node["node_config"]["InstanceType"]) is None, f"{name}: pays for an unused GPU"
        vcpus, _ = specs(node)
        assert 1 <= node["resources"]["CPU"] <= vcpus
        assert node["min_workers"] == 0
        assert node["max_workers"] >= 1


def test_every_node_sets_ami_and_workers_reach_s3(cfg):
    """Without ImageId Ray falls back to an old CUDA 11.2 DLAMI; without a profile workers cannot use S3."""
    for name, node in node_types(cfg).items():
        assert node["node_config"].get("ImageId"), f"{name}: set ImageId"
    for name, node in workers(cfg).items():
        assert node["node_config"].get("IamInstanceProfile"), f"{name}: set IamInstanceProfile for S3"


def test_setup_installs_the_project(cfg):
    mounts = {remote: local for remote, local in cfg["file_mounts"].items() if (REPO / local).resolve() == REPO}
    assert mounts, "file_mounts must sync the repository root to the nodes"
    cmds = cfg["setup_commands"]
    project = [
        i for i, c in enumerate(cmds)
        if "pip install" in c and any(re.search(rf"(^|\s){re.escape(r)}/?(\s|$)", c) for r in mounts)
    ]
    assert project, f"no setup command pip-installs the synced project ({sorted(mounts)})"
    torch = [i for i, c in enumerate(cmds) if re.search(r"pip install .*\btorch\b", c) and "download.pytorch.org/whl/cu" in c]
    assert torch, "torch must come from a CUDA wheel index (the image has no torch)"
    assert torch[0] < project[0], "install CUDA torch before the project, or pip takes torch from PyPI"


def test_start_commands(cfg):
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--dashboard-host=0.0.0.0" in head_start
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker_start


def test_labeling_nodes_have_the_cpus_to_decode_for_their_gpu(cfg):
    """The labeling job's own plan on a labeling node: the CPUs left beside the inference actor decode at least
    the 1,500 images/s per GPU a fast GPU labels (it would say so in the job's log otherwise)."""
    from pipeline.label.config import LabelConfig
    from pipeline.label.resources import plan_resources

    single = {k: v for k, v in gpu_workers(cfg).items() if v["resources"]["GPU"] == 1}
    assert single
    for name, node in single.items():
        plan = plan_resources(LabelConfig(images="x", checkpoint="x", output="x"), node["resources"])
        assert plan.device == "cuda" and plan.decode_warning() is None, f"{name}: {plan.decode_warning()}"
    starved = plan_resources(LabelConfig(images="x", checkpoint="x", output="x"), {"CPU": 2, "GPU": 1})
    assert "give each GPU at least 5 vCPUs" in starved.decode_warning()
