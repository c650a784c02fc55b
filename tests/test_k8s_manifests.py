"""k8s/: the KubeRay manifests against KubeRay's own CRD schemas (vendored in k8s/crds/, no cluster), and what a schema
cannot check: the entrypoints parse with the jobs' own argument parsers, the resources fit the flags, images and Ray
versions agree with cluster.yaml and pyproject.toml, S3 comes through a service account with no keys, the alert
rules and dashboard name only metrics the jobs export (and pass promtool where it is installed). Last, what stops an
overrunning night (the RayCronJob has no concurrency policy): the output's lease, with two real labeling runs."""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from zoneinfo import ZoneInfo

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from pipeline import faults
from pipeline.label.config import LabelConfig
from pipeline.label.job import label_images
from pipeline.label.resources import plan_resources
from pipeline.telemetry import LABEL_METRICS, PREFIX, TRAIN_METRICS
from pipeline.train.config import TrainConfig
from tests.jobs_util import ROOT, load_job, run_subprocess
from tests.label_fixtures import good_image, write_files

K8S = os.path.join(ROOT, "k8s")
MONITORING = os.path.join(K8S, "monitoring")
MANIFESTS = {"train-rayjob.yaml": "RayJob", "label-raycronjob.yaml": "RayCronJob"}
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
IMAGE_ROOT = "/home/ray/fcn"  # where k8s/Dockerfile puts the project
KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # the CRDs are 1-2 MB


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return {name: _yaml(os.path.join(K8S, name)) for name in MANIFESTS}


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return _yaml(os.path.join(ROOT, "cluster.yaml"))


def _job_spec(doc: dict) -> dict:
    """The RayJob spec: the document's own, or a RayCronJob's template."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def _groups(doc: dict) -> list[dict]:
    """The head group and every worker group, each with its pod template."""
    cluster = _job_spec(doc)["rayClusterSpec"]
    return [{"groupName": "head", **cluster["headGroupSpec"]}, *cluster["workerGroupSpecs"]]


def _containers(doc: dict) -> list[dict]:
    return [c for g in _groups(doc) for c in g["template"]["spec"]["containers"]]


def _quantity(text) -> float:
    """A Kubernetes quantity (7, "500m", 26Gi, 128G) as a number (bytes for memory)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|Ki|M|Mi|G|Gi|T|Ti)?", str(text))
    assert m, f"not a quantity: {text!r}"
    units = {None: 1, "m": 1e-3, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9, "Gi": 2**30, "T": 1e12, "Ti": 2**40}
    return float(m.group(1)) * units[m.group(2)]


# ------------------------------------------------------------------------------------------------ the schemas


