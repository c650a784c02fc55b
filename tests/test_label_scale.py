"""The labeling job at bucket scale, in small: streamed listing, listing manifests, the index and its anti-join,
writes by Ray workers (a writer killed mid-file-set), a reused run id, and one run per output root (the lease)."""
from __future__ import annotations

import json
import os
import threading
import time
from functools import partial
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline import faults, storage
from pipeline.dataset_formats import list_images
from pipeline.label.commit import final_name, parquet_bytes
from pipeline.label.job import label_images
from pipeline.label.listing import listing_dataset, plan_listing
from pipeline.label.readers import read_table
from pipeline.label.tables import INDEX, INDEX_SCHEMA
from pipeline.storage import Location, UnreadableFile
from tests import storage_util
from tests.jobs_util import run_subprocess
from tests.label_fixtures import duckdb_connection, good_image, label_config, tables, write_files


def _root(where: str, tmp_path, request, name: str) -> str:
    if where == "s3":
        request.getfixturevalue("bucket")
        return f"s3://test-bucket/{name}"
    return str(tmp_path / name)


# Ray's and the job's own choice of actors and threads (LabelConfig's None), canvases up to 64 px.
_config = partial(label_config, max_side=64, batch_size=2, rows_per_file=4, rows_per_read_task=8, actors=None,
                  threads_per_actor=None, cpus_per_actor=None, run_date="2026-05-01")


def _exactly_once(output: str) -> dict:
    """image_uri -> times in labels/ (DuckDB); every count must be 1, and class_stats must agree."""
    con = duckdb_connection(output)
    labels = dict(con.execute(f"SELECT image_uri, count(*) FROM read_parquet('{output}/labels/**/*.parquet') "
                              "GROUP BY ALL").fetchall())
    stats = con.execute(f"SELECT image_uri, class_id, count(*) AS n FROM read_parquet('{output}/class_stats/**/"
                        "*.parquet') GROUP BY ALL HAVING n > 1").fetchall()
    assert set(labels.values()) <= {1} and stats == [], (labels, stats)
    return labels


@pytest.mark.parametrize("where", ["local", "s3"])
def test_streamed_listing_equals_the_driver_listing(ray_session, tmp_path, request, where):
    root = _root(where, tmp_path, request, "photos")
    names = ["top.jpg", "a/one.png", "a/b/two.JPG", "a/b/c/three.webp", "d/four.jpeg", "notes.txt",
             "out/labels/x.png", "out/previews/run_date=1/p.png", "e/deep/deeper/five.bmp"]
    write_files(root, {n: b"x" * (i + 1) for i, n in enumerate(names)})
    images = Location.of(root)
    own = (images.child("out", "labels").uri + "/", images.child("out", "previews").uri + "/")
    rows = listing_dataset(plan_listing(images, False), exclude=own).take_all()
    expected = [f for f in list_images(root) if not f.uri.startswith(own)]
    assert sorted((r["image_uri"], r["image_version"], r["image_size"]) for r in rows) == \
        sorted((f.uri, f.version, f.size) for f in expected)
    assert len(rows) == 6


def _write_index(output: str, model_id: str, uris: list[str], version: str) -> None:
    table = pa.table({"image_uri": uris, "image_version": [version] * len(uris)}, schema=INDEX_SCHEMA)
    storage_util.write_bytes(storage.join(output, final_name(INDEX, "", "earlier-000001", model_id)), parquet_bytes(table))


def test_manifest_of_10k_rows_skips_through_the_index(ray_session, tiny_checkpoint, tmp_path):
    """A 10,000-row Parquet manifest (two files, S3 Inventory's columns, relative URIs in one) of which 9,990
    images are in the index: the anti-join drops them, the 10 new ones are labeled by Ray workers, and no label
    map reaches the driver. Non-images, delete markers and non-current versions are not listed."""
    ck, model_id = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    new = {f"new/{i:02d}.png": good_image(i, 20 + i, 18) for i in range(10)}
    write_files(images, new)
    old = [f"{images}/old/{i:05d}.jpg" for i in range(9990)]
    uris = old + [f"{images}/{n}" for n in new]
    versions = ["v1"] * len(old) + [storage.local_version(u) for u in uris[len(old):]]
    manifest = pa.table({
        "uri": uris + [f"{images}/readme.txt", f"{images}/deleted.jpg", f"{images}/new/00.png"],
        "size": [100] * len(old) + [os.path.getsize(u) for u in uris[len(old):]] + [5, 5, 5],
        "e_tag": versions + ["t", "d", "stale"],
        "is_latest": [True] * (len(uris) + 2) + [False],
        "is_delete_marker": [False] * (len(uris) + 1) + [True, False],
    })
    # A prefix of two manifest files; the second names its images relative to its own folder.
    os.makedirs(tmp_path / "listing")
    pq.write_table(manifest.slice(0, 6000), str(tmp_path / "listing" / "part-0.parquet"))
    rest = manifest.slice(6000)
    relative = [os.path.relpath(u, tmp_path / "listing") for u in rest["uri"].to_pylist()]
    pq.write_table(rest.set_column(0, "uri", pa.array(relative)), str(tmp_path / "listing" / "part-1.parquet"))
    _write_index(output, model_id, old, "v1")

    summary = label_images(_config(str(tmp_path / "listing"), ck, output, manifest=True))
    assert (summary["listed"], summary["skipped"], summary["labelled"], summary["errors"]) == (10_000, 9_990, 10, 0)
    labels = _exactly_once(output)
    assert sorted(labels) == sorted(uris[len(old):])
    label_map_bytes = sum(len(b) for b in read_table(Location.of(output), "labels")["label_map"].to_pylist())
    assert 0 < summary["driver_bytes"] < label_map_bytes  # the driver got file-set metadata, never the maps
    index = read_table(Location.of(output), INDEX)
    assert index.num_rows == 10_000 and len(set(index["image_uri"].to_pylist())) == 10_000


