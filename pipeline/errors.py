"""Errors every part of the pipeline shares, the one-line form of any exception, and the checks of flag values
every job's config shares (numbers in range, names that stay one path component)."""
from __future__ import annotations

import math


class JobError(RuntimeError):
    """A job cannot proceed for a reason the message states (bad argument, empty dataset, ...)."""


class UsageError(JobError, ValueError):
    """A bad option or argument value. A JobError for the jobs (one line, exit 2), a ValueError for library
    callers; a ValueError that is not one of these is a bug and keeps its traceback (pipeline.cli.run_job)."""


def one_line(e: BaseException) -> str:
    """`Type: message`, first line only: how a failed row or run names its exception."""
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _bound(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


# Ray's resource requests are whole multiples of 1/10,000: a smaller CPU fraction is refused when the job asks for it.
CPU_QUANTUM = 0.0001


def check_number(flag: str, value, *, at_least: float | None = None, above: float | None = None,
                 at_most: float | None = None, below: float | None = None, unit: str = "") -> None:
    """Raise UsageError naming `flag` unless `value` is a finite number within the bounds given (`at_least` and
    `at_most` inclusive, `above` and `below` exclusive); None (the flag's automatic choice) passes. argparse's
    `float` reads 'nan' and 'inf', and NaN passes every comparison check: this is the one range check of a flag.
    `unit` (e.g. "seconds") goes into the message: "--lr must be a finite number > 0, got nan"."""
    if value is None:
        return
    low = f"[{_bound(at_least)}" if at_least is not None else f"({_bound(above)}" if above is not None else None
    high = f"{_bound(at_most)}]" if at_most is not None else f"{_bound(below)})" if below is not None else None
    if low and high:
        bounds = f" in {low}, {high}"
    elif low:
        bounds = f" {'>=' if low[0] == '[' else '>'} {low[1:]}"
    elif high:
        bounds = f" {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
    else:
        bounds = ""
    integer = isinstance(value, int) and not isinstance(value, bool)  # an int flag: argparse refused nan and inf
    what = bounds.lstrip() if integer else f"a finite number{f' of {unit}' if unit else ''}{bounds}"
    try:
        number = value if integer else float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} must be {what}, got {value!r}") from None
    inside = (integer or math.isfinite(number)) and (at_least is None or number >= at_least) and (
        above is None or number > above) and (at_most is None or number <= at_most) and (below is None or number < below)
    if not inside:
        raise UsageError(f"{flag} must be {what}, got {value if integer else repr(number)}")

def check_name(flag: str, value: str, what: str = "name") -> None:
    """Raise UsageError naming `flag` unless `value` can be one path component under its folder (a run name, a
    split): not empty, not '.' or '..', no '/' or '\\' (a local path or an S3 key would climb out or nest)."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        raise UsageError(f"{flag} must be a {what} without '/' or '\\' (not empty, '.' or '..'), got {value!r}")
