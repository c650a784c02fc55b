"""What to label, as a Ray Dataset of (image_uri, image_version, image_size) rows that the driver never holds.

Two sources:
- a prefix or directory: the driver lists one level (its sub-prefixes, a delimiter listing); Ray tasks list
  each sub-prefix recursively, and the prefix's own files, and emit rows in blocks;
- a listing manifest (`--manifest`, or a single .csv/.parquet file, or an S3 Inventory `manifest.json`):
  CSV or Parquet files with `uri` (or `bucket` + `key`), `size` and a version (`version`, or `e_tag`, which is
  what a prefix listing of S3 gives, so both name an image the same way). Ray Data reads them in parallel.
Either way only images (by extension) outside the job's own output folders become rows.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray

from .. import dataset_formats
from ..dataset_formats import DatasetError, single_image
from ..decode import IMAGE_EXTENSIONS
from ..storage import FileInfo, Location, is_remote, join, normalize

# list_error: why a listed file cannot be labeled at all (its name is not UTF-8); the read stage makes it an errors/ row.
LISTING_SCHEMA = pa.schema([("image_uri", pa.string()), ("image_version", pa.string()), ("image_size", pa.int64()),
                            ("list_error", pa.string())])
NOT_UTF8 = ("file name is not valid UTF-8 (each byte that is not UTF-8 is shown as %XX): rename it to label it; "
            "output tables hold UTF-8 text only")
MANIFEST_SUFFIXES = (*dataset_formats.MANIFEST_SUFFIXES, ".csv.gz")  # training's manifest files, and gzipped CSV
INVENTORY_MANIFEST = "manifest.json"
VERSION_COLUMNS = ("version", "e_tag", "etag")  # first found wins
LIST_BLOCK_ROWS = 10_000


def is_manifest(images: Location) -> bool:
    """A single manifest file (by name) rather than images: .csv, .csv.gz, .parquet, .pq or manifest.json."""
    name = posixpath.basename(images.path).lower()
    return name.endswith(MANIFEST_SUFFIXES) or name == INVENTORY_MANIFEST


@dataclass(frozen=True)
class Listing:
    """What to list, checked in the driver before any cluster work (`plan_listing`)."""

    images: Location
    manifest_paths: tuple[str, ...] = ()  # empty: a prefix, directory or single image
    manifest_format: str = ""              # csv or parquet
    columns: tuple[str, ...] = ()          # the manifest's columns
    csv_header: bool = True                # False: header-less CSV (S3 Inventory), `columns` name its fields
    version_column: str = ""
    url_encoded_keys: bool = False         # S3 Inventory CSV keys


def plan_listing(images: Location, manifest: bool) -> Listing:
    """Check the images location (or the manifest and its columns) and say how to list it; one line on error."""
    if printable_uri(images.uri) != images.uri:
        raise DatasetError(f"--images {printable_uri(images.uri)}: the path is not valid UTF-8 (each byte that is not "
                           "UTF-8 is shown as %XX); rename it")
    if not (manifest or is_manifest(images)):
        images.check_exists("directory" if images.is_local else "prefix")
        return Listing(images)
    paths, fmt, csv_columns, url_encoded = _manifest_files(images)
    columns = list(csv_columns) or _manifest_columns(images, paths[0], fmt)
    has_uri = "uri" in columns or {"bucket", "key"} <= set(columns)
    version = next((c for c in VERSION_COLUMNS if c in columns), None)
    if not has_uri or version is None:
        raise DatasetError(f"manifest {images.uri_of(paths[0])} needs a `uri` (or `bucket` and `key`) column and a "
                           f"version column ({', '.join(VERSION_COLUMNS)}); it has {', '.join(columns)}")
    return Listing(images, tuple(paths), fmt, tuple(columns), not csv_columns, version, url_encoded)


def listing_dataset(listing: Listing, *, exclude: tuple[str, ...]) -> ray.data.Dataset:
    """The rows to consider for labeling. `exclude`: URI prefixes never listed (the job's own output folders)."""
    images = listing.images
    if listing.manifest_paths:
        return _manifest_dataset(listing, exclude)
    single = single_image(images)
    if single:
        return ray.data.from_arrow(_rows([single]))
    # One delimiter level in the driver: only sub-prefix names are kept; the files are listed by the tasks. Names
    # travel as bytes: a local folder's name need not be UTF-8 (Python holds its bytes as surrogates).
    units = [{"path": _raw(images.path), "recursive": False}]
    units += [{"path": _raw(e["name"]), "recursive": True} for e in images.fs.ls(images.path, detail=True)
              if e.get("type") == "directory"]
    images.fs.invalidate_cache(images.path)  # s3fs would keep that level's listing for the whole run
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _list_units, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
        fn_kwargs={"images": images, "exclude": exclude})


