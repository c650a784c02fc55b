"""The synthetic VOC-layout dataset: determinism, well-formed files, learnable colour cues, S3, and the CLI."""
from __future__ import annotations

import colorsys
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from models.voc import flat_palette
from pipeline.cli import run_job
from pipeline.synthetic import CLASS_HUES, SYNTHETIC_CLASSES, synthesize_voc
from tests.storage_util import list_files, read_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = (64, 48)
VALID_LABELS = set(range(len(SYNTHETIC_CLASSES))) | {255}


def _tree(root: str) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _ids(root: str, split: str) -> list[str]:
    with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")) as f:
        return f.read().split()


def _load(root: str, id_: str) -> tuple[Image.Image, Image.Image]:
    return (Image.open(os.path.join(root, "JPEGImages", f"{id_}.jpg")),
            Image.open(os.path.join(root, "SegmentationClass", f"{id_}.png")))


@pytest.fixture(scope="module")
def dataset40(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn40"))
    summary = synthesize_voc(root, 40, size=(96, 72), seed=3)
    return root, summary


def test_same_seed_gives_byte_identical_files(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    synthesize_voc(a, 6, size=SMALL, seed=11)
    synthesize_voc(b, 6, size=SMALL, seed=11)
    ta, tb = _tree(a), _tree(b)
    assert len(ta) == 6 * 2 + 3
    assert ta == tb


def test_different_seed_gives_different_data(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    synthesize_voc(a, 6, size=SMALL, seed=1)
    synthesize_voc(b, 6, size=SMALL, seed=2)
    ta, tb = _tree(a), _tree(b)
    assert ta.keys() == tb.keys()
    for kind in ("JPEGImages", "SegmentationClass"):
        differing = [k for k in ta if k.startswith(kind) and ta[k] != tb[k]]
        assert len(differing) == 6, kind
    # Images within one dataset differ from each other too.
    assert len({v for k, v in ta.items() if k.startswith("JPEGImages")}) == 6


def test_files_are_well_formed(dataset40):
    root, summary = dataset40
    train, val = _ids(root, "train"), _ids(root, "val")
    all_ids = [f"syn_{i:06d}" for i in range(40)]
    assert sorted(train + val) == all_ids and not set(train) & set(val)
    assert len(val) == 8 and (summary["train"], summary["val"]) == (32, 8)
    with open(os.path.join(root, "classes.txt")) as f:
        assert f.read() == "".join(f"{c}\n" for c in SYNTHETIC_CLASSES)
    assert SYNTHETIC_CLASSES[0] == "background" and len(SYNTHETIC_CLASSES) == 6
    assert sorted(os.listdir(os.path.join(root, "JPEGImages"))) == [f"{i}.jpg" for i in all_ids]
    assert sorted(os.listdir(os.path.join(root, "SegmentationClass"))) == [f"{i}.png" for i in all_ids]

    palette = flat_palette()
    totals = np.zeros(256, dtype=np.int64)
    for id_ in all_ids:
        image, mask = _load(root, id_)
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (96, 72)
        assert mask.format == "PNG" and mask.mode == "P" and mask.size == image.size
        assert mask.getpalette()[:768] == palette
        m = np.asarray(mask)
        values = set(np.unique(m).tolist())
        assert values <= VALID_LABELS, values
        assert 255 in values and 0 in values and len(values - {0, 255}) >= 1
        # Void separates regions: no two 4-adjacent pixels carry different non-void labels.
        for a, b in ((m[:, 1:], m[:, :-1]), (m[1:, :], m[:-1, :])):
            clash = (a != b) & (a != 255) & (b != 255)
            assert not clash.any(), id_
        # The void band is thin: objects keep an interior.
        assert (m == 255).mean() < 0.25
        totals += np.bincount(m.ravel(), minlength=256)
    assert summary["class_pixels"] == {c: int(totals[i]) for i, c in enumerate(SYNTHETIC_CLASSES)}
    assert summary["void_pixels"] == int(totals[255])
    assert summary["count"] == 40 and summary["size"] == [96, 72] and summary["seed"] == 3
    assert summary["output"] == root and summary["classes"] == list(SYNTHETIC_CLASSES)


def test_void_ring_surrounds_each_object(tmp_path):
    root = str(tmp_path)
    synthesize_voc(root, 5, size=(80, 60), seed=5)
    for i in range(5):
        m = np.asarray(_load(root, f"syn_{i:06d}")[1])
        objects = (m != 0) & (m != 255)
        # Grow the object region by one pixel (4-neighbourhood) inside the frame: what it reaches is void.
        grown = objects.copy()
        grown[1:, :] |= objects[:-1, :]
        grown[:-1, :] |= objects[1:, :]
        grown[:, 1:] |= objects[:, :-1]
        grown[:, :-1] |= objects[:, 1:]
        ring = grown & ~objects
        assert ring.any()
        assert set(np.unique(m[ring]).tolist()) <= {255}


def test_every_class_appears_with_its_colour_band(dataset40):
    root, summary = dataset40
    assert all(summary["class_pixels"][c] > 0 for c in SYNTHETIC_CLASSES), summary["class_pixels"]
    rgb_sum = np.zeros((len(SYNTHETIC_CLASSES), 3))
    sat_sum = np.zeros(len(SYNTHETIC_CLASSES))
    n = np.zeros(len(SYNTHETIC_CLASSES))
    for i in range(40):
        image, mask = _load(root, f"syn_{i:06d}")
        x = np.asarray(image, dtype=np.float64)
        m = np.asarray(mask)
        sat = (x.max(2) - x.min(2)) / np.maximum(x.max(2), 1)
        for c in range(len(SYNTHETIC_CLASSES)):
            sel = m == c
            rgb_sum[c] += x[sel].sum(0)
            sat_sum[c] += sat[sel].sum()
            n[c] += sel.sum()
    assert (n > 0).all()
    # The hue bands are well apart (each instance varies within +-10 degrees of its band centre).
    hues = [CLASS_HUES[c] for c in SYNTHETIC_CLASSES[1:]]
    assert min(abs((a - b + 180.0) % 360.0 - 180.0) for i, a in enumerate(hues) for b in hues[i + 1:]) >= 50
    mean_sat = sat_sum / n
    # Objects are strongly saturated, the background weakly: the colour cue that makes the data learnable.
    assert mean_sat[0] < 0.3 and (mean_sat[1:] > 0.5).all(), mean_sat
    for c, name in enumerate(SYNTHETIC_CLASSES[1:], start=1):
        r, g, b = rgb_sum[c] / n[c] / 255.0
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360.0
        diff = abs((hue - CLASS_HUES[name] + 180.0) % 360.0 - 180.0)
        assert diff < 20.0, (name, hue)


def test_split_edge_cases(tmp_path):
    s = synthesize_voc(str(tmp_path / "two"), 2, size=(16, 12), val_fraction=0.01)
    assert (s["train"], s["val"]) == (1, 1)
    s = synthesize_voc(str(tmp_path / "zero"), 3, size=(16, 12), val_fraction=0.0)
    assert (s["train"], s["val"]) == (3, 0)
    assert _ids(str(tmp_path / "zero"), "val") == []
    s = synthesize_voc(str(tmp_path / "one"), 1, size=(16, 12))
    assert (s["train"], s["val"]) == (1, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"count": 0}, "count"),
    ({"count": 2.5}, "count"),
    ({"size": (0, 10)}, "size"),
    ({"size": (10,)}, "size"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, match):
    args = {"count": 2, **kwargs}
    count = args.pop("count")
    with pytest.raises(ValueError, match=match):
        synthesize_voc(str(tmp_path), count, **args)
    assert not os.listdir(tmp_path)


def test_writes_to_s3(bucket, tmp_path):
    uri = f"{bucket}/data/syn"
    summary = synthesize_voc(uri, 4, size=SMALL, seed=7)
    assert summary["output"] == uri and summary["count"] == 4
    listed = [f.uri for f in list_files(uri)]
    expected = sorted([f"{uri}/JPEGImages/syn_{i:06d}.jpg" for i in range(4)]
                      + [f"{uri}/SegmentationClass/syn_{i:06d}.png" for i in range(4)]
                      + [f"{uri}/ImageSets/Segmentation/train.txt", f"{uri}/ImageSets/Segmentation/val.txt",
                         f"{uri}/classes.txt"])
    assert listed == expected
    # Same bytes as a local run with the same arguments.
    local = str(tmp_path / "local")
    synthesize_voc(local, 4, size=SMALL, seed=7)
    for rel, data in _tree(local).items():
        assert read_bytes(f"{uri}/{rel.replace(os.sep, '/')}") == data, rel
    mask = Image.open(io.BytesIO(read_bytes(f"{uri}/SegmentationClass/syn_000000.png")))
    assert mask.mode == "P" and mask.size == SMALL


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/synthesize.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_help_documents_every_option():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for option in ("--output", "--count", "--size", "--seed", "--val-fraction"):
        assert option in r.stdout
    assert "(default: 160x120)" in r.stdout and "(default: 0.2)" in r.stdout and "(default: 0)" in r.stdout


def test_cli_small_run_prints_json_summary(tmp_path):
    out = str(tmp_path / "cli")
    r = _cli("--output", out, "--count", "3", "--size", "40x30", "--seed", "4", "--val-fraction", "0.34")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["count"] == 3 and summary["size"] == [40, 30] and summary["seed"] == 4
    assert (summary["train"], summary["val"]) == (2, 1)
    assert sorted(os.listdir(os.path.join(out, "JPEGImages"))) == [f"syn_{i:06d}.jpg" for i in range(3)]
    assert Image.open(os.path.join(out, "JPEGImages", "syn_000000.jpg")).size == (40, 30)
    assert not [n for n in os.listdir(out) if n.startswith(".write-check")]


def test_cli_bad_size_is_one_error_line(tmp_path):
    r = _cli("--output", str(tmp_path / "x"), "--count", "2", "--size", "bogus")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--size" in lines[0], r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_output_and_usage_errors(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("synthesize_job", os.path.join(REPO, "jobs", "synthesize.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for argv, needle in ([["--output", str(blocker / "sub"), "--count", "2"], "cannot write"],
                         [["--count", "2"], "--output"],
                         [["--output", str(tmp_path / "y"), "--count", "0"], "--count"]):
        with pytest.raises(SystemExit) as e:
            run_job(job.main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
