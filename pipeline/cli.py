"""What every job in jobs/ shares: clear one-line errors, the JSON summary line, argument types."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
from typing import Any, Callable

from models import BackboneError, CheckpointError, ModelConfigError

from .errors import JobError
from .storage import StorageError, no_space, normalize, redact, storage_error

# Errors a user can fix from the message alone: printed as one line, exit code 2, no traceback. Only the project's
# own types: a ValueError or FileNotFoundError from elsewhere (pyarrow's ArrowInvalid is a ValueError) is a bug,
# and keeps its traceback (exit 1). Argument checks raise errors.UsageError, a JobError.
USER_ERRORS = (JobError, StorageError, CheckpointError, BackboneError, ModelConfigError)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors become one `error: ...` line and exit status 2 through `run_job`."""

    def error(self, message: str):  # argparse API
        raise JobError(f"{message} (see --help)")


MAX_SYNTHETIC_SIDE = 4096  # a synthetic image's side at most: larger ones only exhaust memory


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (e.g. 160x120) -> (width, height), each side in [1, MAX_SYNTHETIC_SIDE]; an argparse `type`."""
    m = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", text)
    if not m or not all(1 <= int(side) <= MAX_SYNTHETIC_SIDE for side in m.groups()):
        raise argparse.ArgumentTypeError(f"must be WIDTHxHEIGHT with integers from 1 to {MAX_SYNTHETIC_SIDE}, e.g. "
                                         f"160x120; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def path_arg(text: str) -> str:
    """A path or URI argument, resolved once, here in the driver: a local path becomes absolute (Ray workers run
    in other working directories, on other nodes), `file://` is dropped, a remote URI is kept. An argparse type
    for every path argument of every job."""
    return normalize(text)


def path_or_keyword(*keywords: str) -> Callable[[str], str]:
    """`path_arg`, except for the given keywords (e.g. --backbone-weights none|imagenet|FILE)."""
    def convert(text: str) -> str:
        return text if text in keywords else normalize(text)

    convert.__name__ = "path"  # what argparse names in its messages
    return convert


def optional_int(text: str) -> int | None:
    """An int, or None for 'auto' (the flag's documented automatic choice); an argparse `type`."""
    return None if text in ("auto", "") else int(text)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def print_summary(summary: dict) -> None:
    """The job's last stdout line: one JSON object (NaN becomes null, credentials in URIs are redacted).

    The Ray this job connected to is left first, so no worker output forwarded late follows the line."""
    from .ray_setup import disconnect_ray

    disconnect_ray()
    sys.stderr.flush()
    sys.stdout.flush()
    print(redact(json.dumps(_clean(summary), sort_keys=True)), flush=True)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _causes(e: BaseException):
    """`e` and every exception behind it: its causes, the original of a Ray task's error, the failures of Ray Train's
    workers. Not the exceptions being handled when it was raised (`__context__`): a bug in an `except StorageError`
    block must show its own traceback."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        failures = getattr(x, "worker_failures", None)
        stack += [*(failures.values() if isinstance(failures, dict) else ()), getattr(x, "cause", None),
                  getattr(x, "controller_failure", None), x.__cause__]


# How a worker's storage failure reads in the traceback text Ray brings back (its exception objects lose their causes).
_REMOTE_STORAGE_ERROR = re.compile(r"^pipeline\.storage\.StorageError: (.+)$", re.MULTILINE)
_REMOTE_NO_SPACE = re.compile(r"\[Errno (28|122)\] [^\n]*?: '([^'\n]+)'")


def expected_failure(e: BaseException) -> StorageError | None:
    """The storage failure behind an error raised far from its cause (in a Ray task or a training worker): a full
    disk or quota, or a store that vanished. Its one line is what the user needs, not Ray's tracebacks."""
    causes = list(_causes(e))
    for x in causes:
        if no_space(x):
            return storage_error(getattr(x, "filename", None) or "the output", x)
        if type(x) is StorageError:  # not Ray's wrapper class RayTaskError(StorageError)
            return x
    for x in causes:
        text = str(x)
        found = _REMOTE_STORAGE_ERROR.findall(text)
        if found:
            return StorageError(found[-1].strip())
        found = _REMOTE_NO_SPACE.findall(text)
        if found:
            code, path = found[-1]
            return storage_error(path, OSError(int(code), os.strerror(int(code))))
    return None


def run_job(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a job's main; user errors become `error: ...` on stderr and exit status 2.

    SIGTERM (`ray job stop`, a scheduler's kill) unwinds like an exception, so the job's `finally` blocks run:
    leases are released and run records say `failed`."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        code = main(argv)
    except USER_ERRORS as e:
        cause = getattr(e, "cause", None)  # Ray's copy of a task's error: the worker's traceback is in its text
        if isinstance(cause, BaseException):
            e = expected_failure(e) or cause
        print(f"error: {redact(str(e))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:
        found = expected_failure(e)
        if found is None:
            raise
        print(f"error: {redact(str(found))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code or 0)
