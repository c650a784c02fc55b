"""Byte-level reads and writes for model files, local or any fsspec URI (s3://...).

Kept here, free of Ray, so `models` stays importable on its own; `pipeline.storage` builds on the
filesystem-level functions (`read_all`, `write_atomic`) with its own resolved locations.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator

import fsspec


def resolve(uri: str, **options) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for one local path or URI, with `options` for the filesystem.

    Not `fsspec.core.url_to_fs`: it reads '::' as a chain of URLs, so a file named 'cat::2.png' would be 'cat'.
    """
    uri = str(uri)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    fs_class = fsspec.get_filesystem_class(protocol)
    return fs_class(**{**fs_class._get_kwargs_from_urls(uri), **options}), fs_class._strip_protocol(uri)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def read_all(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """Whole file as bytes. Raises FileNotFoundError for a missing file, whatever the backend."""
    with fs.open(path, "rb") as f:
        return f.read()


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file so that readers see either the old file or the complete new one."""
    with open_atomic(fs, path) as f:
        f.write(data)


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """A binary file to write in pieces that appears whole under `path` when the block ends, and not at all when
    it raises. Locally: a temporary file in the same directory, fsynced, then renamed. On object stores one upload
    (a multipart one for large files), completed at the end and aborted on an error."""
    if not is_local(fs):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            getattr(f, "discard", lambda: None)()  # s3fs: abort the upload, so no partial object appears
            f.closed or f.close()
            raise
        f.close()
        return
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bytes(uri: str) -> bytes:
    """Whole file at a URI as bytes (FileNotFoundError for a missing one)."""
    return read_all(*resolve(uri))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """`write_atomic` at a URI."""
    write_atomic(*resolve(uri), data)
