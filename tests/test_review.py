"""The review loop's CLIs (issue 33) on one labeled night: jobs/export_review.py's packages decode back to exactly
the label maps in labels/ (CVAT's colours, Label Studio's brush RLE through label-studio-sdk, COCO's RLE through
pycocotools); jobs/import_review.py turns exports written as each tool writes them back into exactly the masks
that went in, as a dataset training reads; and bad input is refused one line per problem, the rest imported."""
from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile

import duckdb
import numpy as np
import pytest
from label_studio_sdk.converter import brush
from PIL import Image
from pycocotools import mask as coco_mask

from models.voc import voc_palette
from pipeline.dataset_formats import list_samples, read_class_names
from pipeline.label.codec import decode_label_map
from pipeline.review import simulated
from pipeline.storage import Location
from pipeline.synthetic import synthesize_voc
from tests.jobs_util import one_error
from tests.label_fixtures import CLASS_NAMES, FAST_FLAGS, run_label_job

NIGHT, K = "2026-12-06", 6


def _cli(name: str, argv: list[str]) -> tuple[int, dict | None, str]:
    """A job's command line in this process: (exit status, its JSON summary or None, stderr)."""
    from pipeline.cli import run_job
    from tests.jobs_util import load_job

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        run_job(load_job(name).main, argv)
    lines = out.getvalue().strip().splitlines()
    return exc.value.code, (json.loads(lines[-1]) if exc.value.code == 0 else None), err.getvalue()


def _labels(output: str) -> dict[str, np.ndarray]:
    rows = duckdb.connect().execute(f"SELECT image_uri, label_map, label_encoding, height, width FROM read_parquet("
                                    f"'{output}/labels/**/*.parquet')").fetchall()
    return {uri: decode_label_map(cell, enc, h, w) for uri, cell, enc, h, w in rows}


@pytest.fixture(scope="module")
def night(ray_module, tiny_checkpoint, tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("review"))
    data = f"{tmp}/syn"
    synthesize_voc(data, 10, size=(48, 40), seed=3, val_fraction=0.1)
    ck, _ = tiny_checkpoint
    output = f"{tmp}/out"
    code, _, err = run_label_job(["--images", f"{data}/JPEGImages", "--checkpoint", ck, "--output", output,
                                  "--run-date", NIGHT, *FAST_FLAGS])
    assert code == 0, err[-3000:]
    packages = {}
    for fmt in ("cvat", "label-studio", "coco"):
        code, summary, err = _cli("export_review", ["--output", output, "--to", f"{tmp}/pkg-{fmt}", "--format", fmt,
                                                    "--run-date", NIGHT, "--least-confident", str(K)])
        assert code == 0, err[-3000:]
        packages[fmt] = summary
    return {"tmp": tmp, "data": data, "ck": ck, "output": output, "labels": _labels(output), "packages": packages,
            "provenance": {f: json.load(open(f"{tmp}/pkg-{f}/export.json")) for f in packages}}


def _truth(night, uri: str) -> np.ndarray:
    """The synthetic ground truth of a labeled image (what the annotators are taken to have painted)."""
    stem = os.path.splitext(os.path.basename(uri))[0]
    return np.asarray(Image.open(f"{night['data']}/SegmentationClass/{stem}.png"))


# ------------------------------------------------------------------------------------------------ export


def test_the_package_holds_the_night_s_k_least_confident_images(night):
    expected = duckdb.connect().execute(
        f"SELECT image_uri FROM read_parquet('{night['output']}/labels/**/*.parquet') ORDER BY mean_confidence, "
        f"image_uri LIMIT {K}").fetchall()
    for fmt, provenance in night["provenance"].items():
        assert [i["image_uri"] for i in provenance["images"]] == [u for (u,) in expected], fmt
        assert night["packages"][fmt]["images"] == K


def test_every_package_records_its_output_run_model_and_classes(night):
    run_ids = {r for (r,) in duckdb.connect().execute(
        f"SELECT DISTINCT run_id FROM read_parquet('{night['output']}/labels/**/*.parquet')").fetchall()}
    for fmt, provenance in night["provenance"].items():
        assert provenance["output"] == night["output"] and provenance["format"] == fmt
        assert set(provenance["runs"]) == run_ids and len(provenance["model_ids"]) == 1
        assert provenance["class_names"] == CLASS_NAMES
        assert provenance["selection"] == {"run_date": NIGHT, "least_confident": K}
    coco = json.load(open(f"{night['tmp']}/pkg-coco/instances.json"))
    assert coco["info"]["fcn_output"] == night["output"]


