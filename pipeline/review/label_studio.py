"""Label Studio tasks JSON, both ways.

Export: one task per image, `data.image` its URI as the labels table gives it (s3:// needs the project's S3
source storage; a local path needs Label Studio's local-files serving), and one prediction whose `result` holds one
`brushlabels` region per class present, in Label Studio's brush RLE (`brush_rle`). `model_version` is the
model id, `score` the image's mean confidence. `label_config.xml` beside it is the labeling interface those
regions belong to (`from_name="label"`, `to_name="image"`).

Import: the JSON export of the project (Export > JSON). Each task's newest annotation that was not cancelled is
read; a task nobody annotated is left out and counted. Pixels in no region import as void (255).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from xml.sax.saxutils import quoteattr

import numpy as np

from ..errors import JobError
from .brush_rle import BrushRLEError, decode_mask, encode_mask
from .package import DecodeError, Problem, Reviewed, class_colours, compose, declared_side, hex_colour

TASKS = "tasks.json"
CONFIG = "label_config.xml"
FROM_NAME, TO_NAME = "label", "image"


class LabelStudioExportError(JobError):
    """A Label Studio export that cannot be imported at all (not JSON, not a list of tasks)."""


def label_config(class_names: list[str]) -> str:
    labels = "\n".join(f"    <Label value={quoteattr(name)} background={quoteattr(hex_colour(rgb))}/>"
                       for name, rgb in zip(class_names, class_colours(len(class_names)), strict=True))
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>\n')


def task(image_uri: str, name: str, label: np.ndarray, class_names: list[str], *, model_id: str, run_id: str,
         score: float | None) -> dict:
    """One image's task with its pre-annotation."""
    height, width = label.shape
    result = []
    for class_id in np.unique(label).tolist():
        result.append({"id": f"{name}-{class_id}"[-64:], "type": "brushlabels", "from_name": FROM_NAME,
                       "to_name": TO_NAME, "original_width": width, "original_height": height, "image_rotation": 0,
                       "value": {"format": "rle", "rle": encode_mask(label == class_id),
                                 "brushlabels": [class_names[class_id]]}})
    prediction = {"model_version": model_id, "result": result}
    if score is not None:
        prediction["score"] = score
    return {"data": {TO_NAME: image_uri, "name": name, "run_id": run_id}, "predictions": [prediction]}


class LabelStudioWriter:
    """Writes tasks.json as images come (one task's JSON at a time) and label_config.xml."""

    def __init__(self, path: str, config_path: str, class_names: list[str]):
        self.path, self.config_path, self.class_names = path, config_path, class_names
        self.file = open(path, "w")
        self.file.write("[")
        self.count = 0

    def add(self, name: str, label: np.ndarray, *, image_uri: str, model_id: str, run_id: str,
            score: float | None, **_) -> None:
        self.file.write(("," if self.count else "") + "\n" + json.dumps(task(
            image_uri, name, label, self.class_names, model_id=model_id, run_id=run_id, score=score)))
        self.count += 1

    def close(self) -> list[str]:
        self.file.write("\n]\n")
        self.file.close()
        with open(self.config_path, "w") as f:
            f.write(label_config(self.class_names))
        return [self.path, self.config_path]


def read_export(data: bytes, where: str) -> Iterator[Reviewed | Problem]:
    """Each annotated task as a Reviewed image (`image` is its data.image URI), or a Problem."""
    try:
        tasks = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabelStudioExportError(f"{where} is not JSON ({e}): export the project as JSON") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise LabelStudioExportError(f"{where} holds a {type(tasks).__name__}, not a list of tasks")
    for number, item in enumerate(tasks):
        here = f"{where} task {item.get('id', number) if isinstance(item, dict) else number}"
        try:
            found = _task(item, here)
        except (AttributeError, KeyError, TypeError, ValueError, BrushRLEError) as e:
            found = Problem(here, str(e) if isinstance(e, (ValueError, BrushRLEError)) else f"malformed task ({e!r})")
        if found is not None:
            yield found


def _task(item: dict, here: str) -> Reviewed | Problem | None:
    data = item.get("data")
    image = data.get(TO_NAME) if isinstance(data, dict) else None
    if not isinstance(image, str) or not image:
        return Problem(here, f"task has no data.{TO_NAME}")
    annotations = item.get("annotations") or []
    if not isinstance(annotations, list):
        return Problem(here, "its annotations are not a list")
    done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None  # nobody reviewed it: neither imported nor a problem
    annotation = max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("id") or "")))
    names: list[str] = []
    regions = []  # (rle, class index): decoded only once the import has seen the image's own size
    size = None
    for region in annotation.get("result") or []:
        if not isinstance(region, dict) or str(region.get("type", "")).lower() != "brushlabels":
            continue
        value = region["value"]
        if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
            return Problem(here, f"region {region.get('id')} is not brush RLE (format {value.get('format')!r})")
        width = declared_side(region.get("original_width"), "original_width")
        height = declared_side(region.get("original_height"), "original_height")
        if size is not None and size != (width, height):
            return Problem(here, f"its regions disagree on the image size ({size[0]}x{size[1]} and {width}x{height})")
        size = (width, height)
        labels = value.get("brushlabels")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            return Problem(here, f"region {region.get('id')}'s brushlabels {labels!r} is not a list of class names")
        for label in labels:
            if label not in names:
                names.append(label)
            regions.append((value["rle"], names.index(label), region.get("id")))
    if size is None:
        return Problem(here, "its annotation has no brushlabels region")
    name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else image

    def decode() -> np.ndarray:
        layers = []
        for rle, index, region_id in regions:
            try:
                layers.append((index, decode_mask(rle, size[0], size[1])))
            except BrushRLEError as e:
                raise DecodeError(f"region {region_id}: {e}") from None
        return compose(size[1], size[0], layers)

    return Reviewed(name, image, size[0], size[1], names, here, decode)
