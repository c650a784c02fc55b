"""Spot nodes that vanish, on a ray.cluster_utils.Cluster of this machine: the node of an inference actor and a node
holding blocks of the listing are taken away during a labeling run, and a training worker's node mid-epoch.

A spot reclaim on Kubernetes: the node's pods get SIGTERM and Ray's `ray start --block` drains the node as preempted
(DRAIN_NODE_REASON_PREEMPTION) before its processes stop; the drills do the same (drain, then remove the node) and
add a replacement node, as the autoscaler would. Logical GPUs (num_gpus on CPU nodes) test scheduling, not CUDA.
Each drill prints what it cost: seconds to recover and images labeled again (-s shows them).
"""
from __future__ import annotations

import json
import os
import threading
import time
import traceback

import pytest

from models import load_checkpoint
from pipeline import faults
from pipeline.label.config import LabelConfig
from pipeline.label.crash_budget import BatchKeepsCrashing
from pipeline.label.job import label_images
from pipeline.storage import Location
from pipeline.synthetic import synthesize_voc
from pipeline.train.config import TrainConfig
from pipeline.train.run import run_training
from pipeline.train.run_state import ledger, run_location
from tests.label_fixtures import good_image, tables, write_files
from tests.scrape import free_port, node_ports, total, wait_for

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

NODE = {"object_store_memory": 96 * 1024**2}
GPU_NODE = {"num_cpus": 1, "num_gpus": 1, **NODE}  # room for one inference actor (1 CPU), nothing else


# Ray Train's preemption watcher polls the drain state every 5 s by default; at 0.5 s a 4 s drain is enough for it
# to see the drain before the node goes (the drill waited 12 s). Read where the controller runs: set before the head
# starts, for this module's cluster only.
TRAIN_PREEMPTION_POLL = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def drills_cluster(s3_server):
    """One head (no worker resources) for all drills, instead of a head per drill (~5 s to start, ~2 s to stop):
    `cluster` removes each drill's nodes after it. Its dashboard listens on a free port (a Cluster head's fixed
    8265 fails to start while another Ray on the machine holds it)."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.conftest import _RAY, _shutdown_ray

    _shutdown_ray()
    saved = {k: os.environ.get(k) for k in TRAIN_PREEMPTION_POLL}
    os.environ.update(TRAIN_PREEMPTION_POLL)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "dashboard_port": free_port(),
                                                             "object_store_memory": 256 * 1024**2})
    _RAY["mode"] = "cluster"
    # The state API (list_actors, list_tasks) finds its cluster through $RAY_ADDRESS, else the newest Ray on the
    # machine: with another Ray started since, the drills would watch that one.
    saved["RAY_ADDRESS"] = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        ray.init(address=cluster.address)
        yield cluster
    finally:
        _shutdown_ray()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def cluster(drills_cluster):
    """The module's cluster with only its head; the nodes a drill adds are removed after it (with them, its
    actors: the next drill sees none of them alive)."""
    yield drills_cluster
    for node in list(drills_cluster.worker_nodes):
        drills_cluster.remove_node(node)
    drills_cluster.wait_for_nodes()


def _preempt(cluster, node, grace_s: float = 2.0, replacement: dict | None = None):
    """What a spot reclaim does to a Ray node on Kubernetes: the pod's SIGTERM makes `ray start --block` drain the
    node as preempted with a deadline (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, 30 s by default) and wait for it;
    then the node's processes are gone. `grace_s` stands for that wait.

    `replacement`: the node_args of the node the autoscaler starts in its place, as Karpenter does on the spot
    interruption notice: it starts during the drain (a node takes seconds to start here) and is returned."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    gcs = GcsClient(address=cluster.address)
    accepted, why = gcs.drain_node(node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "spot reclaim (drill)", int((time.time() + grace_s) * 1000))
    assert accepted, why
    # The node goes when the drain's time is up, whatever the replacement's start takes (add_node installs signal
    # handlers: it runs in this, the main thread).
    reclaim = threading.Timer(grace_s, cluster.remove_node, args=(node,))
    reclaim.start()
    try:
        return cluster.add_node(**replacement) if replacement else None
    finally:
        reclaim.join()


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")