def test_s3_inventory_names_images_as_the_prefix_listing_does(ray_session, tiny_checkpoint, bucket, s3):
    """Labeled by prefix one night, listed by an S3 Inventory the next (manifest.json naming a header-less,
    gzipped CSV with URL-encoded keys): the same images are skipped, the new ones labeled."""
    import gzip

    ck, _ = tiny_checkpoint
    images, output = f"{bucket}/photos", f"{bucket}/out"
    write_files(images, {f"{i}.png": good_image(i, 16, 16 + i) for i in range(3)})
    first = label_images(_config(images, ck, output))
    assert first["labelled"] == 3
    write_files(images, {"new dir/3.png": good_image(3, 16, 20), "4.png": good_image(4, 17, 20)})
    s3.invalidate_cache()
    lines = []
    for key in ("0.png", "1.png", "2.png", "new dir/3.png", "4.png", "notes.txt"):
        info = s3.info(f"test-bucket/photos/{key}") if key != "notes.txt" else {"size": 1, "ETag": '"x"'}
        lines.append(f'"test-bucket","{quote_plus("photos/" + key, safe="/")}","{info["size"]}",'
                     f'"{info["ETag"].strip(chr(34))}","true"')
    storage_util.write_bytes(f"{bucket}/inventory/data/a1.csv.gz", gzip.compress("\n".join(lines).encode()))
    manifest = {"sourceBucket": "test-bucket", "destinationBucket": "arn:aws:s3:::test-bucket", "fileFormat": "CSV",
                "fileSchema": "Bucket, Key, Size, ETag, IsLatest",
                "files": [{"key": "inventory/data/a1.csv.gz", "size": 1, "MD5checksum": "x"}]}
    storage_util.write_bytes(f"{bucket}/inventory/manifest.json", json.dumps(manifest).encode())

    second = label_images(_config(f"{bucket}/inventory/manifest.json", ck, output))
    assert (second["listed"], second["skipped"], second["labelled"], second["errors"]) == (5, 3, 2, 0)
    assert f"{images}/new dir/3.png" in _exactly_once(output)


def test_an_object_written_after_its_prefix_was_listed_is_read_whole(bucket, s3):
    """A worker process outlives a run: an object its filesystem did not see when it listed the prefix (written,
    or rewritten larger, since) is read whole, not taken from that listing as missing or short."""
    storage_util.write_bytes(f"{bucket}/photos/old.png", b"x" * 10)
    photos = Location.of(f"{bucket}/photos")
    assert [f.size for f in photos.list_files()] == [10]  # this process's filesystem now holds the listing
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another client, as the test's writer is
    other.pipe_file("test-bucket/photos/new.png", b"n" * 30)
    other.pipe_file("test-bucket/photos/old.png", b"y" * 20)
    assert photos.read_listed(photos.path + "/new.png", max_bytes=100) == b"n" * 30
    assert photos.read_listed(photos.path + "/old.png", max_bytes=100) == b"y" * 20
    other.pipe_file("test-bucket/photos/empty.png", b"")
    assert photos.read_listed(photos.path + "/empty.png", max_bytes=100) == b""
    with pytest.raises(UnreadableFile, match="limit"):
        photos.read_listed(photos.path + "/new.png", max_bytes=29)
    with pytest.raises(FileNotFoundError):
        photos.read_listed(photos.path + "/gone.png", max_bytes=100)


