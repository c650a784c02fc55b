"""Running the jobs/ entry points in tests: in-process (sharing the session's Ray) or as real subprocesses."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_job(name: str):
    """Import jobs/<name>.py as a module (jobs/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", os.path.join(ROOT, "jobs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(name: str, argv: list[str], capsys) -> dict:
    """Run a job's main() in this process; returns its final JSON line."""
    capsys.readouterr()
    assert load_job(name).main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def run_subprocess(name: str, argv: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: a job started here starts its own Ray, never joins the session's (or a test cluster).
    full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", f"{name}.py"), *argv], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(proc_or_code, stderr: str | None = None, status: int = 2) -> str:
    """The single `error:` line of a failed job (exit status 2, or `status`), and no traceback of the job's own.
    (Ray's account of the same failure from its workers stays in Ray's log files:
    test_training_bucket_deleted_mid_run_is_one_line.)"""
    code, err = (proc_or_code.returncode, proc_or_code.stderr) if stderr is None else (proc_or_code, stderr)
    lines = error_lines(err)
    assert code == status and len(lines) == 1, err[-3000:]
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-3000:]
    return lines[0]


def run_failing_cli(job: str, argv: list[str], capsys) -> tuple[int, str]:
    """A job's command line in this process, as `python jobs/<job>.py` runs it: (exit status, stderr). For jobs that
    fail before any cluster work (a subprocess would import torch again for each)."""
    import pytest

    from pipeline.cli import run_job

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_job(load_job(job).main, argv)
    return exc.value.code, capsys.readouterr().err
