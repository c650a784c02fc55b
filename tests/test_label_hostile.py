"""Hostile inputs and operator mistakes, met the way a user meets them: jobs/label.py on real files (FIFOs,
symlinks, odd names, float TIFFs, PostScript, presigned URLs on a real HTTP server, malformed names)."""
from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from models import load_checkpoint
from pipeline import storage
from pipeline.decode import decode_image
from pipeline.label.commit import STALE_TEMPORARY_SECONDS
from pipeline.label.inference import predict_image
from tests.images import encode, gradient_rgb
from tests.label_fixtures import FAST_FLAGS, good_image, label_summary, run_label_cli, tables, write_files


def _tiff(arr: np.ndarray, mode: str) -> bytes:
    return encode(Image.fromarray(arr, mode), "TIFF")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"


def test_hostile_files_each_get_an_error_row_or_a_correct_label(ray_session, tiny_checkpoint, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    images = tmp_path / "imgs"
    write_files(str(images), {
        "cat": good_image(1, 30, 20),                # no image extension: never listed
        "cat::2.png": good_image(2, 25, 17),         # '::' is a chained-URL separator to fsspec's URL parser
        "float01.tif": _tiff(np.full((12, 14), 0.8, np.float32), "F"),
        "float255.tif": _tiff(np.full((12, 14), 100.0, np.float32), "F"),
        "floatbad.tif": _tiff(np.linspace(-5, 900, 12 * 14, dtype=np.float32).reshape(12, 14), "F"),
        "int32.tif": _tiff(np.full((13, 11), 200, np.int32), "I"),
        "postscript.jpg": EPS,                       # must never reach Ghostscript
        "big.png": encode(gradient_rgb(64, 64), "PNG"),
    })
    os.mkfifo(images / "fifo.png")                   # hung the job: a reader blocks until a writer comes
    os.symlink("/dev/zero", images / "zero.jpg")     # was read until memory ran out
    big = os.path.getsize(images / "big.png")
    assert big > 2000

    summary = label_summary(capsys, images, ck_path, tmp_path / "out", "--max-bytes", "2000")
    t = tables(str(tmp_path / "out"))
    errors = {os.path.basename(e["image_uri"]): e for e in t["errors"].to_pylist()}
    labels = {os.path.basename(r["image_uri"]): r for r in t["labels"].to_pylist()}
    assert set(labels) == {"cat::2.png", "float01.tif", "float255.tif", "int32.tif"}
    assert set(errors) == {"floatbad.tif", "postscript.jpg", "big.png", "fifo.png", "zero.jpg"}
    assert (summary["labelled"], summary["errors"]) == (4, 5)

    assert "not a regular file (FIFO)" in errors["fifo.png"]["error"] and errors["fifo.png"]["stage"] == "read"
    assert "not a regular file (character device)" in errors["zero.jpg"]["error"]
    assert "--max-bytes" in errors["big.png"]["error"]
    assert errors["postscript.jpg"]["error"] == "not a recognised image format"
    assert "float image values range -5..900" in errors["floatbad.tif"]["error"]

    # cat::2.png is itself (25x17), not the file "cat" (30x20).
    assert (labels["cat::2.png"]["height"], labels["cat::2.png"]["width"]) == (25, 17)
    # Float 0..1 and 0..255 and 32-bit integer images are labelled as the grey they hold, not near-black.
    ck = load_checkpoint(ck_path)
    for name, grey in (("float01.tif", 204), ("float255.tif", 100), ("int32.tif", 200)):
        row = labels[name]
        rgb = np.full((row["height"], row["width"], 3), grey, np.uint8)
        expected = predict_image(ck, None, rgb, max_side=48, batch_size=1).label
        np.testing.assert_array_equal(np.frombuffer(row["label_map"], np.uint8).reshape(expected.shape), expected,
                                      err_msg=name)


def test_decode_scales_float_and_32_bit_images():
    assert decode_image(_tiff(np.full((3, 4), 0.8, np.float32), "F"))[0, 0].tolist() == [204] * 3
    assert decode_image(_tiff(np.full((3, 4), 100.0, np.float32), "F"))[0, 0].tolist() == [100] * 3
    assert decode_image(_tiff(np.full((3, 4), 200, np.int32), "I"))[0, 0].tolist() == [200] * 3
    assert decode_image(_tiff(np.full((3, 4), 40000, np.int32), "I"))[0, 0].tolist() == [40000 >> 8] * 3
    with pytest.raises(ValueError, match="values range 0..70000"):
        decode_image(_tiff(np.array([[0, 70000]], np.int32), "I"))


def test_reads_stop_one_byte_past_the_limit(tmp_path):
    """A file that grew after it was listed (the listing's size said it was small) is not read whole."""
    path = tmp_path / "grown.png"
    path.write_bytes(b"x" * 5000)
    folder = storage.Location.of(str(tmp_path))
    with pytest.raises(storage.UnreadableFile, match="limit"):
        folder.read_listed(str(path), max_bytes=100)
    assert folder.read_listed(str(path), max_bytes=5000) == b"x" * 5000


def test_s3_key_with_double_colon_is_read_as_itself(ray_session, tiny_checkpoint, bucket, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    write_files(f"{bucket}/imgs", {"cat.png": good_image(1, 30, 20), "cat.png::2.png": good_image(2, 25, 17)})
    label_summary(capsys, f"{bucket}/imgs", ck_path, tmp_path / "out")
    sizes = {os.path.basename(r["image_uri"]): (r["height"], r["width"]) for r in tables(str(tmp_path / "out"))["labels"].to_pylist()}
    assert sizes == {"cat.png": (30, 20), "cat.png::2.png": (25, 17)}


def test_a_file_alone_then_its_folder_is_labelled_once(ray_session, tiny_checkpoint, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 20, 22), "b.png": good_image(2, 21, 23)})
    first = label_summary(capsys, tmp_path / "imgs" / "a.png", ck_path, tmp_path / "out")
    second = label_summary(capsys, tmp_path / "imgs", ck_path, tmp_path / "out")
    assert (first["labelled"], second["skipped"], second["labelled"]) == (1, 1, 1)


