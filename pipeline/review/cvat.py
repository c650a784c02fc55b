"""CVAT's "Segmentation mask 1.1" zip, both ways.

    labelmap.txt                          # label:color_rgb:parts:actions, one line per class
    ImageSets/Segmentation/default.txt    # the image names, one per line (no extension)
    SegmentationClass/<name>.png          # each pixel in its class's colour

CVAT imports the zip as a task's annotations (Actions > Upload annotations > Segmentation mask 1.1) and exports
the same layout (SegmentationObject/, the instance masks, is written by CVAT and ignored here). Pixels CVAT leaves
unpainted come out black: the background class's colour when labelmap.txt has a background at 0,0,0, otherwise
no class (void, 255).
"""
from __future__ import annotations

import functools
import io
import posixpath
import zipfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ..errors import JobError
from .package import DecodeError, Problem, Reviewed, class_colours

LABELMAP = "labelmap.txt"
SPLIT_FILE = "ImageSets/Segmentation/default.txt"
MASKS = "SegmentationClass"
ZIP_NAME = "annotations.zip"
MAX_TEXT = 16 << 20  # labelmap.txt and the image list: a zip member that unpacks to more is no CVAT export


class CvatExportError(JobError):
    """A CVAT zip that cannot be imported at all (not a zip, no labelmap.txt)."""


class CvatWriter:
    """Writes the zip as images come, one PNG at a time; the image list is written when it closes."""

    def __init__(self, path: str, class_names: list[str]):
        self.path = path
        self.colours = class_colours(len(class_names))
        self.zip = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED)
        lines = ["# label:color_rgb:parts:actions"]
        lines += [f"{name}:{r},{g},{b}::" for name, (r, g, b) in zip(class_names, self.colours, strict=True)]
        self.zip.writestr(LABELMAP, "\n".join(lines) + "\n")
        self.palette = [v for rgb in class_colours(256) for v in rgb]
        self.names: list[str] = []

    def add(self, name: str, label: np.ndarray, **_) -> None:
        image = Image.fromarray(np.ascontiguousarray(label, np.uint8), "L")
        image.putpalette(self.palette)  # a palette PNG: CVAT reads it as the colours
        buf = io.BytesIO()
        image.save(buf, "PNG")
        self.zip.writestr(f"{MASKS}/{name}.png", buf.getvalue())
        self.names.append(name)

    def close(self) -> list[str]:
        self.zip.writestr(SPLIT_FILE, "".join(f"{n}\n" for n in self.names))
        self.zip.close()
        return [self.path]


def parse_labelmap(text: str, where: str) -> tuple[list[str], list[tuple[int, int, int]]]:
    """labelmap.txt -> (names, colours); CvatExportError naming the line for one that does not parse."""
    names, colours = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\n").split(":")
        if len(fields) < 2:
            raise CvatExportError(f"{where} line {number}: {line!r} is not label:r,g,b:parts:actions")
        name, colour = (":".join(fields[:-3]), fields[-3]) if len(fields) >= 4 else (fields[0], fields[1])
        try:
            rgb = tuple(int(v) for v in colour.split(","))
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
            raise CvatExportError(f"{where} line {number}: colour {colour!r} of {name!r} is not r,g,b")
        if rgb in colours:
            raise CvatExportError(f"{where} line {number}: {name.strip()!r} has the colour {colour} of "
                                  f"{names[colours.index(rgb)]!r}: their pixels could not be told apart")
        names.append(name.strip())
        colours.append(rgb)
    if not names:
        raise CvatExportError(f"{where} names no label")
    return names, colours


