"""What every review format shares: the package's provenance file, the colours, and what a format's reader hands
the import (one reviewed image at a time, or one problem).

A package is a folder: `export.json` (which output, runs, model and classes it came from, the selection, and each
image's name and URI) beside the format's own files (docs/review.md).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from models.voc import voc_palette

PROVENANCE = "export.json"
FORMATS = ("cvat", "label-studio", "coco")
MAX_SIDE = 1 << 20  # a declared width or height beyond this is not an image


def class_colours(n: int) -> list[tuple[int, int, int]]:
    """Class id -> RGB: the VOC colours, as the label maps' PNGs and previews use them."""
    return voc_palette(n)


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


class DecodeError(ValueError):
    """A reviewed image's mask that cannot be decoded (its message is the refused line's)."""


@dataclass
class Reviewed:
    """One image as the annotators left it, not yet decoded: the image's reference as the export gives it (a URI,
    or a name to look up), the size its masks declare, the class names its regions use, and where in the export it
    came from (for messages). `decode()` gives (H, W) int16 indices into `names` (-1: no region, which imports as
    void) or raises DecodeError; the import calls it only once the declared size is the image's, so a file that
    declares a huge mask costs nothing."""
    name: str
    image: str | None
    width: int
    height: int
    names: list[str]
    where: str
    decode: Callable[[], np.ndarray]


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


def declared_side(value, what: str) -> int:
    """A width or height as an export declares it: a whole number of pixels in 1..MAX_SIDE, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
        raise ValueError(f"{what} {value!r} is not a whole number of pixels in 1..{MAX_SIDE}")
    return value


def compose(height: int, width: int, layers) -> np.ndarray:
    """(H, W) int16 region indices from (index, bool mask) layers in order: a later layer wins where they overlap,
    as when an annotator paints over a region."""
    regions = np.full((height, width), -1, np.int16)
    for index, mask in layers:
        regions[mask] = index
    return regions
