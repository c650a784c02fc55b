"""Fewer, larger files for the small tables: class_stats, errors and index rows of several file sets share one file
per table, committed with the sets' labels files by one marker; every image stays exactly once, also when the
merging worker dies."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from functools import partial

import pyarrow.parquet as pq
import pytest

from pipeline import faults, storage
from pipeline.label.job import label_images
from pipeline.label.readers import list_table_files, read_table
from pipeline.label.tables import INDEX
from pipeline.storage import Location
from tests import storage_util
from tests.label_fixtures import good_image, label_config, tables, write_files

# Groups of 6 images' small rows per file, file sets of 2 rows: a dozen images make several of each.
_config = partial(label_config, max_side=32, batch_size=2, rows_per_file=2, rows_per_read_task=2, images_per_small_file=6)


def _files(output: str) -> dict[str, list[str]]:
    out = Location.of(output)
    return {t: list_table_files(out, t) for t in ("labels", "class_stats", "errors", INDEX)}


def _exactly_once(output: str, images: list[str]) -> None:
    t = tables(output)
    uris = t["labels"]["image_uri"].to_pylist()
    assert sorted(uris) == sorted(images)
    stats = list(zip(t["class_stats"]["image_uri"].to_pylist(), t["class_stats"]["class_id"].to_pylist(), strict=True))
    assert len(stats) == len(set(stats)) and {u for u, _ in stats} == set(uris)
    keys = read_table(Location.of(output), INDEX)["image_uri"].to_pylist()
    assert sorted(keys) == sorted(uris)


@pytest.mark.parametrize("fault", ["label.group:merged=kill_once:{marker}"])
def test_small_tables_get_one_file_per_group_of_file_sets(ray_session, tiny_checkpoint, tmp_path, monkeypatch, fault):
    """12 images in file sets of 2, small-table files of 6 images; the worker merging the first group dies after
    writing the merged files: Ray merges again, the orphaned group is never committed, and the next run drops it."""
    ck, _ = tiny_checkpoint
    images, output = str(tmp_path / "imgs"), str(tmp_path / "out")
    good = {f"{i:02d}.png": good_image(i, 16 + i % 3, 18) for i in range(11)}
    write_files(images, {**good, "05x.png": b"not an image"})
    if fault:
        monkeypatch.setenv(faults.ENV, fault.format(marker=tmp_path / "killed"))
    summary = label_images(_config(images, ck, output))
    monkeypatch.delenv(faults.ENV, raising=False)
    assert (summary["labelled"], summary["errors"]) == (11, 1)
    if fault:
        assert os.path.exists(tmp_path / "killed")  # a merging worker died; Ray ran the merge again
    _exactly_once(output, [storage.join(images, n) for n in good])

    files = _files(output)
    sets = len(files["labels"])  # one labels file per file set of --rows-per-file images
    assert sets >= 6
    for table in ("class_stats", INDEX):
        assert len(files[table]) <= -(-12 // 6), (table, files[table])  # 12 images, 6 per file
    assert len(files["errors"]) == 1
    record = json.loads(storage_util.read_text(storage.join(output, "runs", f"{summary['run_id']}.json")))
    assert record["files"] == {t: len(files[t]) for t in ("labels", "class_stats", "errors")}
    out = Location.of(output)
    leftover = out.fs.find(out.child("_staging").path) if out.child("_staging").exists() else []
    # Only the killed merge's group, never committed (the next run drops it): the merged sets' own staging is gone.
    folders = {p.split("/_staging/")[1].split("/")[0] for p in leftover}
    assert len(folders) == 1 and folders.pop().startswith(f"{summary['run_id']}-g"), leftover

    again = label_images(_config(images, ck, output))
    assert (again["skipped"], again["labelled"]) == (11, 0)
    assert again["recovered"]["rolled_forward"] == 0 and again["recovered"]["discarded"] == (1 if fault else 0)
    _exactly_once(output, [storage.join(images, n) for n in good])
    assert not out.fs.exists(out.child("_commits").path) or not out.fs.ls(out.child("_commits").path)


def _staged_blocks(output: Location, settings, blocks: list[list[tuple[str, str, object]]]):
    """Each block of result rows staged as the pipeline's write tasks stage them."""
    import pyarrow as pa

    from pipeline.label.writer import stage_results
    from tests.query_output import results

    at = datetime(2026, 3, 1, tzinfo=timezone.utc)
    return pa.concat_tables([stage_results(results(block, at, "raw"), settings=settings) for block in blocks])


def test_a_group_streams_its_label_maps_into_files_of_bounded_rows_and_bytes(tmp_path):
    """The merge of a group's staged blocks (in this process, as its Ray task runs it): labels files of at most
    --rows-per-file rows that end before their label maps pass bytes_per_file (at least one row each, so an image
    larger than the cap gets a file of its own), every row once and in order, one file per small table; and the
    marker names the blocks it was made of."""
    from pipeline.label.filesets import merge_staged
    from pipeline.label.writer import OutputSettings
    from tests.label_fixtures import CLASS_NAMES
    from tests.query_output import label_map

    output = Location.of(str(tmp_path / "out"))
    sizes = [(8, 10)] * 5 + [(40, 40)] + [(8, 10)] * 6 + [(12, 10)]  # 80-byte maps, one of 1,600, one of 120
    images = [(f"s3://b/{i:02d}.png", "v1", label_map(i, h, w)) for i, (h, w) in enumerate(sizes)]
    images.insert(3, ("s3://b/broken.png", "v1", "cannot identify image file"))
    settings = OutputSettings(output, "run-1", "2026-03-01", "model-a", tuple(CLASS_NAMES), bytes_per_file=250,
                              rows_per_file=3)
    staged = _staged_blocks(output, settings, [images[0:4], images[4:9], images[9:]])
    group = merge_staged(staged, settings=settings)
    marker = json.loads(group["marker"][0].as_py())
    assert (group["labeled"][0].as_py(), group["errors"][0].as_py()) == (13, 1)
    assert marker["members"] == [json.loads(m)["fileset"] for m in staged["marker"].to_pylist()]
    labels = [e for e in marker["files"] if e["table"] == "labels"]
    rows_per_file = [pq.read_table(output.child(e["src"]).path).num_rows for e in labels]
    # 80-byte maps: 3 a file (240 <= 250); the 1,600-byte map ends the file before it and fills one alone.
    assert rows_per_file == [e["rows"] for e in labels] == [3, 2, 1, 3, 3, 1], rows_per_file
    uris = [u for e in labels for u in pq.read_table(output.child(e["src"]).path)["image_uri"].to_pylist()]
    assert uris == [u for u, _, m in images if not isinstance(m, str)]
    assert len({e["dst"] for e in labels}) == len(labels)
    for table in ("class_stats", "errors", INDEX):
        assert [e["table"] for e in marker["files"]].count(table) == 1, table
