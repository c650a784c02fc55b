"""What every job in jobs/ shares: import path setup, clear one-line errors, the JSON summary line."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable

from models import BackboneError, CheckpointError

from .storage import StorageError, redact

# Errors a user can fix from the message alone: printed as one line, exit code 2, no traceback.
USER_ERRORS = (StorageError, CheckpointError, BackboneError, ValueError, FileNotFoundError)


class JobError(RuntimeError):
    """A job cannot proceed for a reason the message states (bad argument, empty dataset, ...)."""


class JobArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors become one `error: ...` line and exit status 2 through `run_job`."""

    def error(self, message: str):  # argparse API
        raise JobError(f"{message} (see --help)")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def print_summary(summary: dict) -> None:
    """The job's last stdout line: one JSON object (NaN becomes null)."""
    sys.stdout.flush()
    print(json.dumps(_clean(summary), sort_keys=True), flush=True)


def run_job(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a job's main; user errors become `error: ...` on stderr and exit status 2."""
    try:
        code = main(argv)
    except (JobError, *USER_ERRORS) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(code or 0)
