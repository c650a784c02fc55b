"""The import: an annotation tool's export -> a dataset that jobs/train.py reads (docs/review.md).

    DATASET/manifest.csv                 image (the image's URI, where it already is), mask, split (train / val)
    DATASET/SegmentationClass/<id>.png   class ids as a palette PNG, 255 = void (no region, or a class not named)
    DATASET/classes.txt                  the classes, line N = class id N-1 (as --classes gave them)
    DATASET/import.json                  where it came from, the counts, and every problem's line

Classes are matched by name. Each problem (a class the checkpoint does not have, a mask of another size than its
image, an image that is not there, a region that does not decode) is one line naming it; every other image is
imported. The images stay where they are: the manifest names them.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.checkpoint import read_checkpoint_payload
from models.voc import VOID_LABEL

from ..dataset_formats import list_images, parse_class_names
from ..errors import JobError, one_line
from ..storage import Location
from ..synthetic import encode_mask, split_ids
from . import coco, cvat, label_studio
from .package import FORMATS, PROVENANCE, DecodeError, Problem, Reviewed

MANIFEST = "manifest.csv"
MASKS = "SegmentationClass"
REPORT = "import.json"
READERS: dict[str, Callable[[bytes, str], Iterator[Reviewed | Problem]]] = {
    "cvat": cvat.read_export, "label-studio": label_studio.read_export, "coco": coco.read_export}


@dataclass(frozen=True)
class ImportConfig:
    source: str                      # the tool's export: a zip (CVAT) or a JSON file
    format: str
    classes: str                     # a checkpoint, or a classes.txt
    to: str                          # the dataset folder
    images_from: str | None = None   # the export package (its export.json names each image), or a folder of images
    val_fraction: float = 0.2
    seed: int = 0
    overwrite: bool = False

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise JobError(f"--format {self.format!r}: use one of {', '.join(FORMATS)}")
        if not 0 <= self.val_fraction < 1:
            raise JobError(f"--val-fraction {self.val_fraction} must be in [0, 1)")


def read_classes(where: str) -> list[str]:
    """Class names by id from a classes.txt (one per line) or a checkpoint."""
    if where.lower().endswith(".txt"):
        location = Location.of(where)
        location.check_exists("classes file")
        return parse_class_names(location.read_bytes(), location.uri)
    payload, _ = read_checkpoint_payload(where)
    return list(payload["class_names"])


class ImageLookup:
    """An image reference from an export -> its URI: a URI or absolute path as it is; a name through the export
    package's export.json, or by its path (without extension) below a folder of images."""

    def __init__(self, images_from: str | None):
        self.by_name: dict[str, str] = {}
        self.source = images_from
        if images_from is None:
            return
        root = Location.of(images_from)
        provenance = root.child(PROVENANCE)
        if provenance.exists():
            self.by_name = {i["name"]: i["image_uri"] for i in json.loads(provenance.read_text())["images"]}
        else:
            for info in list_images(root):
                rel = posixpath.relpath(root.path_of(info.uri), root.path)
                self.by_name[posixpath.splitext(rel)[0]] = info.uri
                self.by_name[rel] = info.uri

    def resolve(self, ref, name) -> str | None:
        ref = ref if isinstance(ref, str) else None
        name = name if isinstance(name, str) else None
        for key in (name, ref):
            if key and key in self.by_name:
                return self.by_name[key]
        if ref and ("://" in ref or ref.startswith("/")):
            return ref
        if ref and posixpath.splitext(ref)[0] in self.by_name:
            return self.by_name[posixpath.splitext(ref)[0]]
        return None


def image_size(uri: str) -> tuple[int, int]:
    """(width, height) from the image's header (one small read); FileNotFoundError when it is not there. A local
    path must be a regular file (a FIFO would block the read for ever)."""
    location = Location.of(uri)
    if location.is_local:
        mode = os.stat(location.path).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError("not a regular file")
    with location.fs.open(location.path, "rb", block_size=1 << 16) as f:
        with Image.open(f) as image:
            return image.size


