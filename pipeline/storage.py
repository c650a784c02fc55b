"""Storage: local paths, file:// and s3:// URIs through fsspec, with one-line errors that name the URI.

A `Location` is a root resolved once (its filesystem and the path inside it): both jobs resolve their inputs and
outputs when they start and pass the locations down; children share the parent's filesystem, and every listed
file is opened through the filesystem that listed it. A Location owns the writes that never show a partial file:
atomic replace (`write_bytes`, `open_write`), create-exclusive (`create_exclusive`: the leases) and
publish-without-replace (`publish_to`: the labeling commit), built on `models.storage_io`'s one fsynced writer.

S3 credentials and endpoint come from the standard AWS configuration (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
AWS_PROFILE, ~/.aws/config, ...), so MinIO and other S3-compatible stores need no code changes. Errors are
pipeline.storage_errors' (StorageError, storage_error, redact: importable from here); they never hold credentials.
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

import fsspec

from models.storage_io import is_local, local_staged, open_atomic, read_all, resolve, write_atomic

from .storage_errors import StorageError, describe, no_space, redact, storage_error

# Fail fast on an unreachable endpoint instead of botocore's long default retry ladder.
S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60}
S3_RETRIES = {"max_attempts": 3, "mode": "standard"}  # unless the operator sets AWS_MAX_ATTEMPTS / AWS_RETRY_MODE


def _s3_config() -> dict:
    """botocore settings of every S3 filesystem; an explicit `retries` would override the operator's own."""
    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return dict(S3_CONFIG)
    return {**S3_CONFIG, "retries": S3_RETRIES}


class UnreadableFile(OSError):
    """A listed entry that must not be read: not a regular file, or over the byte limit (the message says)."""


def normalize(uri: str) -> str:
    """Local paths become absolute, `file://` is stripped, remote URIs are kept (without a trailing '/')."""
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


@dataclass(frozen=True)
class FileInfo:
    """One listed object: its URI, size in bytes and a version (ETag on S3, mtime_ns-size locally). The
    listing's `Location.path_of(uri)` is its path inside the filesystem that listed it."""

    uri: str
    size: int
    version: str