def _actors_alive(class_part: str) -> list:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
            if class_part in a.class_name]


def _exactly_once(output: str, count: int) -> None:
    t = tables(output)
    uris = t["labels"]["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == count
    pairs = list(zip(t["class_stats"]["image_uri"].to_pylist(), t["class_stats"]["class_id"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) and {u for u, _ in pairs} == set(uris)
    assert t["errors"].num_rows == 0, t["errors"].to_pylist()  # no image failed because a node went away


def _retried_inference_rows(rows_per_call: int) -> int:
    """Images labeled again (at most): the retried attempts of the inference actor's calls, times a call's rows."""
    from ray.util.state import list_tasks

    tasks = list_tasks(filters=[("type", "=", "ACTOR_TASK")], limit=10_000, raise_on_missing_output=False, detail=True)
    return sum(1 for t in tasks if "InferenceActor" in (t.name or "") and t.attempt_number > 0) * rows_per_call


def _label_config(images: str, ck: str, output: str, **kw) -> LabelConfig:
    return LabelConfig(images=images, checkpoint=ck, output=output, device="cpu", threads_per_actor=1,
                       cpus_per_actor=1, batch_size=1, rows_per_read_task=2, rows_per_actor_call=2, max_side=32,
                       rows_per_file=2, progress=False, wait_for_resources=60, **kw)


def test_preempted_inference_nodes_cost_no_retries_but_a_crashing_batch_ends_the_run(cluster, tiny_checkpoint, tmp_path, monkeypatch):
    """One GPU actor; its node is reclaimed four times while the same calls are in flight: more times than the
    3 retries a batch has (pipeline.label.crash_budget). Lost nodes are not charged to them: the run completes, each
    image once, nothing in errors/. Then a batch that kills its actor on a live node ends its run after 3 retries."""
    cluster.add_node(num_cpus=1, **NODE)  # reads, decodes, writes
    gpu = cluster.add_node(**GPU_NODE)
    cluster.wait_for_nodes()
    ck, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"p{i}.png": good_image(i, 20, 24) for i in range(4)})
    monkeypatch.setenv(faults.ENV, "label.inference=sleep:4")  # every call takes 4 s: the node dies mid-call
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(label_images(_label_config(images, ck, output, num_gpus=1))))
    run.start()
    recover_s = []
    try:
        for _ in range(4):
            (actor,) = _wait(lambda: _actors_alive("InferenceActor"), 120, "the inference actor")
            assert actor.node_id == gpu.node_id
            time.sleep(1.0)  # inside its call (then 2 s of drain, still inside)
            assert run.is_alive() and not result
            lost = time.monotonic()
            gpu = _preempt(cluster, gpu, replacement=GPU_NODE)  # with the autoscaler's replacement
            _wait(lambda node=gpu.node_id: [a for a in _actors_alive("InferenceActor") if a.node_id == node], 120,
                  "the actor restarted on the new node")
            recover_s.append(time.monotonic() - lost)
    finally:
        run.join(timeout=300)
    monkeypatch.delenv(faults.ENV)
    assert result.get("status") == "succeeded", result
    assert (result["labelled"], result["errors"]) == (4, 0)
    _exactly_once(output, 4)
    relabeled = _retried_inference_rows(2)
    assert relabeled >= 4 * 2  # each preemption interrupted a call
    print(f"\n[drill] inference node preempted 4x: recovered in {', '.join(f'{s:.1f}' for s in recover_s)} s "
          f"(node lost -> actor alive on the new node); images labeled again: {relabeled}; "
          f"run {result['wall_seconds']:.0f} s")

    # The other side, on the same cluster: a call that kills its process every time on a node that stays up (a
    # crash, not a node loss) is retried 3 times, then ends the run with one line instead of looping.
    images, output = str(tmp_path / "crash-imgs"), str(tmp_path / "crash-out")
    write_files(images, {f"k{i}.png": good_image(i, 20, 24) for i in range(2)})
    monkeypatch.setenv(faults.ENV, "label.inference=kill")
    with pytest.raises(BatchKeepsCrashing, match=r"^an inference batch of 2 image\(s\) \(first .*k0.png\) killed its "
                       r"inference actor 3 times on nodes that stayed up .*: the run stops; rerun to retry the rest$"):
        label_images(_label_config(images, ck, output, num_gpus=1))
    monkeypatch.delenv(faults.ENV)
    assert tables(output)["labels"].num_rows == 0
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "crash-out" / "runs").glob("*.json")]
    assert record["status"] == "failed" and "an inference batch of 2 image(s)" in record["error"]


