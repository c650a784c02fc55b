"""Dataset formats: VOC layout, image/mask manifests (CSV or Parquet), and image collections to label.

Each takes the dataset as a `Location`, resolved once by the job. Listing happens on the driver and yields URIs
(training) or FileInfo rows (labeling); pixels are read and decoded by Ray Data.
"""
from __future__ import annotations

import io
import logging
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .decode import IMAGE_EXTENSIONS
from .errors import JobError
from .storage import FileInfo, Location, StorageError, local_version, normalize

log = logging.getLogger(__name__)

VOC_SPLITS_DIR = "ImageSets/Segmentation"
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")


class DatasetError(JobError, ValueError):
    """A dataset is missing, empty or malformed; the message names the URI (one error: line in a job)."""


def detect_format(data: Location) -> str:
    """'manifest' for a .csv/.parquet file, otherwise 'voc' (a directory or prefix in VOC layout)."""
    return "manifest" if data.uri.lower().endswith(MANIFEST_SUFFIXES) else "voc"


def list_samples(data: Location, split: str) -> list[dict[str, str]]:
    """[{"image": uri, "mask": uri}, ...] for one split of a VOC directory or a manifest, in file order."""
    samples = list_manifest(data, split) if detect_format(data) == "manifest" else list_voc(data, split)
    if not samples:
        raise DatasetError(f"split {split!r} of {data.uri} has no samples")
    return samples


def list_voc(root: Location, split: str) -> list[dict[str, str]]:
    """Samples named in ImageSets/Segmentation/<split>.txt: JPEGImages/<id>.jpg + SegmentationClass/<id>.png."""
    root.check_exists("dataset")
    split_file = root.child(VOC_SPLITS_DIR, f"{split}.txt")
    try:
        text = split_file.read_text()
    except FileNotFoundError:
        raise DatasetError(f"no split file {split_file.uri} (VOC layout expects {VOC_SPLITS_DIR}/{split}.txt)") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    return [{"image": root.child("JPEGImages", f"{i}.jpg").uri, "mask": root.child("SegmentationClass", f"{i}.png").uri}
            for i in ids]


def _resolve(base: Location, ref: str) -> str:
    ref = str(ref).strip()
    if "://" in ref or ref.startswith("/"):
        return normalize(ref)
    return base.child(ref).uri


def read_manifest(manifest: Location) -> pa.Table:
    manifest.check_exists("manifest")
    data = manifest.read_bytes()
    try:
        if manifest.uri.lower().endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(data))
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"manifest {manifest.uri} cannot be parsed: {str(e).splitlines()[0]}") from None


def list_manifest(manifest: Location, split: str) -> list[dict[str, str]]:
    """Rows of a manifest with `image` and `mask` columns (relative URIs are relative to the manifest).

    With a `split` column only that split's rows are used; without one, every row belongs to every split.
    """
    table = read_manifest(manifest)
    missing = {"image", "mask"} - set(table.column_names)
    if missing:
        raise DatasetError(f"manifest {manifest.uri} lacks column(s) {', '.join(sorted(missing))} (has "
                           f"{', '.join(table.column_names)})")
    images = table.column("image").to_pylist()
    masks = table.column("mask").to_pylist()
    if "split" in table.column_names:
        splits = [str(s) for s in table.column("split").to_pylist()]
    else:
        log.warning("manifest %s has no split column: all rows are used for split %r", manifest.uri, split)
        splits = [split] * len(images)
    base = manifest.parent
    return [{"image": _resolve(base, i), "mask": _resolve(base, m)}
            for i, m, s in zip(images, masks, splits, strict=True) if s == split and i and m]


def parse_class_names(data: bytes, where: str) -> list[str]:
    """The class names of a classes.txt: one per line, line N names class id N - 1. A blank line or a name given
    twice would shift or merge every id after it, so either is refused with its line number (blank lines after
    the last name shift nothing and are ignored)."""
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where} is not UTF-8 text (byte {e.start})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise DatasetError(f"{where}: line {number} is blank, so every class after it would get the wrong id "
                               "(line N names class id N-1): remove the line or name the class")
        if name in first_line:
            raise DatasetError(f"{where}: line {number} repeats {name!r} of line {first_line[name]} (class ids "
                               f"{first_line[name] - 1} and {number - 1}): class names must be distinct")
        first_line[name] = number
    if not first_line:
        raise DatasetError(f"{where} names no class")
    return list(first_line)


def classes_file(data: Location) -> Location:
    """`classes.txt` beside the dataset: in a VOC root, or in the folder of a manifest."""
    return (data.parent if detect_format(data) == "manifest" else data).child("classes.txt")


def read_class_names(data: Location) -> list[str] | None:
    """Class names from `classes.txt` beside the dataset (one per line, line N = class id N-1), if present;
    DatasetError naming the line for a blank or repeated one."""
    classes = classes_file(data)
    try:
        raw = classes.read_bytes()
    except (FileNotFoundError, StorageError):
        return None
    return parse_class_names(raw, classes.uri)


def check_checkpoint_classes(data: Location, checkpoint: str, class_names: list[str]) -> None:
    """A checkpoint evaluated on a dataset must predict the classes its classes.txt names, id for id (otherwise
    masks would be read with another meaning, or dropped as out of range); raise DatasetError naming both."""
    names = read_class_names(data)
    if names is None:
        return
    where = classes_file(data).uri
    if len(names) != len(class_names):
        raise DatasetError(f"checkpoint {checkpoint} predicts {len(class_names)} classes, but {where} names "
                           f"{len(names)} classes ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): evaluate it "
                           "on the dataset it was trained for")
    for i, (ours, theirs) in enumerate(zip(class_names, names, strict=True)):
        if ours != theirs:
            raise DatasetError(f"checkpoint {checkpoint} names class {i} {ours!r}, but {where} line {i + 1} names it "
                               f"{theirs!r}: the class ids would mean other classes")


def list_images(where: str | Location) -> list[FileInfo]:
    """Every image under a prefix or directory, recursively (jpg, jpeg, png, bmp, tif, tiff, webp, any
    case), with size and version (ETag on S3, mtime_ns-size locally) so later runs can tell what changed.

    A single local image file is accepted too.
    """
    images = Location.of(where)
    single = single_image(images)
    return [single] if single else images.list_files(IMAGE_EXTENSIONS)


def single_image(images: Location) -> FileInfo | None:
    """The FileInfo of `images` when it is one local image file (not a folder), else None."""
    if images.is_local and images.path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(images.path):
        # The same version as when the file is listed with its folder: labelled once either way.
        return FileInfo(images.uri, os.path.getsize(images.path), local_version(images.path))
    return None