@dataclass(frozen=True)
class Location:
    """A storage root resolved once: `uri` (normalised, as users and output rows see it), the fsspec
    filesystem `fs` and `path` inside it. Picklable: Ray tasks receive it and open files through `fs`."""

    uri: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    path: str

    @classmethod
    def of(cls, where: str | Location) -> Location:
        """Resolve a local path, file:// or s3:// URI (a Location is returned as it is)."""
        if isinstance(where, Location):
            return where
        uri = normalize(where)
        options = {"config_kwargs": _s3_config()} if uri.startswith(("s3://", "s3a://")) else {}
        try:
            fs, path = resolve(uri, **options)  # never parses '::' as a URL chain
        except Exception as e:  # noqa: BLE001 - an unknown protocol or a missing fsspec backend: named with the URI
            raise storage_error(uri, e) from None
        return cls(uri, fs, path)

    @classmethod
    def of_listed(cls, uri: str, listed_by: Location | None) -> Location:
        """A listed file: on the filesystem of the listing that gave the URI (`listed_by`; the URI is never parsed
        again) or, for a manifest's rows (None), on the one the URI names."""
        return cls(uri, listed_by.fs, listed_by.path_of(uri)) if listed_by else cls.of(uri)

    def child(self, *parts: str) -> Location:
        """A location under this one, on the same filesystem (nothing is resolved again)."""
        return Location(join(self.uri, *parts), self.fs, posixpath.join(self.path, *parts))

    @property
    def parent(self) -> Location:
        """The folder or prefix that holds this location, on the same filesystem."""
        return Location(dirname(self.uri), self.fs, posixpath.dirname(self.path))

    @property
    def is_local(self) -> bool:
        return is_local(self.fs)

    @property
    def _protocol(self) -> str:
        return "" if self.is_local else self.uri.split("://", 1)[0] + "://"

    def uri_of(self, path: str) -> str:
        """The URI of a path of this location's filesystem (as `fs.find` returns them)."""
        return self._protocol + path.lstrip("/") if self._protocol else path

    def path_of(self, uri: str) -> str:
        """The inverse of `uri_of` for a URI this location produced."""
        return uri[len(self._protocol):] if self._protocol else uri

    # ----------------------------------------------------------------------------------------- files

    def read_bytes(self) -> bytes:
        """The whole object. FileNotFoundError for a missing one; StorageError for an unreachable store."""
        try:
            return read_all(self.fs, self.path)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the URI
            raise storage_error(self.uri, e) from None

    def write_bytes(self, data: bytes) -> None:
        """Write an object so readers see the old or the complete new content, never a partial file."""
        try:
            write_atomic(self.fs, self.path, data)
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the URI
            raise storage_error(self.uri, e) from None

    @contextlib.contextmanager
    def open_write(self, staging: Location | None = None) -> Iterator[BinaryIO]:
        """`write_bytes` in pieces (a file too large to hold in memory): the object appears complete at the end
        of the block, or not at all when it raises (the filesystem's own errors, unnamed: use it in workers).
        Locally its temporary file lies in `staging` (a folder of this filesystem), by default beside it."""
        with open_atomic(self.fs, self.path, staging.path if staging else None) as f:
            yield f

    def create_exclusive(self, data: bytes) -> str | None:
        """Create this file with `data` unless it exists (FileExistsError), never showing it partial: locally a
        hard link of a complete temporary file (`O_EXCL` where the filesystem has no hard links), on S3 a
        conditional PUT (`If-None-Match: *`). Returns the new object's ETag on S3, None locally."""
        try:
            if not self.is_local:
                self.fs.pipe_file(self.path, data, mode="create")
                self.fs.invalidate_cache()
                return self.fs.info(self.path).get("ETag")
            with local_staged(self.path, _link_new, shared=True) as f:  # other users' runs read a lease
                f.write(data)
            return None
        except FileExistsError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the URI
            raise storage_error(self.uri, e) from None

    def publish_to(self, dst: Location) -> None:
        """Move this file to `dst` (same filesystem) without ever replacing a file there: it appears complete
        under its new name (locally a hard link, then this name is unlinked, or where links are unsupported a
        rename after a check, for a single writer; on S3 a server-side copy, then a delete). A `dst` that exists
        already is this same file, published before a crash: it is kept, and this one is dropped."""
        if self.is_local:
            os.makedirs(os.path.dirname(dst.path), exist_ok=True)
            try:
                os.link(self.path, dst.path)
            except FileExistsError:
                pass
            except OSError:  # no hard links here (some network filesystems): single writer, guarded by a lease
                if not os.path.exists(dst.path):
                    os.replace(self.path, dst.path)
                    return
            os.unlink(self.path)
            return
        if not self.fs.exists(dst.path):
            self.copy_to(dst)
        self.remove()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def exists(self) -> bool:
        """True when a file or directory/prefix exists (False also when the store cannot be reached)."""
        try:
            return bool(self.fs.exists(self.path))
        except Exception:  # noqa: BLE001 - exists() answers for what can be seen; check_exists() says why not
            return False

    # Deleting and copying take names literally: fsspec's rm() and copy() expand glob characters ([, ], *, ?), so
    # `seg[v2]/x` would name `segv/x`, `seg2/x` or nothing. Every delete and copy of the jobs goes through these.

    def remove(self, recursive: bool = False) -> None:
        """Delete this file or, with `recursive`, this folder/prefix and everything under it. FileNotFoundError
        when there is nothing to delete locally (S3 deletes of a missing key succeed)."""
        if self.is_local:
            if recursive and os.path.isdir(self.path) and not os.path.islink(self.path):
                shutil.rmtree(self.path)
            else:
                os.unlink(self.path)
            return
        paths = self.fs.find(self.path, withdirs=False) if recursive else [self.path]
        for path in paths:
            if not recursive or path == self.path or path.startswith(self.path + "/"):  # see list_files
                self.fs.rm_file(path)
        self.fs.invalidate_cache(self.path)

    def copy_to(self, dst: Location) -> None:
        """Copy this file to `dst` on the same filesystem (server-side on S3)."""
        self.fs.cp_file(self.path, dst.path)

    # ------------------------------------------------------------------------------------- checks

    def check_bucket(self) -> None:
        """HEAD the bucket: tells an unreachable endpoint from a missing bucket (fs.exists hides both)."""
        if self.is_local or not hasattr(self.fs, "call_s3"):
            return
        bucket = self.uri.split("://", 1)[1].split("/", 1)[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(f"bucket does not exist: s3://{bucket} (from {self.uri})") from None

    @classmethod
    def writable(cls, where: str) -> Location:
        """`where` resolved and proved writable (`check_writable`); one that cannot be resolved is 'cannot write'."""
        try:
            location = cls.of(where)
        except StorageError as e:
            raise StorageError(f"cannot write to {normalize(where)}: {str(e).split(': ', 1)[-1]}") from None
        location.check_writable()
        return location

    def check_exists(self, what: str = "path") -> None:
        """Raise StorageError unless this file or prefix/directory exists and can be reached."""
        try:
            self.fs.invalidate_cache()
            self.check_bucket()
            if not self.fs.exists(self.path):
                raise StorageError(f"{what} not found: {self.uri}")
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the URI
            raise storage_error(self.uri, e) from None

    def check_writable(self) -> None:
        """Prove that objects can be created under this directory/prefix by writing and deleting a marker."""
        marker = self.child(f".write-check-{uuid.uuid4().hex}")
        try:
            self.check_bucket()
            if self.is_local:
                os.makedirs(self.path, exist_ok=True)
            with self.fs.open(marker.path, "wb") as f:
                f.write(b"ok")
            marker.remove()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the URI
            if no_space(e):  # its own message names the path and says what to do
                raise storage_error(self.uri, e) from None
            raise StorageError(redact(f"cannot write to {self.uri}: {describe(self.uri, e).split(': ', 1)[-1]}")) from None

    # ------------------------------------------------------------------------------------- listing

    def list_files(self, extensions: tuple[str, ...] | None = None, recursive: bool = True) -> list[FileInfo]:
        """Every file under this prefix or directory (recursively, or only its own files), sorted by URI.

        `extensions` (lower-case, with dot) filters by suffix, case-insensitively. Directory markers that
        some S3 writers leave (zero-byte keys ending in '/') are not files and are skipped.
        """
        self.check_exists("directory" if self.is_local else "prefix")
        try:
            if recursive:
                found = self.fs.find(self.path, detail=True)
            else:
                found = {e["name"]: e for e in self.fs.ls(self.path, detail=True) if e.get("type") != "directory"}
        except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types: named with the URI
            raise storage_error(self.uri, e) from None
        # Object keys are any strings: `a//b.png` lies under the common prefix `a//`, which s3fs names `a/` and
        # lists as all of `a/`. Only keys under this exact prefix belong to it (or the key itself: one object).
        under = self.path + "/"
        out = []
        for key, info in found.items():
            if info.get("type") == "directory" or key.endswith("/"):
                continue
            if not self.is_local and key != self.path and not key.startswith(under):
                continue
            if extensions is not None and not key.lower().endswith(extensions):
                continue
            # The listing stat'ed a symlink itself: its version is its target's (as when the file is listed alone).
            version = local_version(key) if info.get("islink") else None
            out.append(FileInfo(self.uri_of(key), int(info.get("size") or 0), version or _version(info)))
        out.sort(key=lambda f: f.uri)
        return out

    def read_listed(self, path: str, max_bytes: int) -> bytes:
        """A listed file's bytes, read through this location's filesystem at the path the listing gave.

        Reads at most `max_bytes` + 1 bytes: a larger file (or one that grew since it was listed) raises
        UnreadableFile. Locally, anything but a regular file (a FIFO, a device, a socket, a symlink to one)
        raises UnreadableFile before a byte is read; a FIFO never blocks.
        """
        if not self.is_local:
            return self._read_object(path, max_bytes)
        _check_regular(os.stat(path).st_mode)  # refused before it is opened: opening a device can act
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO swapped in never blocks the open
        except OSError as e:
            if e.errno == errno.ENXIO:  # a socket
                raise UnreadableFile("not a regular file (socket)") from None
            raise
        try:
            _check_regular(os.fstat(fd).st_mode)  # what was opened, if the name changed since the stat
            with os.fdopen(os.dup(fd), "rb") as f:
                return _read_at_most(f, max_bytes)
        finally:
            os.close(fd)

    def _read_object(self, path: str, max_bytes: int) -> bytes:
        # One ranged GET: no HEAD first, and nothing from s3fs's listing cache, which a long-lived worker keeps
        # from an earlier listing of the prefix (an object written since would look missing, a rewritten one short).
        try:
            data = self.fs.cat_file(path, start=0, end=max_bytes + 1)
        except OSError as e:
            # A range of an empty object is "not satisfiable" (416), on S3 and GCS alike.
            self.fs.invalidate_cache(path)
            if e.errno == errno.EINVAL and self.fs.size(path) == 0:
                return b""
            raise
        if len(data) > max_bytes:
            raise _over_limit(max_bytes)
        return data


_FILE_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
               stat.S_IFSOCK: "socket"}
_READ_CHUNK = 8 * 1024 * 1024


def _check_regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise IsADirectoryError("is a directory")
    if not stat.S_ISREG(mode):
        raise UnreadableFile(f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(mode), 'special file')})")


def _over_limit(max_bytes: int) -> UnreadableFile:
    return UnreadableFile(f"file is over the {max_bytes / 1e6:g} MB limit (--max-bytes)")


def _read_at_most(f, max_bytes: int) -> bytes:
    """The file's bytes, in chunks (no buffer of max_bytes up front); UnreadableFile past max_bytes."""
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = f.read(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise _over_limit(max_bytes)


def _link_new(tmp: str, path: str) -> None:
    """Give the complete file `tmp` the name `path` unless that exists (FileExistsError)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem: an exclusive create, written from the complete file
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "wb") as f, open(tmp, "rb") as src:
            shutil.copyfileobj(src, f)


def local_version(path: str) -> str | None:
    """A local file's version, `mtime-size` (mtime in ns, from the float st_mtime as every listing path computes
    it; a symlink's target counts); None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{int(st.st_mtime * 1e9)}-{st.st_size}"


def _version(info: dict) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
    mtime = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
    return f"{int(mtime * 1e9)}-{int(info.get('size') or 0)}"