def read_export(data: bytes, where: str) -> Iterator[Reviewed | Problem]:
    """Each mask of a CVAT zip as a Reviewed image (its `image` is the name, looked up by the import), or a
    Problem; CvatExportError when the zip itself cannot be read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise CvatExportError(f"{where} is not a zip file (CVAT exports Segmentation mask 1.1 as a zip)") from None
    members = {posixpath.normpath(n): n for n in archive.namelist() if not n.endswith("/")}
    root = _root(members)
    if root is None:
        raise CvatExportError(f"{where} has no {LABELMAP}: export the task as 'Segmentation mask 1.1' (the zip's "
                              f"{LABELMAP} names each class's colour)")
    text = _text(archive, members[posixpath.join(root, LABELMAP)], f"{where}/{LABELMAP}")
    names, colours = parse_labelmap(text, f"{where}/{LABELMAP}")
    codes = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
    order = np.argsort(codes, kind="stable")
    masks = posixpath.join(root, MASKS) if root else MASKS
    listed = posixpath.join(root, SPLIT_FILE) if root else SPLIT_FILE
    if listed in members:
        image_names = [n.strip() for n in _text(archive, members[listed], f"{where}/{SPLIT_FILE}").splitlines() if n.strip()]
    else:
        image_names = sorted(posixpath.splitext(posixpath.relpath(m, masks))[0] for m in members
                             if m.startswith(masks + "/") and m.lower().endswith(".png"))
    if not image_names:
        raise CvatExportError(f"{where} holds no mask: {LABELMAP} is at '{root or '.'}', so its masks belong in "
                              f"{masks}/ (Segmentation mask 1.1)")
    for name in image_names:
        member = posixpath.join(masks, f"{name}.png")
        here = f"{where}/{member}"
        if member not in members:
            yield Problem(here, f"image {name!r} is listed in {SPLIT_FILE} but has no mask")
            continue
        try:
            with Image.open(io.BytesIO(archive.read(members[member]))) as header:  # the size, nothing decoded yet
                width, height = header.size
        except Exception as e:  # noqa: BLE001 - one broken mask; the rest import
            yield Problem(here, f"mask cannot be read ({type(e).__name__}: {e})")
            continue
        yield Reviewed(name, name, width, height, names, here,
                       functools.partial(_decode, archive, members[member], codes, order))


def _decode(archive: zipfile.ZipFile, member: str, codes: np.ndarray, order: np.ndarray) -> np.ndarray:
    try:
        rgb = np.asarray(Image.open(io.BytesIO(archive.read(member))).convert("RGB"), np.uint32)
    except Exception as e:  # noqa: BLE001 - one broken mask; the rest import
        raise DecodeError(f"mask cannot be read ({type(e).__name__}: {e})") from None
    pixel = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    sorted_codes = codes[order]
    at = np.clip(np.searchsorted(sorted_codes, pixel), 0, len(codes) - 1)
    known = sorted_codes[at] == pixel
    if known.all():
        return order[at].astype(np.int16)
    if (pixel[~known] == 0).all():  # unpainted, and labelmap.txt has no class at 0,0,0: void
        return np.where(known, order[at], -1).astype(np.int16)
    unknown = [int(c) for c in np.unique(pixel[~known])[:4]]
    said = ", ".join(f"{c >> 16},{(c >> 8) & 255},{c & 255}" for c in unknown)
    raise DecodeError(f"colour(s) {said} are in no line of {LABELMAP}")


def _text(archive: zipfile.ZipFile, member: str, where: str) -> str:
    """A small text member (labelmap.txt, the image list), refused when it unpacks to more than MAX_TEXT bytes."""
    try:
        if archive.getinfo(member).file_size > MAX_TEXT:
            raise CvatExportError(f"{where} unpacks to {archive.getinfo(member).file_size:,} bytes: not a CVAT "
                                  f"{posixpath.basename(where)} (at most {MAX_TEXT:,})")
        return archive.read(member).decode("utf-8-sig")
    except (UnicodeDecodeError, zipfile.BadZipFile, OSError) as e:
        raise CvatExportError(f"{where} cannot be read as text ({type(e).__name__}: {e})") from None


def _root(members: dict[str, str]) -> str | None:
    """The folder of the zip that holds labelmap.txt ('' at the top, as CVAT writes it)."""
    if LABELMAP in members:
        return ""
    found = sorted(m for m in members if posixpath.basename(m) == LABELMAP)
    return posixpath.dirname(found[0]) if found else None
