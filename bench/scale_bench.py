"""Scale benchmark of the labeling job: what the driver holds, the skip phase, and labeling across nodes.

    python bench/scale_bench.py [--small 1000000] [--large 10000000] [--images 960]

In one run:
(a) skip phase: listing manifests (Parquet, S3 Inventory's columns) of `--small` and `--large` images, 90% of
    them already in the index, each in its own process with its own local Ray: list -> anti-join -> count
    (`pipeline.label.job.list_todo`, what the job runs). Reports the driver's peak RSS (its own process, from
    getrusage) and the phase's seconds; targets: rss_ratio <= 1.3 (flat), seconds_ratio <= 12 (linear or better).
    The images need not exist for the skip phase.
(b) driver bytes per labeled image: the job end to end on `--images` small images; the summary's
    `driver_bytes` (every block the pipeline hands the driver) / labeled. Target < 1 KB.
(c) 3 nodes vs 1: the same job on a `ray.cluster_utils.Cluster` of 3 nodes x 2 CPUs and of 1 node x 6 CPUs
    (logical CPUs on this machine), images/s of the pipeline phase, ratio. Target >= 0.9.

Prints one JSON line; record the figures in bench/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

FILES = 10  # manifest and index files per listing


def make_listing(root: str, n: int) -> tuple[str, str]:
    """(manifest folder, output root): n synthetic S3 URIs in FILES Parquet files, 90% of them in the index."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.label.commit import final_name, parquet_bytes
    from pipeline.label.tables import INDEX, INDEX_SCHEMA

    manifest, output = os.path.join(root, "manifest"), os.path.join(root, "out")
    os.makedirs(manifest)
    per = -(-n // FILES)
    for f in range(FILES):
        ids = pa.array(range(f * per, min(n, (f + 1) * per)), pa.int64())
        keys = pc.binary_join_element_wise("photos/", pc.cast(ids, pa.string()), ".jpg", "")
        table = pa.table({"bucket": pa.array(np.full(len(ids), "nightly-bucket", dtype=object), pa.string()),
                          "key": keys,
                          "size": pa.array([120_000] * len(ids), pa.int64()),
                          "e_tag": pc.binary_join_element_wise("etag-", pc.cast(ids, pa.string()), "")})
        pq.write_table(table, os.path.join(manifest, f"part-{f:03d}.parquet"))
        labeled = table.filter(pc.less(ids, int(0.9 * n)))  # the first 90% were labeled before
        index = pa.table({"image_uri": pc.binary_join_element_wise("s3://nightly-bucket/", labeled["key"], ""),
                          "image_version": labeled["e_tag"]}, schema=INDEX_SCHEMA)
        path = os.path.join(output, final_name(INDEX, "", f"bench-{f:05d}", "benchmodel"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(parquet_bytes(index, row_group_rows=100_000))
    return manifest, output


def skip_phase(manifest: str, output: str) -> dict:
    """Child process: the job's list -> anti-join on a fresh local Ray; the driver's peak RSS."""
    import ray

    from pipeline.label.job import list_todo
    from pipeline.label.listing import plan_listing
    from pipeline.storage import Location

    ray.init(address="local", num_cpus=2, object_store_memory=6 * 1024**3, include_dashboard=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.monotonic()
    todo, listed, to_label = list_todo(plan_listing(Location.of(manifest), True), Location.of(output), "benchmodel",
                                       force=False, rows_per_file=1000)
    seconds = time.monotonic() - t
    return {"listed": listed, "to_label": to_label, "blocks_to_label": todo.num_blocks(), "seconds": round(seconds, 2),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_rss_before_mb": round(rss_before, 1)}


def _child(*args: str) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_images(root: str, count: int) -> str:
    from pipeline.synthetic import synthesize_voc

    synthesize_voc(root, count, size=(128, 96), seed=5, val_fraction=0.0)
    return os.path.join(root, "JPEGImages")


def label_on_cluster(images: str, checkpoint: str, output: str, nodes: int, cpus_per_node: int) -> dict:
    """Child process: the job on a Cluster of `nodes` x `cpus_per_node` (head without resources)."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.label.config import LabelConfig
    from pipeline.label.job import label_images

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 256 * 1024**2})
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node, object_store_memory=256 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        summary = label_images(LabelConfig(images=images, checkpoint=checkpoint, output=output, max_side=128,
                                           actors=3, threads_per_actor=1, cpus_per_actor=1.0, batch_size=4,
                                           rows_per_file=40, progress=False, wait_for_resources=0))
    finally:
        ray.shutdown()
        cluster.shutdown()
    t = summary["timings_seconds"]
    pipeline_s = t["pipeline"]
    # From the first model ready to the end: the steady state, without the actors' start (torch import, weights).
    end = t["ray_start_and_resources"] + t["list_and_skip"] + pipeline_s
    return {"labelled": summary["labelled"], "errors": summary["errors"], "pipeline_seconds": pipeline_s,
            "images_per_second": round(summary["labelled"] / pipeline_s, 2),
            "images_per_second_after_startup": round(summary["labelled"] / (end - t["inference_ready"]), 2),
            "driver_bytes": summary["driver_bytes"],
            "nodes": len({a["node_id"] for a in summary["inference_actors"]})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=1_000_000, help="listing size of the first skip phase (0: no skip phases)")
    p.add_argument("--large", type=int, default=10_000_000)
    p.add_argument("--images", type=int, default=960, help="images of the end-to-end parts (0: none)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "skip":
            result = skip_phase(*rest)
        else:
            result = label_on_cluster(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
        print(json.dumps(result))
        return

    from pipeline.synthetic import SYNTHETIC_CLASSES
    from pipeline.testbed import random_checkpoint

    work = tempfile.mkdtemp(prefix="scale-bench-")
    try:
        skip = {}
        for name, n in (("small", args.small), ("large", args.large)) if args.small else ():
            t = time.monotonic()
            manifest, output = make_listing(os.path.join(work, name), n)
            made = time.monotonic() - t
            skip[name] = {"images": n, "generated_seconds": round(made, 1), **_child("skip", manifest, output)}
            shutil.rmtree(os.path.join(work, name))
        result = {"skip_phase": skip} if not skip else {
            "skip_phase": skip,
            "rss_ratio_large_vs_small": round(skip["large"]["driver_peak_rss_mb"] / skip["small"]["driver_peak_rss_mb"], 3),
            "skip_seconds_ratio_large_vs_small": round(skip["large"]["seconds"] / skip["small"]["seconds"], 2),
        }
        if not args.images:
            print(json.dumps(result))
            return
        images = make_images(os.path.join(work, "imgs"), args.images)
        checkpoint = os.path.join(work, "ck.pt")
        random_checkpoint(checkpoint, list(SYNTHETIC_CLASSES), width_mult=0.25)
        one = _child("cluster", images, checkpoint, os.path.join(work, "out1"), "1", "6")
        three = _child("cluster", images, checkpoint, os.path.join(work, "out3"), "3", "2")
        result |= {
            "driver_bytes_per_labelled_image": round(three["driver_bytes"] / max(1, three["labelled"]), 1),
            "one_node_6cpu": one, "three_nodes_2cpu": three,
            "throughput_ratio_3_nodes_vs_1": round(three["images_per_second"] / one["images_per_second"], 3),
            "throughput_ratio_3_nodes_vs_1_after_startup": round(
                three["images_per_second_after_startup"] / one["images_per_second_after_startup"], 3),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
