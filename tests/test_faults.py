"""pipeline.faults: the one fault-injection switch of the tests (FCN_TEST_FAULTS)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from pipeline import faults
from tests.jobs_util import ROOT


def test_unset_fires_nothing_and_ships_nothing(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fire("label.commit:staged")
    assert faults.runtime_env() is None


def test_glob_patterns_pick_the_points(monkeypatch):
    monkeypatch.setenv(faults.ENV, "label.commit:published:*=raise; train.reported:epoch2=raise")
    faults.fire("label.commit:staged")
    faults.fire("train.reported:epoch1")
    with pytest.raises(faults.InjectedFault, match="published:labels"):
        faults.fire("label.commit:published:labels")
    with pytest.raises(faults.InjectedFault):
        faults.fire("train.reported:epoch2")
    assert faults.runtime_env() == {"env_vars": {faults.ENV: "label.commit:published:*=raise; train.reported:epoch2=raise"}}


def test_injected_fault_passes_through_except_exception(monkeypatch):
    monkeypatch.setenv(faults.ENV, "x=raise")
    with pytest.raises(faults.InjectedFault):
        try:
            faults.fire("x")
        except Exception:  # noqa: BLE001 - what cleanup code does; a dying process skips it
            pytest.fail("an injected fault must not be caught as an Exception")


def test_kill_once_kills_the_first_process_only(tmp_path):
    marker = tmp_path / "fired"
    code = "from pipeline import faults; faults.fire('label.inference'); print('survived')"
    env = {faults.ENV: f"label.inference=kill_once:{marker}", "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    second = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and second.stdout.strip() == "survived"


@pytest.mark.parametrize("spec", ["no-equals-sign", "x=explode"])
def test_a_malformed_spec_is_an_error(monkeypatch, spec):
    monkeypatch.setenv(faults.ENV, spec)
    with pytest.raises(ValueError, match=faults.ENV):
        faults.fire("x")


def test_wait_for_pauses_until_the_file_exists(tmp_path, monkeypatch):
    import threading

    go = tmp_path / "go"
    monkeypatch.setenv(faults.ENV, f"x=wait_for:{go}")
    threading.Timer(0.3, go.touch).start()
    t = time.monotonic()
    faults.fire("x")
    assert go.exists() and time.monotonic() - t >= 0.25
