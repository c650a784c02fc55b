"""Fault injection for tests: one environment variable, read where each fault fires.

    FCN_TEST_FAULTS="POINT=ACTION[;POINT=ACTION...]"

POINT is a glob over the names the code fires (`fire("label.commit:staged")`):
    label.commit:<step>      each step of the labeling commit protocol (staged, committed, published:<table>)
    label.stage:<table>      a write task, after staging a block's results file (label.stage:results); a group's
                             merge, after staging each of its file set's files (labels, class_stats, ...)
    label.upgrade:<step>:<table>  the one-time schema upgrade, per file (staged: new bytes written, replaced: swapped in)
    label.inference          every call of an inference actor
    label.forward            every forward pass of the labeling predictor
    label.device_check       the labeling predictor's device check after a failed batch
    train.reported:epoch<N>  rank 0, right after reporting epoch N
ACTION is one of:
    sleep:SECONDS            pause (widens the windows a kill can hit)
    raise                    raise InjectedFault, a BaseException that no cleanup code catches
    kill                     SIGKILL this process
    kill_once:PATH           SIGKILL this process unless PATH exists; PATH is created first (local file)
    cuda_error_sticky:PATH   raise the RuntimeError of a CUDA error in the first process that gets here (PATH records
                             it), and again at every later fire in that process, as a sticky CUDA error does
    wait_for:PATH            pause until PATH exists (a local file the test creates; at most 5 minutes)

Unset in production: `fire` is then one dictionary lookup. Ray workers get the variable through
`runtime_env()`, which the jobs pass to the actors and training workers they start.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import time

ENV = "FCN_TEST_FAULTS"


class InjectedFault(BaseException):
    """Stands for the process dying at a fault point: nothing after it runs, no `except Exception` catches it."""


def _rules(spec: str) -> list[tuple[str, str]]:
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        point, sep, action = part.partition("=")
        if not sep or not point or not action:
            raise ValueError(f"{ENV}: expected POINT=ACTION, got {part!r}")
        rules.append((point.strip(), action.strip()))
    return rules


def fire(point: str) -> None:
    """Perform every action whose pattern matches `point` (nothing when the variable is unset)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for pattern, action in _rules(spec):
        if fnmatch.fnmatchcase(point, pattern):
            _perform(action, point)


def _perform(action: str, point: str) -> None:
    kind, _, arg = action.partition(":")
    if kind == "sleep":
        time.sleep(float(arg))
    elif kind == "raise":
        raise InjectedFault(point)
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind in ("kill_once", "cuda_error_sticky"):
        try:
            fd = os.open(arg, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(arg) as f:
                owner = f.read().split()[:1]  # empty while its creator is still writing it
                if kind == "kill_once" or owner != [str(os.getpid())]:
                    return  # fired once already (sticky: in another process)
        else:
            os.write(fd, f"{os.getpid()} {point}\n".encode())
            os.close(fd)
        if kind == "kill_once":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected at {point})")
    elif kind == "wait_for":
        deadline = time.monotonic() + 300
        while not os.path.exists(arg) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} (sleep:S, raise, kill, kill_once:PATH, "
                         "cuda_error_sticky:PATH, wait_for:PATH)")


def runtime_env(env_vars: dict[str, str] | None = None) -> dict | None:
    """A Ray runtime_env that carries the variable (and `env_vars`) to workers, or None when there is neither."""
    spec = os.environ.get(ENV)
    env = {**(env_vars or {}), **({ENV: spec} if spec else {})}
    return {"env_vars": env} if env else None