def test_manifest_without_a_version_column_is_one_line(tiny_checkpoint, tmp_path, capsys):
    from tests.label_fixtures import run_label_cli

    pq.write_table(pa.table({"uri": ["/x/a.jpg"], "size": [3]}), str(tmp_path / "m.parquet"))
    code, _, err = run_label_cli(["--images", str(tmp_path / "m.parquet"), "--checkpoint", tiny_checkpoint[0],
                                  "--output", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: manifest ") and "version column" in err


def test_output_without_an_index_gets_one_built_once(ray_session, tiny_checkpoint, tmp_path):
    ck, model_id = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    write_files(images, {f"{i}.png": good_image(i, 16, 16) for i in range(5)})
    assert label_images(_config(images, ck, output))["labelled"] == 5
    storage.Location.of(output).fs.rm(os.path.join(output, INDEX), recursive=True)  # as written before the index

    again = label_images(_config(images, ck, output))
    assert (again["skipped"], again["labelled"]) == (5, 0)
    index = read_table(Location.of(output), INDEX)
    assert sorted(index["image_uri"].to_pylist()) == sorted(f"{images}/{i}.png" for i in range(5))
    assert os.path.exists(os.path.join(output, INDEX, "_complete.json"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_writer_killed_mid_fileset_is_exactly_once(ray_session, tiny_checkpoint, tmp_path, request, monkeypatch, where):
    """A write task's process dies after staging its block's results: Ray retries the task under a new file-set
    name; the orphaned results file is never committed, and the next run discards it."""
    ck, _ = tiny_checkpoint
    images, output = _root(where, tmp_path, request, "imgs"), _root(where, tmp_path, request, "out")
    write_files(images, {f"{i:02d}.png": good_image(i, 16, 16 + i % 3) for i in range(6)})
    monkeypatch.setenv(faults.ENV, f"label.stage:results=kill_once:{tmp_path / 'killed'}")
    summary = label_images(_config(images, ck, output))
    monkeypatch.delenv(faults.ENV)
    assert os.path.exists(tmp_path / "killed")
    assert (summary["labelled"], summary["errors"]) == (6, 0)
    assert len(_exactly_once(output)) == 6

    out = Location.of(output)
    out.fs.invalidate_cache()
    assert out.fs.exists(out.child("_staging").path)  # the killed writer's half file set, uncommitted
    rerun = label_images(_config(images, ck, output))
    assert rerun["recovered"] == {"rolled_forward": 0, "discarded": 1}
    assert (rerun["skipped"], rerun["labelled"]) == (6, 0)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_second_run_on_one_output_is_refused_and_a_retry_with_the_same_run_id_keeps_everything(
        ray_session, tiny_checkpoint, tmp_path, request, monkeypatch, where):
    """A run holds the output (here in a thread of this process, slowed down at its commit); `jobs/label.py` on
    the same output, a real second process, exits 2 naming it. The run ends well, and so does the next one, an
    orchestrator's retry with the same --run-id: it keeps every file the first attempt committed."""
    ck, _ = tiny_checkpoint
    images, output = _root(where, tmp_path, request, "imgs"), _root(where, tmp_path, request, "out")
    write_files(images, {f"{i}.png": good_image(i, 16, 16) for i in range(4)})
    go = tmp_path / "second-run-done"  # the first run holds the lease, at its first commit, until then
    monkeypatch.setenv(faults.ENV, f"label.commit:committed=wait_for:{go}")
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(label_images(_config(images, ck, output,
                                                                                 run_id="nightly-0501"))))
    thread.start()
    try:
        lease = Location.of(output).child("_lease.json")
        deadline = time.monotonic() + 60
        while not lease.exists() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.1)
        assert lease.exists()
        second = run_subprocess("label", ["--images", images, "--checkpoint", ck, "--output", output],
                                env={faults.ENV: ""}, timeout=120)
    finally:
        go.touch()
        thread.join(timeout=300)
    monkeypatch.delenv(faults.ENV)
    assert not thread.is_alive()
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert "is in use by labeling run nightly-0501" in line and "which has held it for" in line, line
    assert first["labelled"] == 4 and not lease.exists()
    published = sorted(p for p in Location.of(output).fs.find(Location.of(output).path) if p.endswith(".parquet"))

    write_files(images, {f"{i}.png": good_image(i, 16, 16) for i in range(4, 6)})
    retry = label_images(_config(images, ck, output, run_id="nightly-0501"))
    assert (retry["skipped"], retry["labelled"], retry["errors"]) == (4, 2, 0)
    assert retry["recovered"] == {"rolled_forward": 0, "discarded": 0}
    out = Location.of(output)
    out.fs.invalidate_cache()
    assert set(published) <= set(out.fs.find(out.path))  # the first attempt's files, all still there
    labels = _exactly_once(output)
    assert len(labels) == 6 and set(tables(output)["labels"]["run_id"].to_pylist()) == {"nightly-0501"}
    records = sorted(p.rsplit("/", 1)[-1] for p in out.fs.ls(out.child("runs").path))
    assert len(records) == 2 and "nightly-0501.json" in records
    counts = sorted(json.loads(out.child("runs", r).read_text())["counts"]["labelled"] for r in records)
    assert counts == [2, 4]
