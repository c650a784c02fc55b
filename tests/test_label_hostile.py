"""Hostile inputs and operator mistakes, met the way a user meets them: jobs/label.py on real files (FIFOs,
symlinks, odd names, names that are not UTF-8, glob characters, float TIFFs, PostScript, a presigned checkpoint URL
on a real HTTP server, S3 keys with '::' or an empty segment, malformed names).

Two scenarios, each one set of runs that the named tests below check facet by facet:
- local: one folder of every hostile case, labeled into itself (the output root holds the images); a file of it
  alone first, then the whole folder, then a rerun;
- S3: one prefix of every hostile key, and its rerun.
"""
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
from pipeline.lease import LEASE_FILE
from tests.conftest import reset_s3, serving
from tests.images import encode, gradient_rgb
from tests.label_fixtures import FAST_FLAGS, good_image, run_label_cli, run_label_job, tables, write_files


def _tiff(arr: np.ndarray, mode: str) -> bytes:
    return encode(Image.fromarray(arr, mode), "TIFF")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
SECRETS = ("5ec7e75191a7b0a7", "FwoGZXIvYXdzEXAMPLETOKEN", "AKIAEXAMPLE")
MAX_BYTES = 2000  # big.png is over it; every other image is under


def _run(argv: list[str]) -> dict:
    """One run of jobs/label.py in this process: its summary and what it printed."""
    code, stdout, stderr = run_label_job([*argv, *FAST_FLAGS])
    assert code == 0, stderr[-3000:]
    return {"summary": json.loads(stdout.strip().splitlines()[-1]), "stdout": stdout, "stderr": stderr}


# ------------------------------------------------------------------------------ the local scenario