def _raw(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def printable_uri(uri: str) -> str:
    """The URI as UTF-8 text: a local name's bytes that are not UTF-8 (held by Python as lone surrogates, which no
    Parquet or JSON writer accepts) become %XX. Equal to `uri` for every valid name."""
    return re.sub("[\udc80-\udcff]", lambda m: f"%{ord(m.group()) - 0xDC00:02X}", uri)


def _rows(files: list[FileInfo]) -> pa.Table:
    """Listing rows; a file whose name is not UTF-8 gets its printable URI and a list_error: one errors/ row."""
    uris = [printable_uri(f.uri) for f in files]
    return pa.table({"image_uri": uris, "image_version": [f.version for f in files],
                     "image_size": [int(f.size) for f in files],
                     "list_error": [None if u == f.uri else NOT_UTF8 for u, f in zip(uris, files, strict=True)]},
                    schema=LISTING_SCHEMA)


def _list_units(batch: pa.Table, *, images: Location, exclude: tuple[str, ...]):
    """Ray task: list each unit (a sub-prefix, recursively; or the prefix's own files) in blocks of rows."""
    for raw, recursive in zip(batch["path"].to_pylist(), batch["recursive"].to_pylist(), strict=True):
        path = raw.decode("utf-8", "surrogateescape")
        unit = Location(images.uri_of(path), images.fs, path)
        files = [f for f in unit.list_files(IMAGE_EXTENSIONS, recursive=recursive) if not f.uri.startswith(exclude)]
        for start in range(0, len(files), LIST_BLOCK_ROWS):
            yield _rows(files[start:start + LIST_BLOCK_ROWS])


# ------------------------------------------------------------------------------------------------ manifests


def _snake(name: str) -> str:
    """S3 Inventory's CSV field names as snake case (`IsLatest` -> `is_latest`, `ETag` -> `etag`, `Size` -> `size`)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.strip()).lower()


def _manifest_files(images: Location) -> tuple[list[str], str, list[str], bool]:
    """(paths of the manifest's data files, csv or parquet, header-less CSV column names, URL-encoded keys)."""
    name = posixpath.basename(images.path).lower()
    if name == INVENTORY_MANIFEST:  # S3 Inventory: data files named in the manifest, in its destination bucket
        try:
            meta = json.loads(images.read_text())
            fmt = meta["fileFormat"].lower()
            bucket = meta["destinationBucket"].rsplit(":", 1)[-1]
            keys = [f["key"] for f in meta["files"]]
        except FileNotFoundError:
            raise DatasetError(f"inventory manifest {images.uri} not found") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"inventory manifest {images.uri} is not an S3 Inventory manifest.json: {e!r}") from None
        if fmt not in ("csv", "parquet"):
            raise DatasetError(f"inventory manifest {images.uri}: {meta['fileFormat']} inventories are not supported "
                               "(configure CSV or Parquet)")
        if not keys:
            raise DatasetError(f"inventory manifest {images.uri} names no data files")
        base = Location.of(f"s3://{bucket}") if not images.is_local else Location.of(posixpath.dirname(images.path))
        columns = [_snake(c) for c in meta.get("fileSchema", "").split(",")] if fmt == "csv" else []
        return [base.child(k).path for k in keys], fmt, columns, fmt == "csv"
    if is_manifest(images):
        if not images.exists():
            raise DatasetError(f"manifest {images.uri} not found")
        paths = [images.path]
    else:
        paths = [images.path_of(f.uri) for f in images.list_files(MANIFEST_SUFFIXES)]
        if not paths:
            raise DatasetError(f"no manifest files (.csv, .csv.gz, .parquet) under {images.uri}")
    formats = {"parquet" if p.lower().endswith((".parquet", ".pq")) else "csv" for p in paths}
    if len(formats) > 1:
        raise DatasetError(f"manifest files under {images.uri} mix CSV and Parquet; keep one format per listing")
    return paths, formats.pop(), [], False


def _manifest_columns(images: Location, path: str, fmt: str) -> list[str]:
    """The first data file's column names, read in the driver so a wrong manifest fails before any work."""
    try:
        with images.fs.open(path, "rb") as f:
            if fmt == "parquet":
                return pq.read_schema(f).names
            compression = "gzip" if path.lower().endswith(".gz") else None
            with pa.CompressedInputStream(f, compression) if compression else f as stream:
                return pacsv.open_csv(stream).schema.names
    except FileNotFoundError:
        raise DatasetError(f"manifest data file {images.uri_of(path)} not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"manifest {images.uri_of(path)} cannot be parsed: {str(e).splitlines()[0]}") from None


def _manifest_dataset(listing: Listing, exclude: tuple[str, ...]) -> ray.data.Dataset:
    images, paths = listing.images, list(listing.manifest_paths)
    # include_paths: relative URIs resolve against the folder of the manifest file that holds them.
    if listing.manifest_format == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=images.fs, include_paths=True)
    else:
        # Every column as text: keys like 00123 stay keys, empty sizes stay empty.
        convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in listing.columns}, strings_can_be_null=True)
        read = None if listing.csv_header else pacsv.ReadOptions(column_names=list(listing.columns))
        ds = ray.data.read_csv(paths, filesystem=images.fs, include_paths=True, convert_options=convert, read_options=read,
                               arrow_open_stream_args={"compression": "detect"})
    return ds.map_batches(_manifest_rows, batch_format="pyarrow", num_cpus=0.25,
                          fn_kwargs={"images": images, "version": listing.version_column, "exclude": exclude,
                                     "url_encoded_keys": listing.url_encoded_keys})