def test_images_stored_under_the_output_root_are_labelled(ray_session, tiny_checkpoint, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    out = tmp_path / "out"
    write_files(str(out / "photos"), {"a.png": good_image(1, 20, 22), "b.png": good_image(2, 21, 23)})
    first = label_summary(capsys, out, ck_path, out, "--previews", "2")
    assert (first["listed"], first["labelled"], first["previews"]) == (2, 2, 2)
    again = label_summary(capsys, out, ck_path, out)  # its own previews, tables and runs are never listed
    assert (again["listed"], again["skipped"], again["labelled"]) == (2, 2, 0)


def test_class_names_that_do_not_match_the_model_fail_at_load(tiny_checkpoint, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    payload = torch.load(ck_path, weights_only=True)
    payload["class_names"] = payload["class_names"][:-1]
    bad = tmp_path / "five-names.pt"
    torch.save(payload, bad)
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 20, 22)})
    code, _, stderr = run_label_cli(["--images", str(tmp_path / "imgs"), "--checkpoint", str(bad), "--output",
                                     str(tmp_path / "out"), *FAST_FLAGS], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "names 5 classes but its model predicts 6" in lines[0], stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_presigned_checkpoint_url_leaves_no_signature_anywhere(ray_session, tiny_checkpoint, tmp_path, capsys,
                                                               http_server):
    ck_path, _ = tiny_checkpoint
    www, base = http_server
    (www / "fcn8s.pt").write_bytes(open(ck_path, "rb").read())
    url = f"{base}/fcn8s.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261126" \
          "&X-Amz-Signature=5ec7e75191a7b0a7&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN"
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 20, 22), "bad.jpg": b"junk"})
    code, stdout, stderr = run_label_cli(["--images", str(tmp_path / "imgs"), "--checkpoint", url,
                                          "--output", str(tmp_path / "out"), *FAST_FLAGS], capsys)
    assert code == 0, stderr[-2000:]
    assert json.loads(stdout.strip().splitlines()[-1])["labelled"] == 1
    secrets = ("5ec7e75191a7b0a7", "FwoGZXIvYXdzEXAMPLETOKEN", "AKIAEXAMPLE")
    written = [p for p in glob.glob(str(tmp_path / "out" / "**" / "*"), recursive=True) if os.path.isfile(p)]
    assert any(p.endswith(".json") for p in written)
    for text, where in [(stdout, "stdout"), (stderr, "stderr"),
                        *((open(p, "rb").read().decode("latin-1"), p) for p in written)]:
        assert not any(s in text for s in secrets), where
    record = json.loads(open(glob.glob(str(tmp_path / "out" / "runs" / "*.json"))[0]).read())
    assert record["arguments"]["checkpoint"].startswith(f"{base}/fcn8s.pt?") and "Signature=***" in record["arguments"]["checkpoint"]


@pytest.mark.parametrize("flag,value,message", [("--run-date", "2026-1-5", "zero-padded"),
                                                ("--run-id", "..", "must start with a letter or digit"),
                                                ("--run-id", "a/b", "must start with a letter or digit")])
def test_malformed_run_names_are_refused(tiny_checkpoint, tmp_path, capsys, flag, value, message):
    ck_path, _ = tiny_checkpoint
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 20, 22)})
    code, _, stderr = run_label_cli(["--images", str(tmp_path / "imgs"), "--checkpoint", ck_path, "--output",
                                     str(tmp_path / "out"), flag, value, *FAST_FLAGS], capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "previews").exists()


def test_temporaries_left_by_a_kill_are_removed_at_recovery(ray_session, tiny_checkpoint, tmp_path, capsys):
    ck_path, _ = tiny_checkpoint
    out = tmp_path / "out"
    write_files(str(tmp_path / "imgs"), {"a.png": good_image(1, 20, 22)})
    stale = [out / "_commits" / ".tmp-k1ll3d", out / "runs" / ".tmp-0ld"]
    fresh = out / "runs" / ".tmp-being-written"
    for path in [*stale, fresh]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{")
    old = time.time() - STALE_TEMPORARY_SECONDS - 60
    for path in stale:
        os.utime(path, (old, old))
    label_summary(capsys, tmp_path / "imgs", ck_path, out)
    assert not any(p.exists() for p in stale) and fresh.exists()
