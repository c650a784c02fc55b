"""Storage errors: one line that names the URI and says what went wrong, and never a credential.

`pipeline.storage` raises them (every Location method names the URI of what failed); `redact` also cleans
every other text a job writes or prints that may hold a URI (configs, run records, messages).
"""
from __future__ import annotations

import errno
import os
import re

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(RuntimeError):
    """A path or bucket cannot be used: unreachable endpoint, missing bucket or prefix, not writable."""


# Query parameters that carry credentials: presigned S3/GCS URLs (X-Amz-Signature, X-Amz-Security-Token,
# X-Amz-Credential, X-Goog-*), Azure SAS (sig), API keys and passwords.
_SECRET_PARAMS = re.compile(r"(?i)((?:[\w-]*(?:secret|token|signature|credential|password|passwd|api[_-]?key))|(?<![\w-])sig)"
                            r"=[^&\s'\"]+")
_URL_PASSWORD = re.compile(r"(://[^/\s:@'\"]+):[^/\s@'\"]+@")


def redact(text: str) -> str:
    """Remove credential values (from the environment), URL passwords and credential query parameters."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 16:  # real keys are long; a short value ("test") would mangle plain words
            text = text.replace(value, "***")
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    return _SECRET_PARAMS.sub(r"\1=***", text)


def redact_strings(values: dict) -> dict:
    """`values` with every string value redacted (a config about to be persisted: its URIs may be presigned)."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}


# A full disk or an exceeded quota: expected failures of any write, said in one line naming the path.
_NO_SPACE = {errno.ENOSPC: "no space left on the device that holds {uri} (the disk is full)",
             errno.EDQUOT: "disk quota exceeded writing {uri}"}


def no_space(e: BaseException) -> bool:
    """The error of a write to a full disk (ENOSPC) or over a quota (EDQUOT)."""
    return isinstance(e, OSError) and e.errno in _NO_SPACE


def describe(uri: str, e: BaseException) -> str:
    name = type(e).__name__
    text = str(e)
    if no_space(e):
        return _NO_SPACE[e.errno].format(uri=uri) + ": free space, then rerun the same command"
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
    return StorageError(redact(describe(uri, e)).splitlines()[0])
