"""Storage: local paths, file:// and s3:// URIs through fsspec, with one-line errors that name the URI.

S3 credentials and endpoint come from the standard AWS configuration (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
AWS_PROFILE, ~/.aws/config, ...), so MinIO and other S3-compatible stores need no code changes. Messages never
contain credentials: every error text goes through `redact`.
"""
from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass

import fsspec

from models.storage_io import read_bytes as _read_bytes
from models.storage_io import write_bytes_atomic

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Fail fast on an unreachable endpoint instead of botocore's long default retry ladder.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}


class StorageError(RuntimeError):
    """A path or bucket cannot be used: unreachable endpoint, missing bucket or prefix, not writable."""


def redact(text: str) -> str:
    """Remove credential values (from the environment) and anything shaped like a secret from a message."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?i)(secret|token|signature|credential)=[^&\s'\"]+", r"\1=***", text)


def normalize(uri: str) -> str:
    """Local paths become absolute, `file://` is stripped, remote URIs are kept."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return uri.rstrip("/") if uri.count("/") > 2 else uri
    return os.path.abspath(os.path.expanduser(uri))


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def dirname(uri: str) -> str:
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(uri)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URI. S3 filesystems get fast-failing connection settings."""
    uri = normalize(uri)
    if uri.startswith(("s3://", "s3a://")):
        fs, path = fsspec.core.url_to_fs(uri, config_kwargs=S3_CONFIG)
    else:
        fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _describe(uri: str, e: BaseException) -> str:
    name = type(e).__name__
    text = str(e)
    if "Could not connect" in text or "EndpointConnectionError" in name or "ConnectTimeout" in name \
            or "Connect timeout" in text or isinstance(e, ConnectionError):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"
        return f"cannot reach the storage endpoint ({endpoint}) for {uri}"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"bucket does not exist: {uri}"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied to {uri} (check the AWS credentials/profile)"
    return f"cannot access {uri}: {name}: {text}"


def storage_error(uri: str, e: BaseException) -> StorageError:
    """A StorageError with one redacted line describing what went wrong with `uri`."""
    return StorageError(redact(_describe(uri, e)).splitlines()[0])


def _bucket_of(uri: str) -> str | None:
    if not is_remote(uri):
        return None
    return uri.split("://", 1)[1].split("/", 1)[0]


def _check_bucket(fs: fsspec.AbstractFileSystem, uri: str) -> None:
    """HEAD the bucket: tells an unreachable endpoint from a missing bucket (fs.exists hides both)."""
    bucket = _bucket_of(uri)
    if bucket is None or not hasattr(fs, "call_s3"):
        return
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise StorageError(f"bucket does not exist: s3://{bucket} (from {uri})") from None


def check_exists(uri: str, what: str = "path") -> None:
    """Raise StorageError unless `uri` (a file or a prefix/directory) exists and can be reached."""
    uri = normalize(uri)
    try:
        fs, path = filesystem(uri)
        fs.invalidate_cache()
        _check_bucket(fs, uri)
        if not fs.exists(path):
            raise StorageError(f"{what} not found: {uri}")
    except StorageError:
        raise
    except Exception as e:
        raise storage_error(uri, e) from None


def exists(uri: str) -> bool:
    """True when a file or directory/prefix exists (False also when the store cannot be reached)."""
    try:
        fs, path = filesystem(uri)
        return bool(fs.exists(path))
    except Exception:
        return False


def read_bytes(uri: str) -> bytes:
    """A whole object. FileNotFoundError for a missing one; StorageError for an unreachable store."""
    try:
        return _read_bytes(normalize(uri))
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:
        raise storage_error(uri, e) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object so readers see the old or the complete new content, never a partial file."""
    try:
        write_bytes_atomic(normalize(uri), data)
    except Exception as e:
        raise storage_error(uri, e) from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def check_writable(uri: str) -> None:
    """Prove that objects can be created under `uri` (a directory/prefix) by writing and deleting a marker."""
    uri = normalize(uri)
    marker = join(uri, f".write-check-{uuid.uuid4().hex}")
    try:
        fs, path = filesystem(marker)
        _check_bucket(fs, uri)
        if not is_remote(uri):
            os.makedirs(uri, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"ok")
        fs.rm(path)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(redact(f"cannot write to {uri}: {_describe(uri, e).split(': ', 1)[-1]}")) from None


@dataclass(frozen=True)
class FileInfo:
    """One listed object: its URI, size in bytes and a version (ETag on S3, mtime_ns-size locally)."""

    uri: str
    size: int
    version: str


def _version(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
    return f"{int(mtime * 1e9)}-{int(info.get('size') or 0)}"


def list_files(uri: str, extensions: tuple[str, ...] | None = None) -> list[FileInfo]:
    """Every file under a prefix or directory, recursively, sorted by URI.

    `extensions` (lower-case, with dot) filters by suffix, case-insensitively. Directory markers that
    some S3 writers leave (zero-byte keys ending in '/') are not files and are skipped.
    """
    uri = normalize(uri)
    check_exists(uri, "prefix" if is_remote(uri) else "directory")
    fs, path = filesystem(uri)
    try:
        found = fs.find(path, detail=True)
    except Exception as e:
        raise storage_error(uri, e) from None
    protocol = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    out = []
    for key, info in found.items():
        if info.get("type") == "directory" or key.endswith("/"):
            continue
        if extensions is not None and not key.lower().endswith(extensions):
            continue
        out.append(FileInfo(protocol + key.lstrip("/") if protocol else key, int(info.get("size") or 0), _version(info)))
    out.sort(key=lambda f: f.uri)
    return out
