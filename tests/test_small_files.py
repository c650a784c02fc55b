"""Fewer, larger files for the small tables: class_stats, errors and index rows of several file sets share one file
per table, committed with the sets' labels files by one marker; every image stays exactly once, also when the
merging worker dies."""
from __future__ import annotations

import json
import os

import pytest

from pipeline import faults, storage
from pipeline.label.config import LabelConfig
from pipeline.label.job import label_images
from pipeline.label.readers import list_table_files, read_table
from pipeline.label.tables import INDEX
from pipeline.storage import Location
from tests.label_fixtures import good_image, tables, write_files


def _config(images: str, checkpoint: str, output: str, **kw) -> LabelConfig:
    base = dict(max_side=32, batch_size=2, rows_per_file=2, rows_per_read_task=2, images_per_small_file=6,
                progress=False, actors=1, threads_per_actor=1, cpus_per_actor=1.0)
    return LabelConfig(images=images, checkpoint=checkpoint, output=output, **{**base, **kw})


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
    record = json.loads(storage.read_text(storage.join(output, "runs", f"{summary['run_id']}.json")))
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