@pytest.fixture(scope="module")
def local(ray_module, tiny_checkpoint, tmp_path_factory):
    """Every local hostile case in one folder, `seg[v2]`, which is also the output root (its own previews, tables and
    runs must never be listed): `alone/a.png` labeled alone first, then the whole folder with the checkpoint behind
    a presigned URL, --max-bytes and previews, then the same again. Temporaries a killed run left wait in the output."""
    ck_path, _ = tiny_checkpoint
    base = tmp_path_factory.mktemp("hostile")
    root = base / "seg[v2]"  # glob characters: `seg[v2]` also matches the decoy folder `segv`
    write_files(str(base / "segv"), {"decoy.png": good_image(3, 22, 24)})
    write_files(str(root / "alone"), {"a.png": good_image(1, 20, 22), "b.png": good_image(2, 21, 23)})
    hostile = root / "hostile"
    write_files(str(hostile), {
        "cat": good_image(1, 30, 20),                # no image extension: never listed
        "cat::2.png": good_image(2, 25, 17),         # '::' is a chained-URL separator to fsspec's URL parser
        "float01.tif": _tiff(np.full((12, 14), 0.8, np.float32), "F"),
        "float255.tif": _tiff(np.full((12, 14), 100.0, np.float32), "F"),
        "floatbad.tif": _tiff(np.linspace(-5, 900, 12 * 14, dtype=np.float32).reshape(12, 14), "F"),
        "int32.tif": _tiff(np.full((13, 11), 200, np.int32), "I"),
        "postscript.jpg": EPS,                       # must never reach Ghostscript
        "big.png": encode(gradient_rgb(64, 64), "PNG"),
    })
    os.mkfifo(hostile / "fifo.png")                  # hung the job: a reader blocks until a writer comes
    os.symlink("/dev/zero", hostile / "zero.jpg")    # was read until memory ran out
    assert os.path.getsize(hostile / "big.png") > MAX_BYTES
    names = root / "names"
    write_files(str(names), {f"g{i}.png": good_image(i, 20, 22) for i in range(4)})
    raw = os.fsencode(str(names))
    with open(raw + b"/caf\xe9.png", "wb") as f:       # latin-1 bytes: not a UTF-8 name
        f.write(good_image(7, 20, 22))
    os.mkdir(raw + b"/d\xe9j\xe0")                      # a folder whose name is not UTF-8, with an image inside
    with open(raw + b"/d\xe9j\xe0/x.png", "wb") as f:
        f.write(good_image(8, 20, 22))
    write_files(str(root / "im[1]"), {"a.png": good_image(4, 20, 22), "b*.png": good_image(5, 21, 23)})
    stale = [root / "_commits" / ".tmp-k1ll3d", root / "runs" / ".tmp-0ld"]
    fresh = root / "runs" / ".tmp-being-written"
    for path in [*stale, fresh]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{")
    old = time.time() - STALE_TEMPORARY_SECONDS - 60
    for path in stale:
        os.utime(path, (old, old))

    alone = _run(["--images", str(root / "alone" / "a.png"), "--checkpoint", ck_path, "--output", str(root)])
    www = base / "www"
    www.mkdir()
    (www / "fcn8s.pt").write_bytes(open(ck_path, "rb").read())
    with serving(www) as url:
        presigned = f"{url}/fcn8s.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261126" \
                    "&X-Amz-Signature=5ec7e75191a7b0a7&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN"
        argv = ["--images", str(root), "--checkpoint", presigned, "--output", str(root), "--max-bytes", str(MAX_BYTES)]
        first = _run([*argv, "--previews", "2", "--rows-per-file", "1"])
        again = _run(argv)
    t = tables(str(root))
    return {"root": root, "base": base, "hostile": hostile, "names": names, "stale": stale, "fresh": fresh,
            "checkpoint": ck_path, "presigned_base": f"{url}/fcn8s.pt?", "alone": alone, "first": first,
            "again": again, "labels": t["labels"].to_pylist(), "errors": t["errors"].to_pylist()}


def _under(rows: list[dict], folder) -> dict[str, dict]:
    """Rows of images directly in `folder` (local URIs), by file name."""
    return {r["image_uri"][len(str(folder)) + 1:]: r for r in rows if r["image_uri"].startswith(f"{folder}/")}


def test_the_whole_folder_is_counted_once(local):
    """19 listed (`cat` has no image extension), alone/a.png skipped, 11 labeled, 7 errors."""
    s = local["first"]["summary"]
    assert (s["listed"], s["skipped"], s["labelled"], s["errors"]) == (19, 1, 11, 7)
    assert len(local["labels"]) == len({r["image_uri"] for r in local["labels"]}) == 12


def test_hostile_files_each_get_an_error_row_or_a_correct_label(local):
    errors, labels = _under(local["errors"], local["hostile"]), _under(local["labels"], local["hostile"])
    assert set(labels) == {"cat::2.png", "float01.tif", "float255.tif", "int32.tif"}
    assert set(errors) == {"floatbad.tif", "postscript.jpg", "big.png", "fifo.png", "zero.jpg"}

    assert "not a regular file (FIFO)" in errors["fifo.png"]["error"] and errors["fifo.png"]["stage"] == "read"
    assert "not a regular file (character device)" in errors["zero.jpg"]["error"]
    assert "--max-bytes" in errors["big.png"]["error"]
    assert errors["postscript.jpg"]["error"] == "not a recognised image format"
    assert "float image values range -5..900" in errors["floatbad.tif"]["error"]

    # cat::2.png is itself (25x17), not the file "cat" (30x20).
    assert (labels["cat::2.png"]["height"], labels["cat::2.png"]["width"]) == (25, 17)
    # Float 0..1 and 0..255 and 32-bit integer images are labelled as the grey they hold, not near-black.
    ck = load_checkpoint(local["checkpoint"])
    for name, grey in (("float01.tif", 204), ("float255.tif", 100), ("int32.tif", 200)):
        row = labels[name]
        rgb = np.full((row["height"], row["width"], 3), grey, np.uint8)
        expected = predict_image(ck, None, rgb, max_side=48, batch_size=1).label
        np.testing.assert_array_equal(np.frombuffer(row["label_map"], np.uint8).reshape(expected.shape), expected,
                                      err_msg=name)


def test_a_file_name_that_is_not_utf8_costs_only_itself(local):
    names = local["names"]
    assert sorted(_under(local["labels"], names)) == [f"g{i}.png" for i in range(4)]
    # The URI as best representable: each byte that is not UTF-8 percent-encoded (docs/operations.md "When a run fails").
    errors = {r["image_uri"]: r for r in local["errors"] if r["image_uri"].startswith(f"{names}/")}
    assert set(errors) == {f"{names}/caf%E9.png", f"{names}/d%E9j%E0/x.png"}
    assert len(local["errors"]) == 7 + 7  # each run's 7 errors: the failed images are tried again by the rerun
    assert all(r["stage"] == "list" and "not valid UTF-8" in r["error"] for r in errors.values())


def test_glob_characters_in_output_and_image_paths_are_literal_local(local):
    root = str(local["root"])
    assert sorted(_under(local["labels"], f"{root}/im[1]")) == ["a.png", "b*.png"]
    assert all(r["image_uri"].startswith(f"{root}/") for r in local["labels"] + local["errors"])  # never segv/
    assert local["first"]["summary"]["previews"] == 2
    left = [p for p in glob.glob(glob.escape(root) + "/**", recursive=True) if os.path.isfile(p)
            and ("/_staging/" in p or "/_commits/" in p or p.endswith(LEASE_FILE))]
    assert left == []


def test_a_file_alone_then_its_folder_is_labelled_once(local):
    assert local["alone"]["summary"]["labelled"] == 1
    alone = _under(local["labels"], local["root"] / "alone")
    assert sorted(alone) == ["a.png", "b.png"]
    assert alone["a.png"]["run_id"] == local["alone"]["summary"]["run_id"]  # not labeled again by the folder's run
    assert alone["b.png"]["run_id"] == local["first"]["summary"]["run_id"]


def test_images_stored_under_the_output_root_are_labelled_and_its_own_files_never_listed(local):
    first, again = local["first"]["summary"], local["again"]["summary"]
    previews = glob.glob(glob.escape(str(local["root"])) + "/previews/**/*.png", recursive=True)
    assert len(previews) == first["previews"] == 2
    # Its own previews, tables and runs are never listed: the rerun lists what the first run did, and labels nothing.
    assert (again["listed"], again["skipped"], again["labelled"], again["errors"]) == (19, 12, 0, 7)


def test_presigned_checkpoint_url_leaves_no_signature_anywhere(local):
    written = [p for p in glob.glob(glob.escape(str(local["root"])) + "/**/*", recursive=True) if os.path.isfile(p)]
    assert any(p.endswith(".json") for p in written) and any(p.endswith(".parquet") for p in written)
    runs = [local[k] for k in ("first", "again")]
    for text, where in [*((r[s], s) for r in runs for s in ("stdout", "stderr")),
                        *((open(p, "rb").read().decode("latin-1"), p) for p in written)]:
        assert not any(s in text for s in SECRETS), where
    path = storage.join(str(local["root"]), "runs", f"{local['first']['summary']['run_id']}.json")
    checkpoint = json.loads(open(path).read())["arguments"]["checkpoint"]
    assert checkpoint.startswith(local["presigned_base"]) and "Signature=***" in checkpoint


def test_temporaries_left_by_a_kill_are_removed_at_recovery(local):
    assert not any(p.exists() for p in local["stale"]) and local["fresh"].exists()


# ------------------------------------------------------------------------------ the S3 scenario


@pytest.fixture(scope="module")
def on_s3(ray_module, s3_server, tiny_checkpoint):
    """Every S3 hostile key under one prefix with glob characters, `im[1]`, labeled into `seg[v2]` beside it, then
    again. What the tests check is read here: the function-scoped `s3` fixture of a later test empties the server."""
    import s3fs

    reset_s3(s3_server)
    fs = s3fs.S3FileSystem()
    fs.mkdir("test-bucket")
    images, output = "s3://test-bucket/x/im[1]", "s3://test-bucket/x/seg[v2]"
    keys = ["a.png", "b*.png", "cat.png", "cat.png::2.png", "dbl/a.png", "dbl/sub/b.png", "dbl//c.png", "dbl//d/e.png",
            "dbl/sub//f.png"]
    sizes = {"cat.png": (30, 20), "cat.png::2.png": (25, 17)}
    for i, key in enumerate(keys):
        h, w = sizes.get(key, (20 + i, 22))
        fs.call_s3("put_object", Bucket="test-bucket", Key=f"x/im[1]/{key}", Body=good_image(i, h, w))
    write_files("s3://test-bucket/x/im1", {"decoy.png": good_image(3, 22, 24)})  # what `im[1]` matches as a glob
    argv = ["--images", images, "--checkpoint", tiny_checkpoint[0], "--output", output]
    first = _run([*argv, "--rows-per-file", "1", "--previews", "1"])["summary"]
    again = _run(argv)["summary"]
    fs.invalidate_cache()
    return {"images": images, "keys": keys, "first": first, "again": again,
            "labels": tables(output)["labels"].to_pylist(), "files": fs.find("test-bucket/x/seg[v2]")}


def test_s3_key_with_double_colon_is_read_as_itself(on_s3):
    sizes = {r["image_uri"]: (r["height"], r["width"]) for r in on_s3["labels"]}
    assert sizes[f"{on_s3['images']}/cat.png"] == (30, 20) and sizes[f"{on_s3['images']}/cat.png::2.png"] == (25, 17)


def test_s3_keys_with_an_empty_segment_are_listed_once(on_s3):
    first, again, keys = on_s3["first"], on_s3["again"], on_s3["keys"]
    assert (first["listed"], first["labelled"], first["errors"]) == (len(keys), len(keys), 0)
    assert sorted(r["image_uri"] for r in on_s3["labels"]) == sorted(f"{on_s3['images']}/{k}" for k in keys)
    assert (again["listed"], again["skipped"], again["labelled"]) == (len(keys), len(keys), 0)


def test_glob_characters_in_output_and_image_paths_are_literal_s3(on_s3):
    assert on_s3["first"]["previews"] == 1
    assert not [r for r in on_s3["labels"] if "decoy" in r["image_uri"]]
    left = [p for p in on_s3["files"] if "/_staging/" in p or "/_commits/" in p or p.endswith(LEASE_FILE)]
    assert left == [] and any("/labels/" in p for p in on_s3["files"])


# ------------------------------------------------------------------------------ no run needed, or refused at once


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