def test_nodes_holding_the_listing_preempted_during_a_run(cluster, tiny_checkpoint, tmp_path, monkeypatch):
    """The listing's blocks live in the object stores of the nodes that listed them; those nodes are reclaimed
    twice while the pipeline reads them. The run completes (or its rerun does): each image once, no errors."""
    from ray.util.state import list_tasks

    cpu_nodes = [cluster.add_node(num_cpus=1, **NODE) for _ in range(2)]
    cluster.add_node(**GPU_NODE)
    cluster.wait_for_nodes()
    ck, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"d{i:02d}/l{i}.png": good_image(i, 18, 22) for i in range(8)})
    monkeypatch.setenv(faults.ENV, "label.inference=sleep:1")
    result: dict = {}
    errors: list = []

    def night():
        try:
            result.update(label_images(_label_config(images, ck, output, num_gpus=1)))
        except Exception as e:  # noqa: BLE001 - reported below; the rerun must finish the night
            errors.append(e)

    run = threading.Thread(target=night)
    run.start()
    recover_s, lost_nodes = [], 0
    try:
        for _ in range(2):
            _wait(lambda: not run.is_alive() or _actors_alive("InferenceActor"), 120, "the inference actor")
            listed_on = {t.node_id for t in list_tasks(filters=[("state", "=", "FINISHED")], limit=10_000,
                                                        raise_on_missing_output=False, detail=True)
                         if "_list_units" in (t.name or "") or "Repartition" in (t.name or "")}
            victims = [n for n in cpu_nodes if n.node_id in listed_on and n in cluster.worker_nodes]
            if not victims or not run.is_alive():
                break
            lost = time.monotonic()
            replacement = _preempt(cluster, victims[0], replacement={"num_cpus": 1, **NODE})
            lost_nodes += 1
            cpu_nodes.remove(victims[0])
            cpu_nodes.append(replacement)
            time.sleep(1)  # the run reads on (the second reclaim hits it mid-run, not right after the first)
            recover_s.append(time.monotonic() - lost)
    finally:
        run.join(timeout=400)
    monkeypatch.delenv(faults.ENV)
    assert lost_nodes >= 1, "no node held the listing while the run was going"
    if errors or result.get("status") != "succeeded":  # the run did not survive: its rerun must finish the night
        rerun = label_images(_label_config(images, ck, output, num_gpus=1))
        assert rerun["status"] == "succeeded" and rerun["errors"] == 0, rerun
        outcome = f"run failed ({type(errors[0]).__name__ if errors else result}); the rerun labeled {rerun['labelled']}"
    else:
        assert (result["labelled"], result["errors"]) == (8, 0)
        outcome = f"run completed in {result['wall_seconds']:.0f} s"
    _exactly_once(output, 8)
    print(f"\n[drill] listing nodes preempted {lost_nodes}x: {outcome}; images labeled again: "
          f"{_retried_inference_rows(2)}")


