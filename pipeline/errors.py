"""Errors every part of the pipeline shares, and the one-line form of any exception."""
from __future__ import annotations


class JobError(RuntimeError):
    """A job cannot proceed for a reason the message states (bad argument, empty dataset, ...)."""


class UsageError(JobError, ValueError):
    """A bad option or argument value. A JobError for the jobs (one line, exit 2), a ValueError for library
    callers; a ValueError that is not one of these is a bug and keeps its traceback (pipeline.cli.run_job)."""


def one_line(e: BaseException) -> str:
    """`Type: message`, first line only: how a failed row or run names its exception."""
    return f"{type(e).__name__}: {e}".splitlines()[0]
