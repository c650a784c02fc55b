"""The labeling job on a multi-node cluster whose nodes advertise GPUs (logical, device forced to CPU):
one inference actor per GPU, spread over the nodes."""
from __future__ import annotations

from collections import Counter

import pytest

from pipeline.label.config import LabelConfig
from pipeline.label.job import label_images
from tests.label_fixtures import good_image, tables, write_files


@pytest.mark.multinode
@pytest.mark.slow
def test_one_inference_actor_per_gpu_across_nodes(multinode_cluster, tiny_checkpoint, tmp_path):
    cluster = multinode_cluster
    two_gpus = cluster.add_node(num_cpus=1, num_gpus=2, object_store_memory=128 * 1024**2)
    one_gpu = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=128 * 1024**2)
    cluster.wait_for_nodes()
    ck_path, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"m{i:02d}.png": good_image(i, 20 + i % 4, 22) for i in range(30)})

    summary = label_images(LabelConfig(
        images=images, checkpoint=ck_path, output=output, num_gpus=3, device="cpu", threads_per_actor=1,
        cpus_per_actor=0.25, batch_size=1, rows_per_read_task=2, rows_per_actor_call=2, max_side=48,
        progress=False))
    assert summary["labelled"] == 30 and summary["errors"] == 0
    assert summary["resources"]["pool"] == 3 and summary["resources"]["actor_gpus"] == 1.0

    # The pool as Ray placed it (state API: every actor the job created, whether or not it got rows before the
    # others finished them): one per GPU, no more, two on the 2-GPU node and one on the other.
    from ray.util.state import list_actors

    pool = [a for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
            if "InferenceActor" in a.class_name]
    assert len(pool) == 3, [(a.class_name, a.state) for a in pool]
    assert Counter(a.node_id for a in pool) == {two_gpus.node_id: 2, one_gpu.node_id: 1}
    assert all(a.required_resources.get("GPU") == 1.0 for a in pool)

    # The actors that labeled rows: device forced to CPU, each holding its own logical GPU.
    actors = summary["inference_actors"]
    assert 1 <= len(actors) <= 3, actors
    assert all(a["device"] == "cpu" and len(a["gpu_ids"]) == 1 for a in actors)
    assert {a["node_id"] for a in actors} <= {two_gpus.node_id, one_gpu.node_id}
    assert len({(a["node_id"], a["gpu_ids"][0]) for a in actors}) == len(actors)  # distinct GPUs
    uris = tables(output)["labels"]["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == 30
