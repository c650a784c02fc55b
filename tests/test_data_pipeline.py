"""Ray Data training/validation pipelines: every good row arrives, every bad one is reported by URI."""
import numpy as np
import pytest

from pipeline import storage
from pipeline.dataset_formats import list_samples
from pipeline.storage import Location
from pipeline.train.inputs import BadSampleLog, segmentation_dataset, unpack_whole
from pipeline.train.transforms import TrainTransform
from tests import storage_util
from tests.images import broken_files, encode, gradient_rgb, palette_mask, write_voc

GOOD = [f"g{i:02d}" for i in range(14)]
BAD = ["bad_trunc", "bad_zero", "bad_text", "bad_bomb", "bad_size", "bad_values", "bad_missing"]


def _write_dataset(root):
    ids = GOOD[:7] + BAD + GOOD[7:]  # bad rows sit between good ones, in the same blocks
    write_voc(root, {"train": ids})
    broken = broken_files()
    j = storage.join
    storage_util.write_bytes(j(root, "JPEGImages", "bad_trunc.jpg"), broken["truncated.jpg"])
    storage_util.write_bytes(j(root, "JPEGImages", "bad_zero.jpg"), broken["zero.jpg"])
    storage_util.write_bytes(j(root, "JPEGImages", "bad_text.jpg"), broken["notes.jpg"])
    storage_util.write_bytes(j(root, "JPEGImages", "bad_bomb.jpg"), broken["bomb.png"])
    storage_util.write_bytes(j(root, "SegmentationClass", "bad_size.png"), palette_mask(np.zeros((5, 5), np.uint8)))
    storage_util.write_bytes(j(root, "SegmentationClass", "bad_values.png"), palette_mask(np.full((24, 32), 9, np.uint8)))
    storage_util.write_bytes(j(root, "JPEGImages", "bad_values.jpg"), encode(gradient_rgb(24, 32), "JPEG"))
    fs, path = storage_util.filesystem(j(root, "SegmentationClass", "bad_missing.png"))
    fs.rm(path)
    return list_samples(Location.of(root), "train")


EXPECTED_REASONS = {
    "bad_trunc": "image: truncated or corrupt", "bad_zero": "image: empty file", "bad_text": "image: not a recognised",
    "bad_bomb": "MP limit", "bad_size": "size mismatch", "bad_values": "outside classes 0..3",
    "bad_missing": "mask: mask not found",
}


def _check_bad(log, root):
    rows = {r["uri"].rsplit("/", 1)[-1][:-4]: r for r in __import__("ray").get(log.rows.remote())}
    assert sorted(rows) == sorted(BAD)
    for name, reason in EXPECTED_REASONS.items():
        assert reason in rows[name]["reason"], (name, rows[name]["reason"])
        assert rows[name]["uri"] == storage.join(root, "JPEGImages", f"{name}.jpg")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_training_pipeline_keeps_every_good_row(ray_session, tmp_path, where, request):
    if where == "s3":
        request.getfixturevalue("bucket")
        root = "s3://test-bucket/voc"
    else:
        root = str(tmp_path / "voc")
    samples = _write_dataset(root)
    log = BadSampleLog.remote()
    ds = segmentation_dataset(samples, num_classes=4, transform=TrainTransform(crop_size=16), bad_log=log,
                              rows_per_task=4, max_pixels=1_000_000)
    seen = 0
    for batch in ds.iter_batches(batch_size=5, batch_format="numpy"):
        assert batch["image"].shape[1:] == (16, 16, 3) and batch["image"].dtype == np.uint8
        assert batch["mask"].shape[1:] == (16, 16)
        assert set(np.unique(batch["mask"])) <= {0, 1, 2, 3, 255}
        seen += len(batch["image"])
    assert seen == len(GOOD)
    _check_bad(log, root)


def test_validation_pipeline_whole_images_and_torch_shards(ray_session, tmp_path):
    root = str(tmp_path / "voc")
    samples = _write_dataset(root)
    log = BadSampleLog.remote()
    ds = segmentation_dataset(samples, num_classes=4, bad_log=log, rows_per_task=3)
    rows = list(ds.iter_rows())
    assert sorted(r["uri"].rsplit("/", 1)[-1] for r in rows) == sorted(f"{g}.jpg" for g in GOOD)
    for r in rows:
        image, mask = unpack_whole(r)
        assert image.shape == (r["height"], r["width"], 3) and mask.shape == (r["height"], r["width"])
    # Native sizes vary (write_voc varies them) and survive untouched.
    assert len({(r["height"], r["width"]) for r in rows}) > 1
    _check_bad(log, root)
    # Two shards, as Ray Train hands them to two workers: disjoint, together complete.
    shards = ds.streaming_split(2, equal=False)
    import ray

    @ray.remote(num_cpus=0)  # consumers hold no CPU, as Train workers leave CPUs to Ray Data here
    def consume(it):
        return [r["uri"] for r in it.iter_rows()]

    parts = ray.get([consume.remote(s) for s in shards])
    assert sorted(parts[0] + parts[1]) == sorted(r["uri"] for r in rows)
