"""One-off URI helpers for tests: a fixture writes a file, a test reads one back, by URI.

The product resolves each root once (`pipeline.storage.Location`) and passes Locations down; a test names its
files by URI, so these resolve one every call.
"""
from __future__ import annotations

import fsspec

from pipeline.storage import FileInfo, Location


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI, resolved as the jobs resolve it."""
    location = Location.of(uri)
    return location.fs, location.path


def check_writable(uri: str) -> None:
    Location.writable(uri)


def read_bytes(uri: str) -> bytes:
    return Location.of(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    Location.of(uri).write_bytes(data)


def read_text(uri: str) -> str:
    return Location.of(uri).read_text()


def write_text(uri: str, text: str) -> None:
    Location.of(uri).write_text(text)


def list_files(uri: str, extensions: tuple[str, ...] | None = None) -> list[FileInfo]:
    return Location.of(uri).list_files(extensions)
