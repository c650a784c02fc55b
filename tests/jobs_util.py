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
