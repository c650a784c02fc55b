"""COCO instances JSON with RLE masks (pycocotools), both ways.

Export: `instances.json`: one category per class (id = class id + 1, as COCO keeps 0 for "no category"), one
image per labeled image (`file_name` its name in the package with the extension, `coco_url` its URI), and one
annotation per (image, class present) whose `segmentation` is compressed RLE, `iscrowd` 0 as in COCO-Stuff's
semantic masks. FiftyOne, Datumaro, CVAT (COCO 1.0) and most trainers read it.

Import: any instances JSON: RLE (compressed or not) or polygons, categories matched by name. Where annotations
overlap the later one wins; pixels in none import as void (255).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

from ..errors import JobError
from .package import DecodeError, Problem, Reviewed, compose, declared_side

INSTANCES = "instances.json"


class CocoExportError(JobError):
    """A COCO file that cannot be imported at all."""


def encode(mask: np.ndarray) -> dict:
    """A (H, W) bool mask -> COCO compressed RLE with `counts` as text (JSON-ready)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


class CocoWriter:
    """Streams images and annotations to two scratch files and joins them into instances.json on close."""

    def __init__(self, path: str, class_names: list[str], info: dict):
        self.path, self.class_names, self.info = path, class_names, info
        self.scratch = tempfile.mkdtemp(prefix="coco-", dir=os.path.dirname(path))
        self.images = open(os.path.join(self.scratch, "images"), "w")
        self.annotations = open(os.path.join(self.scratch, "annotations"), "w")
        self.image_id = self.annotation_id = 0

    def add(self, name: str, label: np.ndarray, *, image_uri: str, **_) -> None:
        self.image_id += 1
        height, width = label.shape
        ext = os.path.splitext(image_uri)[1]
        self.images.write(("," if self.image_id > 1 else "") + json.dumps(
            {"id": self.image_id, "file_name": name + ext, "coco_url": image_uri, "width": width, "height": height}))
        for class_id in np.unique(label).tolist():
            mask = label == class_id
            self.annotation_id += 1
            self.annotations.write(("," if self.annotation_id > 1 else "") + json.dumps(
                {"id": self.annotation_id, "image_id": self.image_id, "category_id": class_id + 1,
                 "segmentation": encode(mask), "area": int(mask.sum()), "bbox": _bbox(mask), "iscrowd": 0}))

    def close(self) -> list[str]:
        self.images.close()
        self.annotations.close()
        categories = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(self.class_names)]
        with open(self.path, "w") as out:
            out.write(json.dumps({"info": self.info, "licenses": [], "categories": categories})[:-1])
            for key in ("images", "annotations"):
                out.write(f', "{key}": [')
                with open(os.path.join(self.scratch, key)) as part:
                    shutil.copyfileobj(part, out)
                out.write("]")
            out.write("}\n")
        shutil.rmtree(self.scratch, ignore_errors=True)
        return [self.path]


def read_export(data: bytes, where: str) -> Iterator[Reviewed | Problem]:
    """Each image of an instances JSON as a Reviewed image (`image` its coco_url, else its file_name), or a
    Problem."""
    try:
        coco = json.loads(data)
        categories = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
        images = coco["images"]
        annotations = coco.get("annotations") or []
        if not isinstance(images, list) or not isinstance(annotations, list):
            raise TypeError("images and annotations must be lists")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise CocoExportError(f"{where} is not a COCO instances file ({type(e).__name__}: {e})") from None
    by_image: dict = {}
    for number, a in enumerate(annotations):
        if not isinstance(a, dict) or not isinstance(a.get("image_id"), (int, str)):
            yield Problem(f"{where} annotation {number}", "is not an object with an image_id: left out")
            continue
        by_image.setdefault(a["image_id"], []).append(a)
    names = list(dict.fromkeys(categories.values()))
    for number, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)):
            yield Problem(f"{where} image {number}", "is not an object with an id")
            continue
        here = f"{where} image {image.get('id')} ({image.get('file_name')})"
        try:
            yield _image(image, by_image.get(image["id"], []), categories, names, here)
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
            yield Problem(here, f"cannot be read ({type(e).__name__}: {e})")


def _segmentation(seg, height: int, width: int, what: str):
    """An annotation's segmentation as pycocotools' RLE input, checked first: pycocotools takes malformed polygons
    with a bare Exception or, for huge coordinates, a segmentation fault."""
    if isinstance(seg, dict):
        size = seg.get("size")
        if not isinstance(size, list) or [v for v in size if isinstance(v, int)] != [height, width]:
            said = f"{size[1]}x{size[0]} " if isinstance(size, list) and len(size) == 2 else ""
            raise ValueError(f"{what}'s RLE is {said}(size {size}), but the image is {width}x{height}")
        counts = seg.get("counts")
        if isinstance(counts, str):
            return {"size": size, "counts": counts.encode("ascii")}
        if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) \
                and sum(counts) == height * width:
            return ("uncompressed", seg)
        raise ValueError(f"{what}'s RLE counts are neither COCO's text nor {height * width} pixels of run lengths")
    bound = 4 * max(height, width)
    if not isinstance(seg, list) or not seg or not all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= bound
                    for v in p) for p in seg):
        raise ValueError(f"{what}'s segmentation is neither RLE nor polygons (lists of at least 3 x, y points within "
                         f"the image's reach)")
    return ("polygons", seg)


def _image(image: dict, annotations: list[dict], categories: dict[int, str], names: list[str], here: str):
    from pycocotools import mask as coco_mask

    height, width = declared_side(image.get("height"), "height"), declared_side(image.get("width"), "width")
    layers = []
    for a in annotations:
        what = f"annotation {a.get('id')}"
        if a.get("category_id") not in categories:
            return Problem(here, f"{what} has category {a.get('category_id')}, which the file's categories do not list")
        layers.append((names.index(categories[a["category_id"]]), _segmentation(a.get("segmentation"), height, width, what)))
    ref = image.get("coco_url") or image.get("file_name")
    if not isinstance(ref, str) or not ref:
        return Problem(here, "has neither a coco_url nor a file_name")
    name = image.get("file_name") if isinstance(image.get("file_name"), str) and image.get("file_name") else ref

    def mask(index: int, seg) -> np.ndarray:
        try:
            if isinstance(seg, dict):
                rle = seg
            elif seg[0] == "uncompressed":
                rle = coco_mask.frPyObjects(seg[1], height, width)
            else:
                rle = coco_mask.merge(coco_mask.frPyObjects(seg[1], height, width))
            return coco_mask.decode(rle).astype(bool)
        except Exception as e:  # noqa: BLE001 - pycocotools raises bare Exceptions: one image's problem
            raise DecodeError(f"a mask of class {names[index]!r} does not decode ({type(e).__name__}: {e})") from None

    def decode() -> np.ndarray:
        return compose(height, width, ((index, mask(index, seg)) for index, seg in layers))

    return Reviewed(os.path.splitext(name)[0], ref, width, height, names, here, decode)