def _true(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.equal(pc.utf8_lower(column.cast(pa.string())), "true")


def _manifest_rows(batch: pa.Table, *, images: Location, version: str, exclude: tuple[str, ...],
                   url_encoded_keys: bool) -> pa.Table:
    """Manifest rows -> listing rows: current versions of images only (S3 Inventory lists every object,
    delete markers and old versions too); rows without a URI or a version are ignored."""
    names = batch.column_names
    if "is_delete_marker" in names:
        batch = batch.filter(pc.invert(_true(batch["is_delete_marker"])))
    if "is_latest" in names:
        batch = batch.filter(_true(batch["is_latest"]))
    if "uri" in names:
        folders = [images.uri_of(posixpath.dirname(p)) for p in batch["path"].to_pylist()]
        uris = [_absolute(str(u).strip(), folder) if u else None for u, folder in zip(batch["uri"].to_pylist(), folders, strict=True)]
    else:
        keys = batch["key"].to_pylist()
        uris = [f"s3://{b}/{unquote_plus(k) if url_encoded_keys else k}" if b and k else None
                for b, k in zip(batch["bucket"].to_pylist(), keys, strict=True)]
    versions = [str(v).strip('"') if v not in (None, "") else None for v in batch[version].to_pylist()]
    sizes = batch["size"].to_pylist() if "size" in names else [None] * batch.num_rows
    keep = [i for i, (u, v) in enumerate(zip(uris, versions, strict=True))
            if u and v and u.lower().endswith(IMAGE_EXTENSIONS) and not u.startswith(exclude)]
    return pa.table({"image_uri": [uris[i] for i in keep], "image_version": [versions[i] for i in keep],
                     "image_size": [_int(sizes[i]) for i in keep], "list_error": [None] * len(keep)},
                    schema=LISTING_SCHEMA)


def _absolute(uri: str, folder: str) -> str:
    """A manifest's URI as a listing would give it: absolute, normalised, no `file://`."""
    if not is_remote(uri) and not uri.startswith(("/", "file://")):
        uri = join(folder, uri) if is_remote(folder) else os.path.join(folder, uri)
    return normalize(uri) if not is_remote(uri) else uri


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
