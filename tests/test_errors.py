"""pipeline.cli.run_job: the project's own errors are one `error:` line (exit 2); anything else is a bug and keeps
its traceback (exit 1), e.g. pyarrow's ArrowInvalid, which is a ValueError."""
from __future__ import annotations

import subprocess
import sys

from tests.jobs_util import ROOT


def _run(body: str) -> subprocess.CompletedProcess:
    script = f"import sys; sys.path.insert(0, {ROOT!r})\nfrom pipeline.cli import run_job\n{body}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_an_arrow_error_in_the_driver_keeps_its_traceback():
    proc = _run("import pyarrow as pa, pyarrow.compute as pc\n"
                "def main(argv):\n"
                "    pc.cast(pa.array(['12', 'x']), pa.int64())  # a real ArrowInvalid: a bug, not a user mistake\n"
                "run_job(main)")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "ArrowInvalid" in proc.stderr
    assert ", in main" in proc.stderr  # where it happened
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


def test_a_plain_value_error_is_a_bug_too():
    proc = _run("def main(argv):\n    int('twelve')\nrun_job(main)")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError" in proc.stderr


def test_the_projects_own_errors_are_one_line():
    for raise_it in ("from pipeline.errors import UsageError; raise UsageError('--epochs must be >= 1, got 0')",
                     "from models import ModelConfigError; raise ModelConfigError('unknown model x')",
                     "from pipeline.storage import StorageError; raise StorageError('bucket does not exist: s3://b')"):
        proc = _run(f"def main(argv):\n    {raise_it}\nrun_job(main)")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
