"""Byte-level reads and writes for model files, local or any fsspec URI (s3://...).

Kept here, free of Ray, so `models` stays importable on its own; `pipeline.storage` builds on fsspec too.
"""
from __future__ import annotations

import os
import tempfile

import fsspec


def read_bytes(uri: str) -> bytes:
    """Whole file as bytes. Raises FileNotFoundError for a missing file, whatever the backend."""
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a file so that readers see either the old file or the complete new one.

    Locally: temporary file in the same directory, then rename. On object stores a single PUT is atomic.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        directory = os.path.dirname(os.path.abspath(path)) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
