"""Byte-level reads and writes for model files, local or any fsspec URI (s3://...).

Kept here, free of Ray and of `pipeline`, so `models` stays importable on its own. It holds the one local
temporary-file writer (`local_staged`: written, fsynced, then put in place): `open_atomic` renames it over its
target, and `pipeline.storage.Location` builds its atomic replace, create-exclusive (a hard link) and reads on
these functions with its own resolved locations (the reverse cannot be: `models` may not import `pipeline`).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from typing import BinaryIO, Callable, Iterator

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
def open_atomic(fs: fsspec.AbstractFileSystem, path: str, staging: str | None = None) -> Iterator[BinaryIO]:
    """A binary file to write in pieces that appears whole under `path` when the block ends, and not at all when
    it raises. Locally: a temporary file (in the folder `staging`, by default the target's own), fsynced, then
    renamed over `path`. On object stores one upload (a multipart one for large files), completed at the end and
    aborted on an error."""
    if not is_local(fs):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            discard = getattr(f, "discard", None)  # s3fs: abort the upload, so no partial object appears
            if discard is not None:
                discard()
                f.closed = True  # closing would now try to complete the discarded upload (and hide this error)
            elif not f.closed:
                f.close()
            raise
        f.close()
        return
    with local_staged(path, os.replace, staging) as f:
        yield f


@contextlib.contextmanager
def local_staged(path: str, put: Callable[[str, str], None], staging: str | None = None,
                 shared: bool = False) -> Iterator[BinaryIO]:
    """A local file written by the block into a temporary file (in the folder `staging`, by default the target's
    own), complete on disk (flushed, fsynced) before `put(temporary, path)` puts it in place (a rename, a hard
    link). The temporary name is gone afterwards, whatever happens: a reader never sees a partial `path`. The file
    is its owner's alone (0600), or, `shared`, readable as a plain open makes it (0666 less the umask)."""
    target_folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(target_folder, exist_ok=True)
    folder = staging or target_folder
    if staging:
        os.makedirs(staging, exist_ok=True)
    if shared:
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    else:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        put(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed into place, or linked and left here
            os.unlink(tmp)


def read_bytes(uri: str) -> bytes:
    """Whole file at a URI as bytes (FileNotFoundError for a missing one)."""
    return read_all(*resolve(uri))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """`write_atomic` at a URI."""
    write_atomic(*resolve(uri), data)
