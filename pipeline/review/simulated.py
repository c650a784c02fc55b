"""Annotators, simulated: a review package's images with their synthetic ground truth, written as each tool exports
its annotations (the demo's review round and the tests). The truth of an image `<id>.jpg` is the synthetic dataset's
`SegmentationClass/<id>.png`.

- CVAT: a Segmentation mask 1.1 zip in CVAT's own label colours (not the VOC ones the package was sent with), and
  black where nothing is painted (CVAT has no void: the synthetic void comes back as background);
- Label Studio: its JSON export, an annotation per task, one brushlabels region per class, void in no region;
- COCO: file names only (no coco_url, as CVAT's and FiftyOne's COCO exports), compressed RLE per class.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import zipfile

import numpy as np
from PIL import Image

from models.voc import VOID_LABEL

from ..storage import Location
from . import brush_rle, coco
from .package import PROVENANCE

# CVAT's default colours for a task's first labels: none is the VOC colour, so an import must go by name.
CVAT_COLOURS = [(0, 0, 0), (250, 50, 83), (36, 179, 83), (61, 61, 245), (255, 204, 51), (184, 61, 245),
                (42, 125, 209), (255, 0, 204), (140, 120, 240), (255, 106, 77)]


def truth_of(data: Location, image_uri: str) -> np.ndarray:
    stem = posixpath.splitext(posixpath.basename(image_uri))[0]
    return np.asarray(Image.open(io.BytesIO(data.child("SegmentationClass", f"{stem}.png").read_bytes())))


def cvat_zip(images: list[tuple[str, np.ndarray]], class_names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("labelmap.txt", "# label:color_rgb:parts:actions\n" + "".join(
            f"{n}:{r},{g},{b}::\n" for n, (r, g, b) in zip(class_names, CVAT_COLOURS, strict=False)))
        z.writestr("ImageSets/Segmentation/default.txt", "".join(f"{name}\n" for name, _ in images))
        for name, truth in images:
            rgb = np.zeros((*truth.shape, 3), np.uint8)
            for c, colour in enumerate(CVAT_COLOURS[:len(class_names)]):
                rgb[truth == c] = colour
            png = io.BytesIO()
            Image.fromarray(rgb, "RGB").save(png, "PNG")
            z.writestr(f"SegmentationClass/{name}.png", png.getvalue())
    return buf.getvalue()


def label_studio_tasks(images: list[tuple[dict, np.ndarray]], class_names: list[str], encode=brush_rle.encode_mask) -> list[dict]:
    """`images` as (the task's data as the package gave it, truth); `encode` a mask -> brush RLE (the tests pass
    label-studio-sdk's own). Label Studio's export keeps each task's data as it was imported."""
    tasks = []
    for n, (data, truth) in enumerate(images):
        h, w = truth.shape
        result = [{"id": f"r{n}-{c}", "type": "brushlabels", "from_name": "label", "to_name": "image",
                   "original_width": w, "original_height": h, "image_rotation": 0, "origin": "manual",
                   "value": {"format": "rle", "rle": encode(truth == c), "brushlabels": [class_names[c]]}}
                  for c in np.unique(truth).tolist() if c != VOID_LABEL]
        tasks.append({"id": 100 + n, "data": dict(data),
                      "annotations": [{"id": 1, "was_cancelled": False, "result": result,
                                       "created_at": "2026-12-07T10:00:00Z"}], "predictions": []})
    return tasks


def coco_instances(images: list[tuple[str, np.ndarray]], class_names: list[str]) -> dict:
    """`images` as (file name, truth)."""
    out = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
    for n, (file_name, truth) in enumerate(images, 1):
        out["images"].append({"id": n, "file_name": file_name, "width": truth.shape[1], "height": truth.shape[0]})
        for c in np.unique(truth).tolist():
            if c != VOID_LABEL:
                out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": n, "category_id": c + 1,
                                           "segmentation": coco.encode(truth == c), "iscrowd": 0})
    return out


def tool_export(fmt: str, package: Location, data: Location) -> Location:
    """The annotators' export of a package, beside it (`tool-export.zip` or `.json`), from the ground truth."""
    provenance = json.loads(package.child(PROVENANCE).read_text())
    names = provenance["class_names"]
    truths = [(i, truth_of(data, i["image_uri"])) for i in provenance["images"]]
    if fmt == "cvat":
        out = package.child("tool-export.zip")
        out.write_bytes(cvat_zip([(i["name"], t) for i, t in truths], names))
    elif fmt == "label-studio":
        out = package.child("tool-export.json")
        data = [{"image": i["image_uri"], "name": i["name"], "run_id": i["run_id"]} for i, _ in truths]
        out.write_text(json.dumps(label_studio_tasks(list(zip(data, (t for _, t in truths), strict=True)), names)))
    else:
        out = package.child("tool-export.json")
        out.write_text(json.dumps(coco_instances([(i["name"] + os.path.splitext(i["image_uri"])[1], t)
                                                  for i, t in truths], names)))
    return out