def _decoded_cvat(pkg: str) -> dict[str, np.ndarray]:
    """The package's masks as class ids, read back as CVAT reads them (colours through labelmap.txt)."""
    provenance = json.load(open(f"{pkg}/export.json"))
    with zipfile.ZipFile(f"{pkg}/annotations.zip") as z:
        labelmap = z.read("labelmap.txt").decode().splitlines()
        assert [line.split(":")[0] for line in labelmap[1:]] == CLASS_NAMES
        colours = {tuple(int(v) for v in line.split(":")[1].split(",")): i for i, line in enumerate(labelmap[1:])}
        assert colours == {rgb: i for i, rgb in enumerate(voc_palette(len(CLASS_NAMES)))}
        assert z.read("ImageSets/Segmentation/default.txt").decode().split() == [i["name"] for i in provenance["images"]]
        out = {}
        for image in provenance["images"]:
            rgb = np.asarray(Image.open(io.BytesIO(z.read(f"SegmentationClass/{image['name']}.png"))).convert("RGB"))
            out[image["image_uri"]] = np.vectorize(lambda r, g, b: colours[(r, g, b)])(rgb[..., 0], rgb[..., 1], rgb[..., 2])
    return out


def _decoded_label_studio(pkg: str) -> dict[str, np.ndarray]:
    """The predictions' regions decoded by label-studio-sdk, one class per pixel."""
    out = {}
    for task in json.load(open(f"{pkg}/tasks.json")):
        (prediction,) = task["predictions"]
        first = prediction["result"][0]
        rebuilt = np.full((first["original_height"], first["original_width"]), 255, np.uint8)
        for region in prediction["result"]:
            assert region["type"] == "brushlabels" and region["value"]["format"] == "rle"
            h, w = region["original_height"], region["original_width"]
            mask = brush.decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
            assert (rebuilt[mask] == 255).all()  # one class per pixel
            (name,) = region["value"]["brushlabels"]
            rebuilt[mask] = CLASS_NAMES.index(name)
        out[task["data"]["image"]] = rebuilt
    return out


def _decoded_coco(pkg: str) -> dict[str, np.ndarray]:
    """The annotations decoded by pycocotools, one class per pixel."""
    coco = json.load(open(f"{pkg}/instances.json"))
    assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == CLASS_NAMES
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out = {}
    for image in coco["images"]:
        rebuilt = np.full((image["height"], image["width"]), 255, np.uint8)
        for a in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            mask = coco_mask.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
            assert a["area"] == mask.sum() and (rebuilt[mask.astype(bool)] == 255).all()  # one class per pixel
            rebuilt[mask.astype(bool)] = CLASS_NAMES.index(names[a["category_id"]])
        out[image["coco_url"]] = rebuilt
    return out


DECODED = {"cvat": _decoded_cvat, "label-studio": _decoded_label_studio, "coco": _decoded_coco}


@pytest.mark.parametrize("fmt", list(DECODED))
def test_the_package_decodes_to_exactly_the_label_maps(night, fmt):
    decoded = DECODED[fmt](f"{night['tmp']}/pkg-{fmt}")
    assert len(decoded) == K
    for uri, label in decoded.items():
        assert np.array_equal(label, night["labels"][uri]), uri  # every pixel


def test_label_studio_predictions_carry_the_model_and_the_image_s_confidence(night):
    tasks = json.load(open(f"{night['tmp']}/pkg-label-studio/tasks.json"))
    scores = {i["image_uri"]: i["mean_confidence"] for i in night["provenance"]["label-studio"]["images"]}
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == night["provenance"]["label-studio"]["model_ids"][0]
        assert prediction["score"] == pytest.approx(scores[task["data"]["image"]])
    config = open(f"{night['tmp']}/pkg-label-studio/label_config.xml").read()
    assert all(f'value="{name}"' in config for name in CLASS_NAMES)