def test_a_training_workers_node_preempted_mid_epoch_resumes_from_the_last_epoch(cluster, tmp_path, monkeypatch):
    """Two CPU workers on two nodes; in epoch 2 the node of one of them is reclaimed (and replaced). The run
    restarts its worker group from epoch 1's checkpoint and finishes, with --max-failures 0 (a preemption is not
    charged to it): the ledger has each epoch exactly once."""
    nodes = [cluster.add_node(num_cpus=2, **NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    data = str(tmp_path / "syn")
    synthesize_voc(data, 16, size=(40, 32), seed=6, val_fraction=0.25)
    cfg = TrainConfig(data=data, storage=str(tmp_path / "runs"), name="spot", num_classes=6, width_mult=0.0625,
                      padding="same", num_workers=2, cpus_per_worker=1.5, data_cpus=0.5, epochs=2, batch_size=2,
                      crop_size=32, optimizer="adam", lr=0.005, amp="off", max_failures=0)
    reached = tmp_path / "epoch1"
    # Rank 0 pauses after reporting epoch 1 until the node is gone (the other worker waits in the next collective).
    monkeypatch.setenv(faults.ENV, f"train.reported:epoch1=wait_for:{reached}")
    result: dict = {}
    errors: list = []
    run = threading.Thread(target=lambda: _capture(result, errors, run_training, cfg))
    run.start()
    run_dir = run_location(cfg.storage, cfg.name)
    try:
        _wait(lambda: [r for r in ledger(run_dir) if r["epoch"] == 1], 300, "epoch 1 in the ledger")
        workers = _wait(lambda: [a for a in _actors_alive("RayTrainWorker")], 60, "the training workers")
        # The run's record of dropped samples lives on the head (the driver's node), never on a spot node.
        (bad_log,) = _actors_alive("BadSampleLog")
        assert bad_log.node_id == cluster.head_node.node_id
        rank_nodes = {a.node_id for a in workers}
        (victim,) = [n for n in nodes if n.node_id in rank_nodes][:1]
        lost = time.monotonic()
        # Ray Train's preemption watcher (polling every 0.5 s here, TRAIN_PREEMPTION_POLL) sees the drain first.
        replacement = _preempt(cluster, victim, grace_s=4, replacement={"num_cpus": 2, **NODE})
        nodes.remove(victim)
        nodes.append(replacement)
        reached.touch()
        # The job's metrics say so (pipeline.telemetry, from the controller on the head): one restart, preempted.
        wait_for(node_ports, lambda s: total(s, "ray_fcn_train_restarts", run="spot", preempted="true") == 1
                 and total(s, "ray_fcn_train_restarts", run="spot", preempted="false") == 0, timeout=120)
        _wait(lambda: [r for r in ledger(run_dir) if r["epoch"] == 2], 300, "epoch 2 after the restart")
        recover_s = time.monotonic() - lost
    finally:
        reached.touch()
        run.join(timeout=400)
    monkeypatch.delenv(faults.ENV)
    assert not errors, "".join(traceback.format_exception(errors[0]))  # --max-failures 0: not charged to it
    assert result["epochs"] == 2
    epochs = [r["epoch"] for r in ledger(run_dir) if r["attempt"] != "recovered"]
    assert sorted(epochs) == [1, 2]  # no epoch lost, none trained twice
    # Each node fits one 1.5-CPU worker and keeps 0.5 CPU for decoding: the restarted group again spans two
    # worker nodes, never the head (which has no worker resources).
    used = result["worker_nodes"]
    assert len(used) == 2 and len(set(used)) == 2 and cluster.head_node.node_id not in used, used
    assert load_checkpoint(result["latest_checkpoint"]).metadata["epoch"] == 2
    assert Location.of(os.path.join(cfg.storage, cfg.name)).exists()
    print(f"\n[drill] training node preempted in epoch 2: {recover_s:.0f} s from node loss to epoch 2 committed "
          f"(restart from epoch 1's checkpoint; one epoch's work redone at most)")


def _capture(result: dict, errors: list, fn, *args) -> None:
    try:
        result.update(fn(*args))
    except Exception as e:  # noqa: BLE001 - asserted by the test
        errors.append(e)