def safe_id(name: str) -> str:
    """A mask file name for an image name (its folders joined by '__')."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("/", "__"))
    return keep.lstrip(".") or "image"


def import_review(cfg: ImportConfig, say: Callable[[str], None]) -> dict:
    """Read the export, write the dataset; `say` gets one line per problem. Returns the summary."""
    cfg.validate()
    class_names = read_classes(cfg.classes)
    class_id = {name: i for i, name in enumerate(class_names)}
    source = Location.of(cfg.source)
    source.check_exists("export")
    to = Location.writable(cfg.to)
    if to.child(MANIFEST).exists() or to.child(MASKS).exists():
        if not cfg.overwrite:
            raise JobError(f"{to.uri} already holds an imported dataset ({MANIFEST}): choose another --to, or --overwrite")
        # The manifest first: a dataset that lost it is visibly incomplete, never old masks under a new manifest.
        for old in (to.child(MANIFEST), to.child(REPORT), to.child(MASKS)):
            if old.exists():
                old.remove(recursive=True)
    lookup = ImageLookup(cfg.images_from)
    problems: list[str] = []
    unknown: dict[str, int] = {}
    rows: dict[str, dict] = {}
    seen: set[str] = set()
    void = 0

    def refuse(line: str) -> None:
        problems.append(line)
        say(f"refused: {line}")

    for item in READERS[cfg.format](source.read_bytes(), source.uri):
        if isinstance(item, Problem):
            refuse(item.line())
            continue
        uri = lookup.resolve(item.image, item.name)
        if uri is None:
            refuse(f"{item.where}: image {item.image or item.name!r} is neither a URI nor a name "
                   f"{'in ' + lookup.source if lookup.source else 'known (pass --images-from the export package)'}")
            continue
        if uri in seen:
            refuse(f"{item.where}: image {uri} comes twice in the export; the first is imported")
            continue
        try:
            width, height = image_size(uri)
        except FileNotFoundError:
            refuse(f"{item.where}: image {uri} does not exist")
            continue
        except Exception as e:  # noqa: BLE001 - one image; the rest import
            refuse(f"{item.where}: image {uri} cannot be read ({one_line(e)})")
            continue
        if (item.width, item.height) != (width, height):  # before decoding: a declared size costs nothing
            refuse(f"{item.where}: mask is {item.width}x{item.height}, but image {uri} is {width}x{height}")
            continue
        try:
            regions = item.decode()
        except DecodeError as e:
            refuse(f"{item.where}: {e}")
            continue
        seen.add(uri)
        mask_id = safe_id(item.name)
        if mask_id in rows:  # two names that spell one file name ("a b" and "a_b")
            mask_id = f"{mask_id}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"
        lut = np.full(len(item.names) + 1, VOID_LABEL, np.uint8)  # index -1 (no region) is the last entry
        for index, name in enumerate(item.names):
            if name in class_id:
                lut[index] = class_id[name]
            elif np.any(regions == index):
                unknown[name] = unknown.get(name, 0) + 1
        mask = lut[regions]
        void += int((mask == VOID_LABEL).sum())
        to.child(MASKS, f"{mask_id}.png").write_bytes(encode_mask(mask))
        rows[mask_id] = {"image": uri, "mask": f"{MASKS}/{mask_id}.png"}
    for name, count in sorted(unknown.items()):
        refuse(f"{source.uri}: class {name!r} is not one of the {len(class_names)} classes of {cfg.classes}: its "
               f"pixels in {count} mask(s) were imported as void ({VOID_LABEL})")
    if not rows:
        raise JobError(f"nothing imported from {source.uri}: {len(problems)} problem(s), each on a line above"
                       if problems else f"nothing imported from {source.uri}: it holds no reviewed image (no "
                                        "annotation that was not cancelled)")
    train, val = split_ids(sorted(rows), cfg.seed, cfg.val_fraction)
    for ids, split in ((train, "train"), (val, "val")):
        for i in ids:
            rows[i]["split"] = split
    lines = ["image,mask,split"] + [f"{_csv(r['image'])},{r['mask']},{r['split']}" for _, r in sorted(rows.items())]
    to.child("classes.txt").write_text("".join(f"{n}\n" for n in class_names))
    summary = {"dataset": to.child(MANIFEST).uri, "format": cfg.format, "source": source.uri, "imported": len(rows),
               "train": len(train), "val": len(val), "refused": len(problems),
               "unknown_classes": unknown, "void_pixels": void, "classes": len(class_names)}
    to.child(REPORT).write_text(json.dumps({**summary, "classes_from": cfg.classes, "problems": problems}, indent=1))
    to.child(MANIFEST).write_text("\n".join(lines) + "\n")  # last: a dataset with its manifest is whole
    start = "" if cfg.classes.lower().endswith(".txt") else f" --init-from {cfg.classes}"
    summary["train_with"] = f"python jobs/train.py --data {to.child(MANIFEST).uri}{start} --num-classes {len(class_names)} ..."
    return summary


def _csv(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value
