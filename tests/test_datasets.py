"""Dataset formats (VOC, manifests, image collections), locally and on the S3 test server, and storage errors."""
import io
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.dataset_formats import DatasetError, list_images, list_samples, read_class_names
from pipeline.storage import Location, StorageError
from tests import storage_util
from tests.images import encode, gradient_rgb, write_voc

SPLITS = {"train": ["a1", "a2", "a3"], "val": ["b1", "b2"]}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "voc")
    request.getfixturevalue("bucket")
    return "s3://test-bucket/datasets/voc"


def test_voc_layout(root):
    write_voc(root, SPLITS)
    train = list_samples(Location.of(root), "train")
    assert [os.path.basename(s["image"]) for s in train] == ["a1.jpg", "a2.jpg", "a3.jpg"]
    assert train[0]["mask"].endswith("SegmentationClass/a1.png")
    assert all(storage_util.read_bytes(s["mask"]) for s in train)
    assert len(list_samples(Location.of(root), "val")) == 2
    with pytest.raises(DatasetError, match="test.txt"):
        list_samples(Location.of(root), "test")


def test_file_uri_is_a_local_path(tmp_path):
    write_voc(str(tmp_path / "voc"), SPLITS)
    assert len(list_samples(Location.of(f"file://{tmp_path}/voc"), "train")) == 3


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_relative_and_absolute(root, fmt):
    write_voc(root, SPLITS)
    absolute_image = storage.join(root, "JPEGImages", "b1.jpg")
    table = pa.table({
        "image": ["JPEGImages/a1.jpg", "JPEGImages/a2.jpg", absolute_image],
        "mask": ["SegmentationClass/a1.png", "SegmentationClass/a2.png", storage.join(root, "SegmentationClass", "b1.png")],
        "split": ["train", "train", "val"],
    })
    buf = io.BytesIO()
    if fmt == "csv":
        import pyarrow.csv as pacsv
        pacsv.write_csv(table, buf)
    else:
        pq.write_table(table, buf)
    manifest = Location.of(storage.join(root, f"manifest.{fmt}"))
    manifest.write_bytes(buf.getvalue())
    train = list_samples(manifest, "train")
    assert [s["image"] for s in train] == [storage.join(root, "JPEGImages", f"a{i}.jpg") for i in (1, 2)]
    assert list_samples(manifest, "val") == [{"image": absolute_image, "mask": storage.join(root, "SegmentationClass", "b1.png")}]


def test_manifest_errors(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("img,label\nx.jpg,x.png\n")
    with pytest.raises(DatasetError, match="lacks column"):
        list_samples(Location.of(str(bad)), "train")
    empty = tmp_path / "e.csv"
    empty.write_text("image,mask,split\nx.jpg,x.png,val\n")
    with pytest.raises(DatasetError, match="no samples"):
        list_samples(Location.of(str(empty)), "train")
    with pytest.raises(StorageError, match="manifest not found"):
        list_samples(Location.of(str(tmp_path / "nope.csv")), "train")


def test_class_names_file(tmp_path):
    root = str(tmp_path / "voc")
    write_voc(root, SPLITS)
    assert read_class_names(Location.of(root)) is None
    storage_util.write_text(storage.join(root, "classes.txt"), "background\ncat\n")
    assert read_class_names(Location.of(root)) == ["background", "cat"]


def test_image_collection_recursive_with_versions(root):
    jpg = encode(gradient_rgb(8, 8), "JPEG")
    names = ["x.jpg", "sub/y.JPEG", "sub/deeper/z.png", "w.Tif", "v.webp", "u.bmp", "t.tiff", "notes.txt", "sub/readme.md"]
    for n in names:
        storage_util.write_bytes(storage.join(root, n), jpg)
    found = list_images(root)
    rel = sorted(f.uri[len(root) + 1:] for f in found)
    assert rel == sorted(n for n in names if not n.endswith((".txt", ".md")))
    assert all(f.size == len(jpg) and f.version for f in found)
    before = {f.uri: f.version for f in found}
    time.sleep(0.01)
    storage_util.write_bytes(storage.join(root, "x.jpg"), encode(gradient_rgb(9, 9), "JPEG"))
    after = {f.uri: f.version for f in list_images(root)}
    changed = [u for u in after if after[u] != before[u]]
    assert changed == [storage.join(root, "x.jpg")]


def test_s3_directory_markers_are_not_files(bucket, s3):
    s3.pipe("test-bucket/imgs/", b"")  # an empty "directory" key, as some writers leave
    storage_util.write_bytes("s3://test-bucket/imgs/a.jpg", encode(gradient_rgb(8, 8), "JPEG"))
    assert [f.uri for f in list_images("s3://test-bucket/imgs")] == ["s3://test-bucket/imgs/a.jpg"]


def test_missing_prefix_bucket_and_directory(bucket, tmp_path):
    with pytest.raises(StorageError, match=r"prefix not found: s3://test-bucket/nothing-here"):
        list_images("s3://test-bucket/nothing-here")
    with pytest.raises(StorageError, match=r"bucket does not exist: s3://no-such-bucket"):
        list_images("s3://no-such-bucket/images")
    with pytest.raises(StorageError, match="dataset not found: s3://no-such-bucket/voc|bucket does not exist"):
        list_samples(Location.of("s3://no-such-bucket/voc"), "train")
    with pytest.raises(StorageError, match=f"directory not found: {tmp_path}/missing"):
        list_images(str(tmp_path / "missing"))


def test_unreachable_endpoint_is_one_clear_line(s3_server, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(StorageError) as e:
            list_images("s3://test-bucket/images")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    msg = str(e.value)
    assert "cannot reach the storage endpoint (http://127.0.0.1:9)" in msg and "s3://test-bucket/images" in msg
    assert "\n" not in msg and os.environ["AWS_SECRET_ACCESS_KEY"] not in msg


def test_write_check(bucket, tmp_path):
    storage_util.check_writable("s3://test-bucket/out")
    storage_util.check_writable(str(tmp_path / "new" / "dir"))
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage_util.check_writable("s3://no-such-bucket/out")
    blocker = tmp_path / "file"  # a file where a directory is needed: not writable, even for root
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        storage_util.check_writable(str(blocker / "sub"))


def test_redact_removes_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretValue123")
    assert "SuperSecretValue123" not in storage.redact("failed with key SuperSecretValue123")
    assert storage.redact("https://x/?X-Amz-Signature=abcdef&y=1") == "https://x/?X-Amz-Signature=***&y=1"
