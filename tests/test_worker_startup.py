"""What keeps Ray worker processes cheap to start and the next epoch's input ready (see bench/RESULTS.md)."""
import subprocess
import sys

import pytest

from pipeline.train.loop import EpochInput

REPO = __file__.rsplit("/tests/", 1)[0]


@pytest.mark.parametrize("module", ["pipeline.train.inputs", "pipeline.train.transforms", "pipeline.label",
                                    "pipeline.label.stages", "pipeline.label.canvas", "pipeline.label.tables",
                                    "pipeline.label.codec", "pipeline.label.commit", "pipeline.label.config",
                                    "pipeline.label.inference_settings", "models"])
def test_cpu_stage_modules_do_not_import_torch(module):
    # A Ray Data task on a fresh worker imports its function's module; torch would add ~1.5 s of CPU there.
    code = f"import sys, {module}; from models import VOID_LABEL, flat_palette; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing {module} pulled in torch"


def test_the_setup_hook_of_a_ray_the_jobs_start_imports_nothing_of_the_project():
    # A worker runs its hook before it has the driver's sys.path, and exits when the hook fails: the hook that tells
    # it its Ray's address (pipeline/ray_setup.py) travels by value and runs where `pipeline` cannot be imported.
    from ray import cloudpickle

    from pipeline.ray_setup import own_address_hook

    code = "import pickle, sys; sys.modules['pipeline'] = None; pickle.loads(sys.stdin.buffer.read())(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(own_address_hook()), cwd="/",
                         capture_output=True, check=True)
    assert out.stdout.strip() == b"ok"


def test_models_names_resolve_lazily():
    import models

    assert models.build_model.__module__ == "models.build"
    assert "load_checkpoint" in dir(models)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        models.nope  # noqa: B018


def test_epoch_input_yields_every_batch_in_order(ray_session):
    ds = ray_session.data.range(10, override_num_blocks=3)
    ds.context.execution_options.preserve_order = True  # Ray Data's own order is by block completion
    batches = list(EpochInput(ds.iterator(), batch_size=4))
    assert [b["id"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(EpochInput(ds.limit(0).iterator(), batch_size=4)) == []


def test_epoch_input_raises_when_no_batch_comes(ray_session):
    import time

    from pipeline.train.loop import InputStalled

    def slow(row):
        time.sleep(3)
        return row

    epoch = EpochInput(ray_session.data.range(1).map(slow).iterator(), batch_size=1, stall_timeout=1)
    with pytest.raises(InputStalled, match="no training batch for 1 s"):
        list(epoch)
    # Let the pipeline finish before the next test: a Ray Data execution still running in a thread when the
    # session's Ray is shut down (the multi-node tests do that) takes the whole test process down.
    epoch.stall_timeout = 60
    assert [b["id"].tolist() for b in epoch] == [[0]]


def test_epoch_input_raises_the_pipeline_error_on_the_training_thread(ray_session, capsys):
    """...and says its cause in one line on stdout, which is what of a worker reaches the job's log (its stderr, with
    the traceback, stays in Ray's log files; Ray Train's own summary of it is cut short)."""
    def boom(row):
        raise OverflowError("Python int too large to convert to C long")

    with pytest.raises(Exception, match="Python int too large"):
        list(EpochInput(ray_session.data.range(4).map(boom).iterator(), batch_size=2))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train]")]
    assert said == ["[train] the training input pipeline failed: OverflowError: Python int too large to convert to C long"]