def _strict(schema):
    """The CRD schema as `kubectl apply` (server-side strict field validation) treats it: a field the schema does not
    name is an error, except where the schema keeps unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd(kind: str) -> dict:
    crd = _yaml(os.path.join(K8S, "crds", CRDS[kind]))
    assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
    return crd


@functools.lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    (version,) = [v for v in _crd(kind)["spec"]["versions"] if v["name"] == "v1" and v["served"]]
    return jsonschema.Draft202012Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _problems(kind: str, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(kind).iter_errors(doc)]


def test_vendored_crds_are_the_recorded_upstream_files():
    with open(os.path.join(K8S, "crds", "SOURCE.md")) as f:
        source = f.read()
    assert "ray-project/kuberay" in source and "feeaf72" in source and "Apache License 2.0" in source
    for name in CRDS.values():
        with open(os.path.join(K8S, "crds", name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() in source, name
    with open(os.path.join(K8S, "crds", "LICENSE")) as f:
        assert "Apache License" in f.read()


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_manifest_validates_against_kuberays_crd(manifests, name):
    doc = manifests[name]
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", MANIFESTS[name])
    assert _problems(doc["kind"], doc) == []


def test_the_schema_check_rejects_what_the_api_server_would(manifests):
    """The check can fail: a misspelt field, a wrong type, a field the pod spec does not have, a bad enum value."""
    doc = manifests["train-rayjob.yaml"]
    broken = copy.deepcopy(doc)
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    broken["spec"]["rayClusterSpec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    problems = "\n".join(_problems("RayJob", broken))
    for needle in ("'shutdownAfterJobFinish' was unexpected", "maxReplicas: '2' is not of type 'integer'",
                   "'gpus' was unexpected", "upscalingMode: 'Fast' is not one of"):
        assert needle in problems, problems


def test_no_field_whose_rules_the_schema_check_cannot_evaluate(manifests):
    """A few CRD fields carry CEL rules (x-kubernetes-validations) that only the API server evaluates: the manifests
    leave those fields out, so the offline check is complete."""
    def cel_paths(schema, path=()):
        if isinstance(schema, dict):
            if "x-kubernetes-validations" in schema:
                yield path
            for key, sub in schema.get("properties", {}).items():
                yield from cel_paths(sub, (*path, key))
            if isinstance(schema.get("items"), dict):
                yield from cel_paths(schema["items"], (*path, "[]"))

    def present(doc, path):
        if not path:
            return True
        if path[0] == "[]":
            return isinstance(doc, list) and any(present(item, path[1:]) for item in doc)
        return isinstance(doc, dict) and path[0] in doc and present(doc[path[0]], path[1:])

    for name, kind in MANIFESTS.items():
        (version,) = [v for v in _crd(kind)["spec"]["versions"] if v["name"] == "v1"]
        paths = list(cel_paths(version["schema"]["openAPIV3Schema"]))
        assert paths, "expected some CEL rules in the CRD"
        assert [p for p in paths if present(manifests[name], p)] == [], name


# ------------------------------------------------------------------------------- what the schema cannot check


def _entrypoint(doc: dict) -> tuple[str, list[str]]:
    """(job name, its arguments) of the entrypoint `python /home/ray/fcn/jobs/<job>.py ...`."""
    argv = shlex.split(_job_spec(doc)["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith(IMAGE_ROOT + "/jobs/"), argv[:2]
    script = os.path.relpath(argv[1], IMAGE_ROOT)
    assert os.path.isfile(os.path.join(ROOT, script)), f"{script} is not in the project"
    return os.path.basename(script).removesuffix(".py"), argv[2:]


def _parsed(doc: dict) -> dict:
    job, args = _entrypoint(doc)
    return vars(load_job(job).build_parser().parse_args(args))  # a bad flag raises JobError: the test fails


def test_entrypoints_parse_with_the_jobs_own_parsers(manifests):
    train = TrainConfig(**_parsed(manifests["train-rayjob.yaml"]))
    train.validate()
    assert _entrypoint(manifests["train-rayjob.yaml"])[0] == "train"
    label = LabelConfig(**_parsed(manifests["label-raycronjob.yaml"]))
    label.validate()
    assert _entrypoint(manifests["label-raycronjob.yaml"])[0] == "label"
    # A changed flag name is caught by the jobs' parsers (the check can fail).
    bad = copy.deepcopy(manifests["train-rayjob.yaml"])
    bad["spec"]["entrypoint"] = bad["spec"]["entrypoint"].replace("--num-workers", "--workers")
    with pytest.raises(Exception, match="--workers"):
        _parsed(bad)


def _limits(container: dict) -> dict[str, float]:
    res = container["resources"]
    assert res["requests"] == res["limits"], f"{container['name']}: requests and limits differ (Ray reads the limits)"
    return {k: _quantity(v) for k, v in res["limits"].items()}


def _ray_resources(group: dict) -> dict[str, float]:
    """The logical resources a group's node advertises: CPUs and GPUs from the container's limits (KubeRay's
    way), num-cpus and custom resources from rayStartParams."""
    (container,) = group["template"]["spec"]["containers"]
    limits, params = _limits(container), group.get("rayStartParams", {})
    out = {"CPU": float(params.get("num-cpus", limits["cpu"])), "GPU": limits.get("nvidia.com/gpu", 0.0)}
    if "resources" in params:
        out.update(json.loads(json.loads(params["resources"])))  # KubeRay's quoting: a JSON string of a JSON object
    return out


def _capacity(doc: dict) -> dict[str, float]:
    """What the Ray cluster has with every worker group at maxReplicas (the head advertises no CPUs)."""
    total: dict[str, float] = {}
    for g in _groups(doc):
        for k, v in _ray_resources(g).items():
            total[k] = total.get(k, 0.0) + v * g.get("maxReplicas", 1)
    return total


def _spot(group: dict) -> bool:
    return group["template"]["spec"].get("nodeSelector", {}).get("karpenter.sh/capacity-type") == "spot"


def test_training_resources_fit_its_flags(manifests):
    doc = manifests["train-rayjob.yaml"]
    cfg = TrainConfig(**_parsed(doc))
    head, *workers = _groups(doc)
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head schedules no work
    assert cfg.use_gpu and cfg.accelerator_type
    accel = f"accelerator_type:{cfg.accelerator_type}"
    (group,) = [g for g in workers if _ray_resources(g).get(accel)]  # the group --accelerator-type picks
    node = _ray_resources(group)
    # All workers on one node (DDP stays inside it, docs/operations.md "Scaling"), with the input pipeline's CPUs beside them.
    assert node["GPU"] >= cfg.num_workers
    assert node["CPU"] >= cfg.num_workers * cfg.cpus_per_worker + cfg.data_cpus
    assert _capacity(doc)["GPU"] >= cfg.num_workers
    # It scales from zero on spot nodes: the job must wait for them and survive losing them.
    assert group["minReplicas"] == 0 and _spot(group)
    assert cfg.wait_for_resources and cfg.wait_for_resources > 0 and cfg.max_failures >= 1
    assert not _spot(head)


def test_labeling_resources_fit_its_flags(manifests):
    doc = manifests["label-raycronjob.yaml"]
    cfg = LabelConfig(**_parsed(doc))
    head, *workers = _groups(doc)
    assert head["rayStartParams"]["num-cpus"] == "0" and not _spot(head)
    gpu_groups = [g for g in workers if _ray_resources(g)["GPU"] > 0]
    assert len(gpu_groups) == 1
    (gpu,) = gpu_groups
    assert _ray_resources(gpu)["GPU"] == 1 and _spot(gpu) and gpu["minReplicas"] == 0  # single-GPU spot, from zero
    assert all(g["minReplicas"] == 0 for g in workers)
    assert cfg.wait_for_resources and cfg.wait_for_resources > 0
    # The job's own planner on the cluster at its full size: one actor per GPU, --num-gpus of them, and enough
    # CPUs left to decode for them at the GPU target rate.
    plan = plan_resources(cfg, _capacity(doc))
    assert plan.pool == cfg.num_gpus and plan.actor_gpus == 1
    assert plan.decode_warning() is None, plan.decode_warning()


def test_images_and_ray_versions_agree_with_cluster_yaml_and_pyproject(manifests, cluster_yaml):
    import ray

    base = cluster_yaml["docker"]["image"]  # rayproject/ray:2.60.0-py311-gpu
    repo, tag = base.split(":")
    with open(os.path.join(K8S, "Dockerfile")) as f:
        froms = [line.split()[1] for line in f if line.startswith("FROM ")]
    assert froms == [base]
    ray_version = tag.split("-")[0]
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        (ray_req,) = [Requirement(d) for d in re.findall(r'^\s*"(ray\[[^"]+)"', f.read(), re.M)]
    assert ray_version in ray_req.specifier and ray.__version__ == ray_version
    images = {c["image"] for doc in manifests.values() for c in _containers(doc)}
    assert len(images) == 1, images
    (image,) = images
    assert image.endswith(f"/fcn-pipeline:ray{tag}"), image  # built FROM the cluster.yaml image (k8s/Dockerfile)
    for doc in manifests.values():
        assert _job_spec(doc)["rayClusterSpec"]["rayVersion"] == ray_version


def test_shm_is_memory_backed_and_sized_like_cluster_yaml(manifests, cluster_yaml):
    (shm,) = [o.split("=", 1)[1] for o in cluster_yaml["docker"]["run_options"] if o.startswith("--shm-size=")]
    size = _quantity(shm.replace("g", "Gi"))  # Docker's g is GiB
    for doc in manifests.values():
        for g in _groups(doc):
            pod = g["template"]["spec"]
            (container,) = pod["containers"]
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert volume["emptyDir"]["medium"] == "Memory", g["groupName"]
            assert _quantity(volume["emptyDir"]["sizeLimit"]) == size, g["groupName"]


def test_s3_through_the_service_account_and_no_keys(manifests):
    sa = _yaml(os.path.join(K8S, "service-account.yaml"))
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    for doc in manifests.values():
        for g in _groups(doc):
            assert g["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"], g["groupName"]
        for c in _containers(doc):
            assert not {e["name"] for e in c.get("env", [])} & set(KEYS)
    for name in [*MANIFESTS, "service-account.yaml"]:
        with open(os.path.join(K8S, name)) as f:
            text = f.read()
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret|SecretAccessKey", text, re.I), name


def test_jobs_end_their_clusters_and_the_night_has_a_valid_schedule(manifests):
    for doc in manifests.values():
        spec = _job_spec(doc)
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    cron = manifests["label-raycronjob.yaml"]["spec"]
    fields = cron["schedule"].split()
    ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    assert len(fields) == 5
    for field, (lo, hi) in zip(fields, ranges, strict=True):
        assert field == "*" or lo <= int(field) <= hi, cron["schedule"]
    ZoneInfo(cron["timeZone"])  # an IANA name
    # Stopped before the next night would start (the schedule is daily), so nights cannot pile up.
    assert fields[2:] == ["*", "*", "*"] and cron["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600


def test_every_ray_pod_serves_metrics_where_the_podmonitor_looks(manifests):
    monitor = _yaml(os.path.join(MONITORING, "podmonitor.yaml"))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for doc in manifests.values():
        for g in _groups(doc):
            assert selector.items() <= g["template"]["metadata"]["labels"].items(), g["groupName"]
            (container,) = g["template"]["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports[endpoint["port"]] == int(g["rayStartParams"]["metrics-export-port"]), g["groupName"]


# ------------------------------------------------------------------------------------- alerts and dashboard

EXPORTED = {PREFIX + name for name in [*LABEL_METRICS, *TRAIN_METRICS]}


def _named_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bray_fcn_[a-z_]+", text))


def _dashboard_exprs() -> list[str]:
    with open(os.path.join(MONITORING, "grafana-dashboard.json")) as f:
        dash = json.load(f)
    assert dash["uid"] and dash["panels"] and dash["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dash["templating"]["list"])
    exprs = []
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            exprs.append(target["expr"])
    return exprs


def test_rules_and_dashboard_name_only_metrics_the_jobs_export():
    with open(os.path.join(MONITORING, "prometheus-rules.yaml")) as f:
        text = f.read()
    rules = yaml.safe_load(text)
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {r["alert"] for r in alerts} >= {"FcnLabelingNoCommit", "FcnLabelingErrorRateHigh",
                                            "FcnLabelingStillRunningInTheMorning"}
    for rule in alerts:  # the rule file's schema, as promtool reads it
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert rule["labels"]["severity"] in ("info", "warning", "critical") and rule["annotations"]["summary"]
        assert re.fullmatch(r"(\d+[smhd])+", rule.get("for", "0s")), rule
    used = _named_metrics(text) | _named_metrics("\n".join(_dashboard_exprs()))
    assert used and used <= EXPORTED, used - EXPORTED
    assert _named_metrics("\n".join(_dashboard_exprs())) == EXPORTED  # the dashboard shows every metric


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt-get install prometheus)")
def test_promtool_checks_the_rules_their_unit_tests_and_the_dashboards_queries(tmp_path):
    def promtool(*args, cwd=MONITORING):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert "SUCCESS: 8 rules found" in promtool("check", "rules", "prometheus-rules.yaml")
    assert "SUCCESS" in promtool("test", "rules", "prometheus-rules.test.yaml")
    # The dashboard's PromQL, parsed by Prometheus itself (as recording rules of a scratch file).
    records = [{"record": f"fcn:dashboard:{i}", "expr": e} for i, e in enumerate(_dashboard_exprs())]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    # And the check can fail: a rule that names a metric wrongly stays valid PromQL, but breaks a unit test.
    broken = (tmp_path / "broken")
    broken.mkdir()
    with open(os.path.join(MONITORING, "prometheus-rules.yaml")) as f:
        (broken / "prometheus-rules.yaml").write_text(f.read().replace("> 0.05", "> 0.5"))
    shutil.copy(os.path.join(MONITORING, "prometheus-rules.test.yaml"), broken)
    done = subprocess.run(["promtool", "test", "rules", "prometheus-rules.test.yaml"], capture_output=True, text=True,
                          cwd=broken, timeout=120)
    assert done.returncode != 0 and "FcnLabelingErrorRateHigh" in done.stdout + done.stderr


# ------------------------------------------------------------------------------- an overrunning night


def test_an_overrunning_night_makes_the_next_one_exit_2_at_once(ray_session, tiny_checkpoint, manifests, tmp_path,
                                                                monkeypatch):
    """Two nights of the RayCronJob's entrypoint on one output: the first holds it (paused at its first commit);
    the second, a real `jobs/label.py` process, exits 2 at once naming the first run, while the first is still
    paused; then the first finishes its night."""
    ck, _ = tiny_checkpoint
    images, output = str(tmp_path / "photos"), str(tmp_path / "segmentation")
    write_files(images, {f"{i}.png": good_image(i, 16, 18) for i in range(4)})
    _, args = _entrypoint(manifests["label-raycronjob.yaml"])
    # The manifest's flags, with this machine's paths and no GPUs (the scheduling flags are the cluster's).
    paths = {"--images": images, "--checkpoint": ck, "--output": output}
    argv, i = [], 0
    while i < len(args):
        if args[i] in paths:
            argv += [args[i], paths[args[i]]]
            i += 2
        elif args[i] == "--num-gpus":
            argv += ["--num-gpus", "0"]
            i += 2
        else:
            argv.append(args[i])
            i += 1
    argv += ["--actors", "1", "--threads-per-actor", "1", "--max-side", "32", "--no-progress", "--wait-for-resources", "0"]
    assert set(paths) <= set(argv)

    go = tmp_path / "go"
    monkeypatch.setenv(faults.ENV, f"label.commit:committed=wait_for:{go}")
    first: dict = {}
    night1 = threading.Thread(target=lambda: first.update(
        label_images(LabelConfig(**vars(load_job("label").build_parser().parse_args(argv))))))
    night1.start()
    try:
        lease = os.path.join(output, "_lease.json")
        deadline = time.monotonic() + 120
        while not os.path.exists(lease) and time.monotonic() < deadline and night1.is_alive():
            time.sleep(0.1)
        assert os.path.exists(lease)
        with open(lease) as f:
            holder = json.load(f)["holder"]
        night2 = run_subprocess("label", argv, env={faults.ENV: ""}, timeout=120)
        still_paused = night1.is_alive() and not go.exists()
    finally:
        go.touch()
        night1.join(timeout=300)
    monkeypatch.delenv(faults.ENV)
    assert night2.returncode == 2, night2.stderr[-2000:]
    (line,) = [ln for ln in night2.stderr.splitlines() if ln.startswith("error:")]
    assert f"output {output} is in use by {holder}" in line and "which has held it for" in line, line
    assert still_paused  # refused while the first night was still going: it did not wait for it
    assert first["status"] == "succeeded" and first["labelled"] == 4 and holder == f"labeling run {first['run_id']}"
    assert not os.path.exists(lease)
