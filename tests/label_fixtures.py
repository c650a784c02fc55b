"""Shared helpers of the labeling tests: a tiny checkpoint (a fixture, loaded through conftest's
pytest_plugins), the tests' small labeling settings (as a LabelConfig and as flags), a mixed image bucket, output
readers."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import storage
from pipeline.label.codec import decode_label_map
from pipeline.label.config import LabelConfig
from pipeline.label.readers import read_table
from pipeline.label.tables import TABLES
from pipeline.synthetic import SYNTHETIC_CLASSES
from pipeline.testbed import random_checkpoint, sample_photo_paths
from tests import storage_util
from tests.images import broken_files, encode, exif_rotated_jpeg, gradient_rgb, png16_rgb

CLASS_NAMES = list(SYNTHETIC_CLASSES)

# The tests' labeling settings, small for 2 CPUs: canvases of at most 48 px, one single-threaded inference actor
# (a CPU left for reading and decoding), file sets of a few rows so that a run of a dozen images writes several.
MAX_SIDE, BATCH = 48, 4
SMALL = dict(max_side=MAX_SIDE, batch_size=BATCH, rows_per_file=4, rows_per_read_task=4, progress=False, actors=1,
             threads_per_actor=1, cpus_per_actor=1.0)
# The same as jobs/label.py flags, one image per forward pass (the CLI tests check rows, not batching).
FAST_FLAGS = ["--max-side", str(MAX_SIDE), "--batch-size", "1", "--actors", "1", "--threads-per-actor", "1",
              "--cpus-per-actor", "1", "--no-progress"]


def label_config(images, checkpoint: str, output, **settings) -> LabelConfig:
    """A LabelConfig with SMALL's settings; `settings` replace any of them (functools.partial of this gives a test
    module settings of its own)."""
    return LabelConfig(images=str(images), checkpoint=checkpoint, output=str(output), **{**SMALL, **settings})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, str]:
    """(path, model_id) of a narrow FCN-8s (width 1/16) whose score layers are random."""
    path = str(tmp_path_factory.mktemp("ck") / "fcn8s-tiny.pt")
    return path, random_checkpoint(path, CLASS_NAMES)


def real_photo(name: str = "coffee.png") -> bytes:
    (path,) = sample_photo_paths((name,))
    with open(path, "rb") as f:
        return f.read()


def _png(arr: np.ndarray) -> bytes:
    return encode(arr, "PNG")


def mixed_images() -> tuple[dict[str, bytes], dict[str, str], dict[str, tuple[int, int]]]:
    """(files, bad -> expected reason, good -> (height, width) after EXIF orientation).

    Bad files sit between good ones in URI order, so they share read blocks and inference batches.
    """
    broken = broken_files()
    rgba = np.dstack([gradient_rgb(40, 50, 3), np.full((40, 50), 128, np.uint8)])
    bmp = bytearray(encode(gradient_rgb(6, 6), "BMP"))
    bmp[30:34] = (9).to_bytes(4, "little")  # a compression type Pillow does not support
    files = {
        "a00_photo.png": real_photo("coffee.png"),
        "a01_truncated.jpg": broken["truncated.jpg"],
        "a02_odd.jpg": encode(gradient_rgb(23, 37, 1), "JPEG", quality=90),
        "a03_zero.jpg": broken["zero.jpg"],
        "a04_gray.png": _png(gradient_rgb(31, 29, 2)[:, :, 0]),
        "a05_notes.jpg": broken["notes.jpg"],
        "a06_rgba.png": encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "a07_bomb.png": broken["bomb.png"],
        "a08_exif.jpg": exif_rotated_jpeg(gradient_rgb(20, 34, 4), orientation=6),
        "a09_unsupported.bmp": bytes(bmp),
        "a10_16bit.png": png16_rgb((gradient_rgb(27, 33, 5).astype(np.uint16) * 257)),
        "a12_cmyk.jpg": encode(Image.fromarray(gradient_rgb(30, 30, 6)).convert("CMYK"), "JPEG"),
        "a14_canvas64a.png": _png(gradient_rgb(45, 40, 7)),
        "a16_canvas64b.png": _png(gradient_rgb(33, 47, 8)),
        "sub/dir/a18_upper.JPG": encode(gradient_rgb(41, 33, 9), "JPEG"),
        "readme.txt": b"not listed: not an image extension",
    }
    bad = {"a01_truncated.jpg": "truncated or corrupt", "a03_zero.jpg": "empty file",
           "a05_notes.jpg": "not a recognised image format", "a07_bomb.png": "MP limit",
           "a09_unsupported.bmp": "Unsupported BMP compression"}
    sizes = {"a00_photo.png": (400, 600), "a02_odd.jpg": (23, 37), "a04_gray.png": (31, 29),
             "a06_rgba.png": (40, 50), "a08_exif.jpg": (34, 20), "a10_16bit.png": (27, 33), "a12_cmyk.jpg": (30, 30),
             "a14_canvas64a.png": (45, 40), "a16_canvas64b.png": (33, 47), "sub/dir/a18_upper.JPG": (41, 33)}
    return files, bad, sizes


def write_files(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage_util.write_bytes(storage.join(root, name), data)


def run_label_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """jobs/label.py's entry point in this process (the session's Ray): (exit code, stdout, stderr)."""
    import jobs.label as job
    from pipeline.cli import run_job

    with pytest.raises(SystemExit) as exc:
        run_job(job.main, argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def run_label_job(argv: list[str]) -> tuple[int, str, str]:
    """run_label_cli for a module-scoped scenario fixture, which cannot use capsys: the job's stdout and stderr are
    captured here."""
    import jobs.label as job
    from pipeline.cli import run_job

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_job(job.main, argv)
    return exc.value.code, out.getvalue(), err.getvalue()


def label_summary(capsys, images, checkpoint: str, output, *extra: str) -> dict:
    """jobs/label.py with FAST_FLAGS (and `extra`) in this process: asserts it exits 0; its JSON summary."""
    code, stdout, stderr = run_label_cli(["--images", str(images), "--checkpoint", checkpoint, "--output", str(output),
                                          *FAST_FLAGS, *extra], capsys)
    assert code == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def good_image(seed: int, h: int, w: int) -> bytes:
    return _png(gradient_rgb(h, w, seed))


def tables(root: str) -> dict[str, pa.Table]:
    output = storage.Location.of(root)
    return {name: read_table(output, name) for name in TABLES}


def duckdb_connection(root: str):
    import duckdb

    con = duckdb.connect()
    if root.startswith("s3://"):
        import s3fs

        con.register_filesystem(s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False))
    return con


def decode_row(row: dict) -> np.ndarray:
    return decode_label_map(row["label_map"], row["label_encoding"], row["height"], row["width"])


def png_ok(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