def test_png_encoded_label_maps_export_to_exactly_the_same_pixels(night, tmp_path):
    """Both label_map encodings: an output written with --label-encoding png decodes the same through each format."""
    output = str(tmp_path / "png-out")
    code, _, err = run_label_job(["--images", f"{night['data']}/JPEGImages", "--checkpoint", night["ck"], "--output",
                                  output, "--run-date", NIGHT, "--label-encoding", "png", *FAST_FLAGS])
    assert code == 0, err[-3000:]
    labels = _labels(output)
    assert {e for (e,) in duckdb.connect().execute(
        f"SELECT DISTINCT label_encoding FROM read_parquet('{output}/labels/**/*.parquet')").fetchall()} == {"png"}
    for fmt, decode in DECODED.items():
        code, _, err = _cli("export_review", ["--output", output, "--to", str(tmp_path / fmt), "--format", fmt,
                                              "--run-date", NIGHT, "--least-confident", "4"])
        assert code == 0, err
        decoded = decode(str(tmp_path / fmt))
        assert len(decoded) == 4 and all(np.array_equal(v, labels[u]) for u, v in decoded.items()), fmt


def test_where_selects_by_sql_and_images_by_a_list(night, tmp_path):
    first = sorted(night["labels"])[0]
    code, summary, err = _cli("export_review", ["--output", night["output"], "--to", str(tmp_path / "w"), "--format",
                                                "coco", "--where", f"image_uri = '{first}' AND width = 48"])
    assert code == 0 and summary["images"] == 1, err
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(sorted(night["labels"])[:3]) + "\n")
    code, summary, err = _cli("export_review", ["--output", night["output"], "--to", str(tmp_path / "i"), "--format",
                                                "label-studio", "--images", str(listed)])
    assert code == 0 and summary["images"] == 3, err
    code, summary, err = _cli("export_review", ["--output", night["output"], "--to", str(tmp_path / "k"), "--format",
                                                "cvat", "--run-date", NIGHT, "--where", "width = 48", "--least-confident", "2"])
    chosen = [i["image_uri"] for i in json.load(open(tmp_path / "k" / "export.json"))["images"]]
    assert code == 0 and chosen == [i["image_uri"] for i in night["provenance"]["cvat"]["images"][:2]], err


@pytest.mark.parametrize("argv,expected", [
    (["--where", "no_such_column > 1"], "does not run over labels"),
    ([], "say which images to export"),
    (["--where", "1=1; COPY (SELECT 1) TO 'x.csv'"], "is not an SQL condition"),
    (["--where", "1=1); COPY (SELECT 1) TO 'x.csv'; SELECT (1"], "is more than one condition"),
    (["--where", "length(read_text('/etc/hostname')) > 0"], "does not run over labels"),
    (["--least-confident", "0"], "--least-confident"),
    (["--run-date", "2026-01-01", "--least-confident", "3"], "no labels for run date 2026-01-01"),
    (["--where", "width > 10000"], "matches no labels row"),
])
def test_a_selection_that_cannot_be_made_is_one_line(night, tmp_path, argv, expected):
    code, _, err = _cli("export_review", ["--output", night["output"], "--to", str(tmp_path / "p"), "--format", "cvat",
                                          *argv])
    assert expected in one_error(code, err)


def test_a_package_is_not_written_over_without_overwrite(night):
    code, _, err = _cli("export_review", ["--output", night["output"], "--to", f"{night['tmp']}/pkg-cvat", "--format",
                                          "cvat", "--run-date", NIGHT, "--least-confident", "2"])
    assert "already holds a review package" in one_error(code, err)


# ------------------------------------------------------------------------------------------------ import


def _sdk_mask2rle(mask: np.ndarray) -> list[int]:
    return brush.mask2rle(mask.astype(np.uint8) * 255)


def _ls_export(night, images: list[dict], *, missing: str | None = None) -> list[dict]:
    """The ground truth as Label Studio's JSON export holds it, brush RLE from label-studio-sdk's own encoder;
    `missing`: the first task's image URI points there instead."""
    tasks = simulated.label_studio_tasks([({"image": i["image_uri"], "name": i["name"]}, _truth(night, i["image_uri"]))
                                          for i in images], CLASS_NAMES, encode=_sdk_mask2rle)
    if missing:
        tasks[0]["data"]["image"] = missing
    return tasks


def _coco_export(night, images: list[dict]) -> dict:
    return simulated.coco_instances([(i["name"] + ".jpg", _truth(night, i["image_uri"])) for i in images], CLASS_NAMES)


def _cvat_export(night, images: list[dict]) -> bytes:
    return simulated.cvat_zip([(i["name"], _truth(night, i["image_uri"])) for i in images], CLASS_NAMES)


