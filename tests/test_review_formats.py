"""The review formats against the tools' own libraries: Label Studio's brush RLE against label-studio-sdk's
encoder and decoder, COCO's against pycocotools, CVAT's zip against its documented layout."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from label_studio_sdk.converter import brush
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.review import brush_rle, coco, cvat, label_studio
from pipeline.review.package import DecodeError, Problem, Reviewed

RNG = np.random.default_rng(0)


def _masks():
    smooth = np.zeros((48, 64), bool)
    smooth[10:40, 5:50] = True
    one = np.zeros((130, 130), bool)
    one[129, 129] = True  # a run of 16,899 x 4 values: longer than 2**16, written in chunks
    return {"random": RNG.random((37, 53)) > 0.5, "smooth": smooth, "empty": np.zeros((20, 30), bool),
            "full": np.ones((20, 30), bool), "one pixel": np.ones((1, 1), bool), "long run": one,
            "exactly 2**16 values": np.zeros((128, 128), bool)}


@pytest.mark.parametrize("name", list(_masks()))
def test_brush_rle_writes_label_studio_sdk_s_bytes_and_reads_them(name):
    mask = _masks()[name]
    ours = brush_rle.encode_mask(mask)
    assert ours == brush.mask2rle(mask.astype(np.uint8) * 255)  # byte for byte
    h, w = mask.shape
    assert np.array_equal(brush.decode_rle(ours).reshape(h, w, 4)[:, :, 3] > 127, mask)
    assert np.array_equal(brush_rle.decode_mask(brush.mask2rle(mask.astype(np.uint8) * 255), w, h), mask)


def test_brush_rle_reads_literal_runs_which_the_tool_may_write():
    values = np.array([1, 2, 3, 3, 3, 9, 9, 4], np.uint8)
    # One literal group of 3 values (flag 0, size index 0, length-1 = 2), a run of 2 x 3, a run of 2 x 9, literal 4.
    codes = np.array([(len(values) << 21) | (7 << 16) | 0x237F, (0 << 13) | (0 << 11) | (2 << 8) | 1, 2, 3,
                      (1 << 13) | (1 << 8) | 3, (1 << 13) | (1 << 8) | 9, 4], np.uint64)
    widths = np.array([53, 14, 8, 8, 14, 14, 14])
    bits = brush_rle._bits(codes, widths)
    rle = np.packbits(np.concatenate([bits, np.zeros(8 - len(bits) % 8, np.uint8)])).tolist()
    assert brush.decode_rle(rle).tolist() == values.tolist()  # the SDK reads the stream as we do
    assert brush_rle.decode(rle).tolist() == values.tolist()


def test_brush_rle_of_another_size_or_cut_short_is_refused():
    rle = brush_rle.encode_mask(np.ones((4, 5), bool))
    with pytest.raises(brush_rle.BrushRLEError, match="codes 80 values, but 6x4 RGBA has 96"):
        brush_rle.decode_mask(rle, 6, 4)
    with pytest.raises(brush_rle.BrushRLEError, match="ends early"):
        brush_rle.decode(rle[:5])


def test_label_studio_task_holds_one_region_per_class_that_decodes_to_the_label_map():
    label = RNG.integers(0, 3, (12, 16)).astype(np.uint8)
    label[:, :4] = 5
    task = label_studio.task("s3://b/a.jpg", "a", label, ["bg", "x", "y", "z", "w", "v"], model_id="m1",
                             run_id="r1", score=0.42)
    assert task["data"]["image"] == "s3://b/a.jpg"
    (prediction,) = task["predictions"]
    assert prediction["model_version"] == "m1" and prediction["score"] == 0.42
    regions = prediction["result"]
    assert sorted(r["value"]["brushlabels"][0] for r in regions) == ["bg", "v", "x", "y"]
    rebuilt = np.full(label.shape, 255, np.uint8)
    for r in regions:
        alpha = brush.decode_rle(r["value"]["rle"]).reshape(12, 16, 4)[:, :, 3]
        rebuilt[alpha > 127] = ["bg", "x", "y", "z", "w", "v"].index(r["value"]["brushlabels"][0])
    assert np.array_equal(rebuilt, label)


def test_label_studio_config_names_every_class_with_its_colour():
    config = label_studio.label_config(["background", "a&b"])
    assert '<Label value="background" background="#000000"/>' in config and 'value="a&amp;b"' in config
    assert '<BrushLabels name="label" toName="image">' in config


def test_coco_rle_is_pycocotools_own():
    mask = _masks()["random"]
    rle = coco.encode(mask)
    assert rle["size"] == [37, 53]
    assert np.array_equal(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)


def _coco_file(images, annotations, categories) -> bytes:
    return json.dumps({"images": images, "annotations": annotations, "categories": categories}).encode()


def test_coco_import_reads_compressed_and_uncompressed_rle_and_polygons():
    a = np.zeros((10, 12), bool)
    a[2:6, 3:9] = True
    b = np.zeros((10, 12), bool)
    b[5:9, 0:4] = True
    uncompressed = {"size": [10, 12], "counts": [int(v) for v in _uncompressed(b)]}
    poly = [[0.0, 0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 2.0]]
    data = _coco_file([{"id": 7, "file_name": "x.jpg", "width": 12, "height": 10}],
                      [{"id": 1, "image_id": 7, "category_id": 3, "segmentation": coco.encode(a)},
                       {"id": 2, "image_id": 7, "category_id": 4, "segmentation": uncompressed},
                       {"id": 3, "image_id": 7, "category_id": 4, "segmentation": poly}],
                      [{"id": 3, "name": "cat"}, {"id": 4, "name": "dog"}])
    (item,) = coco.read_export(data, "instances.json")
    assert isinstance(item, Reviewed) and item.image == "x.jpg" and item.names == ["cat", "dog"]
    polygon = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(poly, 10, 12))).astype(bool)
    expected = np.full((10, 12), -1)
    expected[a] = 0
    expected[b | polygon] = 1
    assert np.array_equal(item.decode(), expected)


def _uncompressed(mask: np.ndarray) -> list[int]:
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist() if flat[0] == 0 else [0, *np.diff(np.concatenate([[0], edges])).tolist()]


def test_coco_rle_of_another_size_than_its_image_is_one_problem_and_the_next_image_imports():
    good, bad = coco.encode(np.ones((10, 12), bool)), coco.encode(np.ones((8, 12), bool))
    data = _coco_file([{"id": 1, "file_name": "a.jpg", "width": 12, "height": 10},
                       {"id": 2, "file_name": "b.jpg", "width": 12, "height": 10}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": bad},
                       {"id": 2, "image_id": 2, "category_id": 1, "segmentation": good}], [{"id": 1, "name": "cat"}])
    first, second = coco.read_export(data, "instances.json")
    assert isinstance(first, Problem) and "RLE is 12x8 (size [8, 12]), but the image is 12x10" in first.line()
    assert isinstance(second, Reviewed) and (second.decode() == 0).all()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _rgb_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


# CVAT's own labelmap.txt for a task with these labels (Segmentation mask 1.1 export).
CVAT_LABELMAP = "# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:250,50,83::\nmy:dog:36,179,83::\n"


def test_cvat_zip_maps_each_colour_through_labelmap_txt():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1, :] = (250, 50, 83)
    rgb[2, :2] = (36, 179, 83)
    data = _zip({"labelmap.txt": CVAT_LABELMAP.encode(), "ImageSets/Segmentation/default.txt": b"sub/frame_1\n",
                 "SegmentationClass/sub/frame_1.png": _rgb_png(rgb)})
    (item,) = cvat.read_export(data, "task.zip")
    assert item.name == "sub/frame_1" and item.names == ["background", "cat", "my:dog"]
    assert item.decode().tolist() == [[0] * 5, [1] * 5, [2, 2, 0, 0, 0], [0] * 5]


def test_cvat_colour_in_no_labelmap_line_is_one_problem():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    data = _zip({"labelmap.txt": CVAT_LABELMAP.encode(), "SegmentationClass/a.png": _rgb_png(rgb),
                 "SegmentationClass/b.png": _rgb_png(np.zeros((2, 2, 3)))})
    first, second = cvat.read_export(data, "task.zip")
    with pytest.raises(DecodeError, match="colour\\(s\\) 1,2,3 are in no line of labelmap.txt"):
        first.decode()
    assert isinstance(second, Reviewed) and (second.decode() == 0).all()


def test_sizes_are_known_before_anything_is_decoded():
    """A mask that declares a huge size is refused by the import (against its image) before it is decoded: the
    readers read only headers and metadata."""
    big = np.zeros((3000, 4000), bool)
    ls = label_studio.task("a.jpg", "a", big.astype(np.uint8), ["bg"], model_id="m", run_id="r", score=None)
    ls["annotations"] = [{"result": ls.pop("predictions")[0]["result"]}]
    ls["annotations"][0]["result"][0].update(original_width=100_000, original_height=100_000)
    (item,) = label_studio.read_export(json.dumps([ls]).encode(), "x.json")
    assert (item.width, item.height) == (100_000, 100_000)
    with pytest.raises(DecodeError, match="but 100000x100000 RGBA has"):  # the header is checked, nothing allocated
        item.decode()
    (item,) = coco.read_export(_coco_file([{"id": 1, "file_name": "a.jpg", "width": 100_000, "height": 100_000}], [],
                                          [{"id": 1, "name": "cat"}]), "i.json")
    assert (item.width, item.height) == (100_000, 100_000)
    png = io.BytesIO()
    Image.new("P", (12_000, 12_000)).save(png, "PNG")
    (item,) = cvat.read_export(_zip({"labelmap.txt": CVAT_LABELMAP.encode(), "SegmentationClass/a.png": png.getvalue()}),
                               "t.zip")
    assert (item.width, item.height) == (12_000, 12_000)


@pytest.mark.parametrize("polygon", [[[1e300, 1e300, -1e300, 5, 6, 7]], [[1, 2]], [[1, 2, 3]], [], None, "x",
                                     [[0, 0, 1, 0, float("nan"), 1]]])
def test_a_polygon_pycocotools_would_choke_on_is_one_problem(polygon):
    data = _coco_file([{"id": 1, "file_name": "a.jpg", "width": 12, "height": 10}],
                      [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygon}], [{"id": 1, "name": "cat"}])
    (item,) = coco.read_export(json.dumps(json.loads(data), allow_nan=True).encode(), "i.json")
    assert isinstance(item, Problem) and "segmentation is neither RLE nor polygons" in item.line()


def test_two_classes_of_one_colour_are_refused():
    with pytest.raises(cvat.CvatExportError, match="'b' has the colour 1,2,3 of 'a'"):
        cvat.parse_labelmap("a:1,2,3::\nb:1,2,3::\n", "labelmap.txt")


def test_cvat_zip_without_labelmap_is_refused_in_one_line():
    with pytest.raises(cvat.CvatExportError, match="has no labelmap.txt: export the task as 'Segmentation mask 1.1'"):
        list(cvat.read_export(_zip({"SegmentationClass/a.png": _rgb_png(np.zeros((2, 2, 3)))}), "task.zip"))
    with pytest.raises(cvat.CvatExportError, match="is not a zip file"):
        list(cvat.read_export(b"not a zip", "task.zip"))


def test_cvat_writer_s_zip_reads_back_as_written(tmp_path):
    label = RNG.integers(0, 3, (6, 7)).astype(np.uint8)
    writer = cvat.CvatWriter(str(tmp_path / "a.zip"), ["background", "cat", "dog"])
    writer.add("x/y", label)
    writer.close()
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        assert z.read("ImageSets/Segmentation/default.txt") == b"x/y\n"
        assert z.read("labelmap.txt").decode().splitlines()[1:] == ["background:0,0,0::", "cat:128,0,0::", "dog:0,128,0::"]
        colours = np.asarray(Image.open(io.BytesIO(z.read("SegmentationClass/x/y.png"))).convert("RGB"))
    assert np.array_equal(colours[label == 1], np.tile([128, 0, 0], ((label == 1).sum(), 1)))
    (item,) = cvat.read_export((tmp_path / "a.zip").read_bytes(), "a.zip")
    assert np.array_equal(item.decode(), label)


@pytest.mark.parametrize("task", [None, "x", 3, {"data": None}, {"data": "x"}, {"data": {"image": "a.jpg"}, "annotations": "x"},
                                  {"data": {"image": "a.jpg"}, "annotations": [{"result": [{"type": "brushlabels", "value": "x"}]}]},
                                  {"data": {"image": "a.jpg"}, "annotations": [{"result": "x"}]}])
def test_a_malformed_label_studio_task_is_one_problem_and_the_next_task_imports(task):
    good = label_studio.task("b.jpg", "b", np.zeros((2, 3), np.uint8), ["bg"], model_id="m", run_id="r", score=None)
    good["annotations"] = [{"result": good.pop("predictions")[0]["result"]}]
    first, second = label_studio.read_export(json.dumps([task, good]).encode(), "export.json")
    assert isinstance(first, Problem) and isinstance(second, Reviewed) and second.image == "b.jpg"


@pytest.mark.parametrize("change", ["image not an object", "annotation not an object", "image_id null", "width text"])
def test_a_malformed_coco_entry_is_one_problem_and_the_rest_imports(change):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 3, "height": 2},
                       {"id": 2, "file_name": "b.jpg", "width": 3, "height": 2}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": coco_rle(np.ones((2, 3), bool))},
                            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": coco_rle(np.ones((2, 3), bool))}],
            "categories": [{"id": 1, "name": "cat"}]}
    if change == "image not an object":
        coco["images"][0] = "a.jpg"
    elif change == "annotation not an object":
        coco["annotations"][0] = None
    elif change == "image_id null":
        coco["annotations"][0]["image_id"] = None
    else:
        coco["images"][0]["width"] = "wide"
    found = list(coco_module_read(coco))
    assert any(isinstance(f, Problem) for f in found)
    assert [f.image for f in found if isinstance(f, Reviewed)][-1] == "b.jpg"


def coco_rle(mask: np.ndarray) -> dict:
    return coco.encode(mask)


def coco_module_read(data: dict):
    return coco.read_export(json.dumps(data).encode(), "instances.json")


def test_package_names_are_paths_below_the_images_common_folder():
    from pipeline.review.select import relative_names

    assert relative_names(["/data/a/x.jpg", "/data/b/x.jpg"]) == {"/data/a/x.jpg": "a/x", "/data/b/x.jpg": "b/x"}
    assert relative_names(["s3://bk/cam1/x.jpg", "s3://bk/cam2/y.png"]) == {"s3://bk/cam1/x.jpg": "cam1/x",
                                                                            "s3://bk/cam2/y.png": "cam2/y"}
    assert relative_names(["/d/x.jpg", "/d/x.png"]) == {"/d/x.jpg": "x.jpg", "/d/x.png": "x.png"}
