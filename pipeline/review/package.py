"""What every review format shares: the package's provenance file, the colours, and what a format's reader hands
the import (one reviewed image at a time, or one problem).

A package is a folder: `export.json` (which output, runs, model and classes it came from, the selection, and each
image's name and URI) beside the format's own files (docs/review.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from models.voc import voc_palette

PROVENANCE = "export.json"
FORMATS = ("cvat", "label-studio", "coco")


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """Class id -> RGB: the VOC colours, as the label maps' PNGs and previews use them."""
    return voc_palette(n)


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass
class Reviewed:
    """One image as the annotators left it: `regions` (H, W) int16 of indices into `names` (-1: no region, which
    imports as void), the image's reference as the export gives it (a URI, or a name to look up), and where in
    the export it came from (for messages)."""
    name: str
    image: str | None
    regions: np.ndarray
    names: list[str]
    where: str


@dataclass
class Problem:
    """Something in the export that cannot be imported: one line, naming it."""
    where: str
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Provenance:
    output: str
    format: str
    class_names: list[str]
    selection: dict
    images: list[dict] = field(default_factory=list)  # {"name", "image_uri", "run_id", "model_id", "run_date", ...}

    def to_json(self) -> str:
        runs = sorted({i["run_id"] for i in self.images})
        models = sorted({i["model_id"] for i in self.images})
        return json.dumps({"output": self.output, "format": self.format, "class_names": self.class_names,
                           "selection": self.selection, "runs": runs, "model_ids": models,
                           "count": len(self.images), "images": self.images}, indent=1)


def compose(height: int, width: int, layers) -> np.ndarray:
    """(H, W) int16 region indices from (index, bool mask) layers in order: a later layer wins where they overlap,
    as when an annotator paints over a region."""
    regions = np.full((height, width), -1, np.int16)
    for index, mask in layers:
        regions[mask] = index
    return regions