def test_the_simulated_exports_are_the_tools_own_formats(night):
    """What the imports below read is what the tools write: CVAT's colours are not the VOC ones the package was
    sent with, Label Studio's RLE is the SDK's, COCO's RLE decodes with pycocotools."""
    image = night["provenance"]["cvat"]["images"][0]
    truth = _truth(night, image["image_uri"])
    with zipfile.ZipFile(io.BytesIO(_cvat_export(night, [image]))) as z:
        assert z.read("labelmap.txt").decode().splitlines()[2] == f"{CLASS_NAMES[1]}:250,50,83::"
    (task,) = _ls_export(night, [image])
    region = task["annotations"][0]["result"][0]
    h, w = truth.shape
    c = CLASS_NAMES.index(region["value"]["brushlabels"][0])
    assert np.array_equal(brush.decode_rle(region["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127, truth == c)
    a = _coco_export(night, [image])["annotations"][0]
    assert np.array_equal(coco_mask.decode({"size": a["segmentation"]["size"],
                                            "counts": a["segmentation"]["counts"].encode()}), truth == a["category_id"] - 1)


@pytest.fixture(scope="module")
def imported(night) -> dict:
    tmp, images = night["tmp"], night["provenance"]["cvat"]["images"]
    sources = {"label-studio": f"{tmp}/ls-export.json", "coco": f"{tmp}/coco-export.json", "cvat": f"{tmp}/cvat-export.zip"}
    with open(sources["label-studio"], "w") as f:
        json.dump(_ls_export(night, images), f)
    with open(sources["coco"], "w") as f:
        json.dump(_coco_export(night, images), f)
    with open(sources["cvat"], "wb") as f:
        f.write(_cvat_export(night, images))
    out = {}
    for fmt, source in sources.items():
        code, summary, err = _cli("import_review", ["--from", source, "--format", fmt, "--classes", night["ck"],
                                                    "--images-from", f"{tmp}/pkg-{fmt}", "--to", f"{tmp}/ds-{fmt}"])
        assert code == 0, err[-3000:]
        out[fmt] = {"summary": summary, "stderr": err}
    return out


@pytest.mark.parametrize("fmt", ["label-studio", "coco", "cvat"])
def test_an_import_of_the_tool_s_export_equals_the_masks_that_went_in(night, imported, fmt):
    summary = imported[fmt]["summary"]
    assert (summary["imported"], summary["refused"]) == (K, 0), imported[fmt]["stderr"]
    dataset = Location.of(summary["dataset"])
    samples = list_samples(dataset, "train") + list_samples(dataset, "val")
    assert sorted(s["image"] for s in samples) == sorted(i["image_uri"] for i in night["provenance"][fmt]["images"])
    for sample in samples:
        truth = _truth(night, sample["image"])
        if fmt == "cvat":  # CVAT has no void: those pixels come back unpainted, i.e. background
            truth = np.where(truth == 255, 0, truth)
        got = np.asarray(Image.open(Location.of(sample["mask"]).path))
        assert np.array_equal(got, truth), sample["image"]


def test_the_imported_dataset_has_both_splits_and_the_checkpoint_s_classes(imported):
    summary = imported["coco"]["summary"]
    dataset = Location.of(summary["dataset"])
    assert summary["train"] + summary["val"] == K and summary["val"] >= 1
    assert read_class_names(dataset) == CLASS_NAMES
    assert summary["train_with"].startswith(f"python jobs/train.py --data {summary['dataset']} --init-from ")
    report = json.loads(dataset.parent.child("import.json").read_text())
    assert report["problems"] == [] and report["imported"] == K


def test_each_problem_is_one_line_and_the_rest_is_imported(night, tmp_path):
    images = night["provenance"]["label-studio"]["images"]
    tasks = _ls_export(night, images, missing=f"{night['tmp']}/gone/nowhere.jpg")
    tasks[1]["annotations"][0]["result"][0]["value"]["rle"] = _sdk_mask2rle(np.ones((3, 4), bool))  # another size
    tasks[2]["annotations"][0]["result"][0]["value"]["brushlabels"] = ["truck"]  # a class the checkpoint lacks
    tasks[3]["annotations"] = [{"id": 2, "was_cancelled": True, "result": []}]  # skipped by the annotator
    source = tmp_path / "ls.json"
    source.write_text(json.dumps(tasks))
    code, summary, err = _cli("import_review", ["--from", str(source), "--format", "label-studio", "--classes",
                                                night["ck"], "--to", str(tmp_path / "ds")])
    assert code == 0, err
    refused = [line for line in err.splitlines() if line.startswith("refused: ")]
    assert len(refused) == 3, err
    assert "task 100: image" in refused[0] and "nowhere.jpg does not exist" in refused[0]
    assert "task 101: region" in refused[1] and "RGBA has" in refused[1]
    assert "class 'truck' is not one of the 6 classes" in refused[2] and "imported as void (255)" in refused[2]
    assert summary["imported"] == K - 3 and summary["refused"] == 3 and summary["unknown_classes"] == {"truck": 1}


def test_a_mask_of_another_size_than_its_image_is_one_line(night, tmp_path):
    images = night["provenance"]["coco"]["images"][:2]
    coco = _coco_export(night, images)
    coco["images"][0].update(width=40, height=30)
    for a in coco["annotations"]:
        if a["image_id"] == 1:
            a["segmentation"] = coco_mask.encode(np.asfortranarray(np.ones((30, 40), np.uint8)))
            a["segmentation"]["counts"] = a["segmentation"]["counts"].decode()
    source = tmp_path / "coco.json"
    source.write_text(json.dumps(coco))
    code, summary, err = _cli("import_review", ["--from", str(source), "--format", "coco", "--classes", night["ck"],
                                                "--images-from", f"{night['tmp']}/pkg-coco", "--to", str(tmp_path / "ds")])
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if line.startswith("refused: ")]
    assert "mask is 40x30, but image" in line and "is 48x40" in line
    assert summary["imported"] == 1


def test_a_zip_without_labelmap_is_refused_in_one_line(night, tmp_path):
    source = tmp_path / "bad.zip"
    with zipfile.ZipFile(source, "w") as z:
        z.writestr("SegmentationClass/a.png", b"")
    code, _, err = _cli("import_review", ["--from", str(source), "--format", "cvat", "--classes", night["ck"],
                                          "--to", str(tmp_path / "ds")])
    assert "has no labelmap.txt" in one_error(code, err)


def test_names_without_their_package_cannot_be_found_and_say_so(night, tmp_path):
    source = tmp_path / "cvat.zip"
    source.write_bytes(_cvat_export(night, night["provenance"]["cvat"]["images"][:1]))
    code, _, err = _cli("import_review", ["--from", str(source), "--format", "cvat", "--classes", night["ck"],
                                          "--to", str(tmp_path / "ds")])
    assert "pass --images-from the export package" in err and "nothing imported" in one_error(code, err)


def test_an_export_decodes_only_the_chosen_rows_label_maps(night, tmp_path, monkeypatch):
    from pipeline.review import select

    decoded = []
    real = select.decode_label_map
    monkeypatch.setattr(select, "decode_label_map", lambda *a: decoded.append(a) or real(*a))
    code, summary, err = _cli("export_review", ["--output", night["output"], "--to", str(tmp_path / "p"), "--format",
                                                "coco", "--run-date", NIGHT, "--least-confident", "3"])
    assert code == 0 and summary["images"] == 3 and len(decoded) == 3, err


def test_the_loop_runs_on_s3_package_export_and_dataset(night, bucket):
    """Package, the tool's export and the dataset on S3; the images stay where they are (here: local)."""
    package, dataset = f"{bucket}/review/pkg", f"{bucket}/reviewed/ds"
    code, summary, err = _cli("export_review", ["--output", night["output"], "--to", package, "--format", "label-studio",
                                                "--run-date", NIGHT, "--least-confident", "2"])
    assert code == 0 and summary["files"][0] == f"{package}/tasks.json", err
    provenance = json.loads(Location.of(f"{package}/export.json").read_text())
    Location.of(f"{package}/tool-export.json").write_text(json.dumps(_ls_export(night, provenance["images"])))
    code, summary, err = _cli("import_review", ["--from", f"{package}/tool-export.json", "--format", "label-studio",
                                                "--classes", night["ck"], "--to", dataset])
    assert code == 0 and summary["imported"] == 2 and summary["dataset"] == f"{dataset}/manifest.csv", err
    samples = list_samples(Location.of(summary["dataset"]), "train") + list_samples(Location.of(summary["dataset"]), "val")
    for sample in samples:
        mask = np.asarray(Image.open(io.BytesIO(Location.of(sample["mask"]).read_bytes())))
        assert np.array_equal(mask, _truth(night, sample["image"]))


def test_an_image_labeled_on_two_nights_is_exported_from_its_newest_row_only(night, tmp_path):
    import shutil

    from pipeline.testbed import random_checkpoint

    output = str(tmp_path / "out")
    shutil.copytree(night["output"], output)
    other = str(tmp_path / "other.pt")
    random_checkpoint(other, CLASS_NAMES, seed=9)  # another model: every image is labeled again
    code, _, err = run_label_job(["--images", f"{night['data']}/JPEGImages", "--checkpoint", other, "--output", output,
                                  "--run-date", "2026-12-07", *FAST_FLAGS])
    assert code == 0, err[-3000:]
    code, summary, err = _cli("export_review", ["--output", output, "--to", str(tmp_path / "all"), "--format", "coco",
                                                "--where", "width > 0"])
    assert code == 0 and summary["images"] == 10 and summary["runs"] != night["packages"]["coco"]["runs"], err
    # Rows of the first night match, but each image has a newer one: none is exported, not a stale label.
    code, _, err = _cli("export_review", ["--output", output, "--to", str(tmp_path / "old"), "--format", "coco",
                                          "--where", f"run_date = '{NIGHT}'"])
    assert "matches no labels row" in one_error(code, err)
    code, summary, err = _cli("export_review", ["--output", output, "--to", str(tmp_path / "k"), "--format", "coco",
                                                "--least-confident", "3"])
    assert code == 0 and summary["images"] == 3 and len(summary["model_ids"]) == 1, err


def test_one_image_twice_under_two_names_is_refused_and_names_that_spell_one_file_both_import(night, tmp_path):
    images = night["provenance"]["coco"]["images"][:2]
    coco = _coco_export(night, images)
    coco["images"][0]["coco_url"] = images[0]["image_uri"]
    coco["images"][1]["coco_url"] = images[0]["image_uri"]  # the same image, another file_name
    coco["images"].append({**coco["images"][1], "id": 3, "coco_url": images[1]["image_uri"], "file_name": "a b.jpg"})
    coco["images"].append({**coco["images"][1], "id": 4, "coco_url": images[1]["image_uri"].replace(".jpg", "-c.jpg"),
                           "file_name": "a_b.jpg"})
    os.link(images[1]["image_uri"], images[1]["image_uri"].replace(".jpg", "-c.jpg"))
    coco["annotations"] += [{**a, "id": 100 + a["id"], "image_id": n} for n in (3, 4)
                            for a in coco["annotations"] if a["image_id"] == 2]
    source = tmp_path / "coco.json"
    source.write_text(json.dumps(coco))
    code, summary, err = _cli("import_review", ["--from", str(source), "--format", "coco", "--classes", night["ck"],
                                                "--to", str(tmp_path / "ds")])
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if line.startswith("refused: ")]
    assert f"image {images[0]['image_uri']} comes twice" in line
    assert summary["imported"] == 3  # "a b" and "a_b" are two masks, not a clash


def test_an_overwritten_dataset_holds_only_the_new_import(night, tmp_path):
    images = night["provenance"]["coco"]["images"]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps(_coco_export(night, images)))
    second.write_text(json.dumps(_coco_export(night, images[:2])))
    args = ["--format", "coco", "--classes", night["ck"], "--images-from", f"{night['tmp']}/pkg-coco", "--to",
            str(tmp_path / "ds")]
    assert _cli("import_review", ["--from", str(first), *args])[0] == 0
    code, summary, err = _cli("import_review", ["--from", str(second), *args, "--overwrite"])
    assert code == 0 and summary["imported"] == 2, err
    assert len(os.listdir(tmp_path / "ds" / "SegmentationClass")) == 2


def test_an_image_that_is_a_fifo_is_refused_not_waited_for(night, tmp_path):
    fifo = str(tmp_path / "pipe.jpg")
    os.mkfifo(fifo)
    tasks = _ls_export(night, night["provenance"]["label-studio"]["images"][:2], missing=fifo)
    source = tmp_path / "ls.json"
    source.write_text(json.dumps(tasks))
    code, summary, err = _cli("import_review", ["--from", str(source), "--format", "label-studio", "--classes",
                                                night["ck"], "--to", str(tmp_path / "ds")])
    assert code == 0 and summary["imported"] == 1 and "pipe.jpg cannot be read (ValueError: not a regular file)" in err, err
